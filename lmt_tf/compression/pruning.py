"""Magnitude pruning with TF-MOT as a model transform: ``prune_low_magnitude`` wraps the
chosen layers, ``UpdatePruningStep`` advances the schedule, ``strip_pruning`` leaves the
plain model with zeros in it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tf_keras as keras

from lmt_tf.compression import tfmot
from lmt_tf.errors import ConfigError
from lmt_tf.optim.model_transforms import ModelTransform

SCHEDULES = ("polynomial", "constant")


def _sparsity() -> Any:
    return tfmot().sparsity.keras


@dataclass(frozen=True)
class PruningSchedule:
    """When and how far weights are pruned, in optimizer steps of the prune stage."""

    final_sparsity: float  # fraction of each pruned kernel that ends up zero
    total_steps: int  # steps of the stage
    kind: str = "polynomial"  # polynomial: from initial to final; constant: final at once
    initial_sparsity: float = 0.0  # polynomial only
    frequency: int | None = None  # steps between mask updates; None: about 20 updates

    def build(self) -> Any:
        """The TF-MOT schedule. Its own frequency default (100 steps) would never prune a
        short stage, so the frequency follows from the stage's steps, and the last update
        falls on a step the stage runs, where the final sparsity is reached."""
        frequency = self.frequency or max(1, self.total_steps // 20)
        end = max(0, (self.total_steps - 1) // frequency * frequency)
        if self.kind == "constant":
            return _sparsity().ConstantSparsity(self.final_sparsity, begin_step=0,
                                                end_step=end, frequency=frequency)
        return _sparsity().PolynomialDecay(self.initial_sparsity, self.final_sparsity,
                                           begin_step=0, end_step=end, frequency=frequency)


class Pruning(ModelTransform):
    """Prunes the kernels of ``layers`` (all prunable layers if empty) by magnitude;
    with ``m_by_n = (2, 4)``, at most 2 of every 4 consecutive input weights stay
    non-zero (structured sparsity that sparse tensor cores run fast)."""

    def __init__(self, schedule: PruningSchedule, layers: Sequence[str] = (),
                 m_by_n: tuple[int, int] | None = None):
        self.schedule = schedule
        self.layers = tuple(layers)
        self.m_by_n = tuple(m_by_n) if m_by_n else None
        self.pruned: list[str] = []  # the layers wrapped, once ``wrap`` ran

    def wrap(self, model: keras.Model) -> keras.Model:
        kwargs = {"pruning_schedule": self.schedule.build()}
        if self.m_by_n:
            kwargs = {"sparsity_m_by_n": self.m_by_n}  # with its own constant schedule
        chosen = set(pruned_layers(model, self.layers))

        def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
            # The same layer objects, so the trained weights carry over (TF-MOT's guide).
            return _sparsity().prune_low_magnitude(layer, **kwargs) if layer.name in chosen \
                else layer

        pruned = keras.models.clone_model(model, clone_function=clone)
        self.pruned = sorted(chosen)
        return pruned

    def callbacks(self, wrapped: keras.Model) -> list[keras.callbacks.Callback]:
        return [_sparsity().UpdatePruningStep()]

    def strip(self, wrapped: keras.Model) -> keras.Model:
        return _sparsity().strip_pruning(wrapped)


def pruned_layers(model: keras.Model, layers: Sequence[str] = ()) -> list[str]:
    """The layers of ``model`` that pruning ``layers`` (empty: every prunable one) prunes.

    Raises:
      ConfigError: for a name that is not a layer of ``model`` or a layer that cannot be
        pruned.
    """
    prunable = [layer.name for layer in model.layers if _prunable(layer)]
    unknown = sorted(set(layers) - {layer.name for layer in model.layers})
    if unknown:
        raise ConfigError(f"prune.layers names {unknown}, not layers of {model.name!r} "
                          f"(prunable: {', '.join(prunable) or 'none'})")
    chosen = set(layers or prunable)
    not_prunable = sorted(chosen - set(prunable))
    if not_prunable or not chosen:
        raise ConfigError(f"prune cannot prune {not_prunable or 'anything'} in "
                          f"{model.name!r} (prunable layers: {', '.join(prunable) or 'none'})")
    return sorted(chosen)


def _prunable(layer: keras.layers.Layer) -> bool:
    """A layer with weights that TF-MOT knows how to prune (Dense, Conv, ...)."""
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import (
        PruneRegistry,
    )

    return bool(layer.weights) and (isinstance(layer, _sparsity().PrunableLayer)
                                    or PruneRegistry.supports(layer))


def kernel_sparsity(model: keras.Model, layers: Sequence[str]) -> dict[str, float]:
    """Fraction of zeros in the kernel of each of ``layers`` of a (stripped) model."""
    result = {}
    for name in layers:
        kernel = model.get_layer(name).kernel.numpy()
        result[name] = float(np.mean(kernel == 0))
    return result
