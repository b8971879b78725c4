"""Magnitude pruning with TF-MOT as a model transform: ``prune_low_magnitude`` wraps the
chosen layers, ``UpdatePruningStep`` advances the schedule, ``strip_pruning`` leaves the
plain model with zeros in it."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tf_keras as keras

from lmt_tf.compression import tfmot
from lmt_tf.data.preprocessing import PREPROCESSING_PREFIX
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
    An entry of ``layers`` is a layer's name or a shell-style pattern (``block*_ffn*``):
    a pattern takes the prunable layers it matches.

    Raises:
      ConfigError: for a name that is not a layer of ``model``, a layer that cannot be
        pruned, or a pattern that matches no prunable layer.
    """
    names = [layer.name for layer in model.layers]
    prunable = [layer.name for layer in model.layers if _prunable(layer)]
    patterns = [entry for entry in layers if _is_pattern(entry)]
    exact = [entry for entry in layers if not _is_pattern(entry)]
    unknown = sorted(set(exact) - set(names))
    unmatched = [p for p in patterns if not fnmatch.filter(prunable, p)]
    if unknown or unmatched:
        what = (f"names {unknown}, not layers" if unknown
                else f"pattern {unmatched[0]!r} matches no prunable layer")
        raise ConfigError(f"prune.layers {what} of {model.name!r} "
                          f"(prunable: {', '.join(prunable) or 'none'})")
    chosen = set(exact) | {n for p in patterns for n in fnmatch.filter(prunable, p)}
    chosen = chosen if layers else set(prunable)
    not_prunable = sorted(chosen - set(prunable))
    if not_prunable or not chosen:
        raise ConfigError(f"prune cannot prune {not_prunable or 'anything'} in "
                          f"{model.name!r} (prunable layers: {', '.join(prunable) or 'none'})")
    return sorted(chosen)


def check_m_by_n(model: keras.Model, layers: Sequence[str]) -> None:
    """Raises ConfigError if a kernel of ``layers`` is not 2-D (Dense, Embedding) or 4-D
    (Conv2D): TF-MOT's m-by-n masks take no other (an attention projection is 3-D)."""
    for name in layers:
        for weight in prunable_weights(model.get_layer(name)):
            if len(weight.shape) not in (2, 4):
                raise ConfigError(
                    f"prune.m_by_n prunes 2-D (Dense) and 4-D (Conv2D) kernels; {weight.name} "
                    f"of {name} is {len(weight.shape)}-D {tuple(weight.shape)}: leave {name} "
                    f"out of prune.layers")


def _is_pattern(entry: str) -> bool:
    return any(c in entry for c in "*?[")


def prunable_weights(layer: keras.layers.Layer) -> list[Any]:
    """The weights TF-MOT prunes in ``layer`` (a Dense layer's kernel; the query, key,
    value and output kernels of a MultiHeadAttention); none for a layer it cannot prune."""
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import (
        PruneRegistry,
    )

    if not layer.weights:
        return []
    if isinstance(layer, _sparsity().PrunableLayer) or hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    if PruneRegistry.supports(layer):
        # What PruneLowMagnitude does to the layer it wraps: the registry gives it
        # get_prunable_weights.
        return list(PruneRegistry.make_prunable(layer).get_prunable_weights())
    return []


def _prunable(layer: keras.layers.Layer) -> bool:
    """A layer with weights that TF-MOT prunes: Dense, Conv, Embedding, MultiHeadAttention;
    not LayerNormalization or BatchNormalization (the registry lists no weight of theirs)
    nor a layer it does not know (a custom layer)."""
    return bool(prunable_weights(layer))


def left_dense(model: keras.Model, pruned: Sequence[str]) -> str:
    """What pruning ``pruned`` leaves dense in ``model`` and why, as one phrase: the layers
    with weights it does not prune (and the preprocessing, which has none), grouped by
    reason and kind, then the biases."""
    pruned = set(pruned)
    groups: dict[str, dict[str, list[str]]] = {}  # reason -> kind -> layer names
    for layer in model.layers:
        if layer.name in pruned:
            continue
        if not layer.weights:
            if not layer.name.startswith(PREPROCESSING_PREFIX):
                continue
            reason = "no weights"
        elif _prunable(layer):
            reason = "not in prune.layers"
        elif _registered(layer):
            reason = "TF-MOT prunes no weight of this kind"
        else:
            reason = "not in TF-MOT's prune registry"
        groups.setdefault(reason, {}).setdefault(type(layer).__name__, []).append(layer.name)
    parts = [", ".join(f"{', '.join(names)} ({kind})" for kind, names in kinds.items())
             + f": {reason}" for reason, kinds in groups.items()]
    if any(len(model.get_layer(name).weights) > len(prunable_weights(model.get_layer(name)))
           for name in pruned):
        parts.append("the pruned layers' biases: TF-MOT prunes kernels only")
    return "; ".join(parts) or "nothing"


def pruning_plan(model: keras.Model, pruned: Sequence[str]) -> str:
    """One line: the layers ``pruned`` prunes in ``model`` (an attention layer's
    projections by name), and what stays dense and why (``left_dense``)."""
    described = []
    for name in pruned:
        weights = prunable_weights(model.get_layer(name))
        parts = [w.name.split("/")[-2] for w in weights]
        described.append(f"{name} ({', '.join(parts)} kernels)" if len(weights) > 1
                         else name)
    return f"pruning {', '.join(described)}; left dense: {left_dense(model, pruned)}"


def _registered(layer: keras.layers.Layer) -> bool:
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import (
        PruneRegistry,
    )

    return PruneRegistry.supports(layer)


def kernel_sparsity(model: keras.Model, layers: Sequence[str]) -> dict[str, float]:
    """Fraction of zeros in the pruned weights of each of ``layers`` of a (stripped)
    model: its kernel, or all four projection kernels of an attention layer."""
    result = {}
    for name in layers:
        weights = [w.numpy() for w in prunable_weights(model.get_layer(name))]
        result[name] = float(sum(np.sum(w == 0) for w in weights)
                             / sum(w.size for w in weights))
    return result


def pruned_size(model: keras.Model, layers: Sequence[str]) -> dict[str, int]:
    """The number of pruned weights of each of ``layers``."""
    return {name: sum(int(np.prod(w.shape)) for w in prunable_weights(model.get_layer(name)))
            for name in layers}
