"""Layer-wise learning-rate multipliers (discriminative fine-tuning) and gradual
unfreezing, by block: a block is every layer whose name starts with the block's name.

Each block's optimizer *update* (not its gradient, which Adam would normalise away) is
scaled by its factor; a block waiting to be unfrozen has factor 0 until its epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check
from lmt_tf.errors import ConfigError
from lmt_tf.optim.technique import StepSpec, Technique


def blocks_of(model: keras.Model, names: Mapping[str, object], setting: str
              ) -> dict[str, list[tf.Variable]]:
    """The trainable variables of each named block.

    Raises:
      ConfigError: naming ``setting`` and the block if a name matches no layer.
    """
    layers = [layer for layer in model.layers if layer.trainable_weights]
    blocks = {}
    for name in names:
        matched = [layer for layer in layers if layer.name.startswith(name)]
        if not matched:
            raise ConfigError(f"{setting} names block {name!r}, which matches no layer of "
                              f"model {model.name!r} (layers with weights: "
                              f"{', '.join(layer.name for layer in layers)})")
        blocks[name] = [v for layer in matched for v in layer.trainable_weights]
    return blocks


class BlockSchedule:
    """Per-block update factors, as variables the train step reads every step."""

    def __init__(self, model: keras.Model, multipliers: Mapping[str, float],
                 unfreeze_epochs: Mapping[str, int]):
        names = {**dict.fromkeys(multipliers), **dict.fromkeys(unfreeze_epochs)}
        blocks = {**blocks_of(model, multipliers, "TrainConfig.update_multipliers"),
                  **blocks_of(model, unfreeze_epochs, "TrainConfig.unfreeze_epochs")}
        self.multipliers = {n: float(multipliers.get(n, 1.0)) for n in names}
        self.unfreeze_epochs = {n: int(unfreeze_epochs.get(n, 0)) for n in names}
        self.factors = {n: tf.Variable(self.multipliers[n] if not self.unfreeze_epochs[n]
                                       else 0.0, trainable=False, name=f"factor_{n}")
                        for n in names}
        self.factor_of: dict[int, tf.Variable] = {}
        for name in names:  # a later block wins where prefixes overlap
            for variable in blocks[name]:
                self.factor_of[id(variable)] = self.factors[name]

    def set_epoch(self, epoch: int) -> None:
        for name, factor in self.factors.items():
            factor.assign(self.multipliers[name] if epoch >= self.unfreeze_epochs[name]
                          else 0.0)

    def callback(self) -> keras.callbacks.Callback:
        schedule = self

        class Unfreeze(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch: int, logs=None) -> None:
                schedule.set_epoch(epoch)

        return Unfreeze()


def rescale_updates(pairs: list[tuple[tf.Variable, tf.Tensor, tf.Variable]]) -> None:
    """In a replica context: sets each variable to ``old + factor * (new - old)``."""

    def rescale(strategy, pairs):
        for variable, old, factor in pairs:
            strategy.extended.update(
                variable, lambda v, o, f: v.assign(o + tf.cast(f, v.dtype) * (v - o)),
                args=(old, factor), group=False)

    tf.distribute.get_replica_context().merge_call(rescale, args=(pairs,))


@dataclass
class LayerwiseUpdates(Technique):
    """Layer-wise update multipliers and gradual unfreezing, by block (a block: every
    layer whose name starts with the block's name)."""

    update_multipliers: dict[str, float] = field(default_factory=dict)  # block -> factor
    unfreeze_epochs: dict[str, int] = field(default_factory=dict)  # block -> first epoch

    def validate(self, config: Any) -> None:
        check(all(f >= 0 for f in self.update_multipliers.values()),
              "TrainConfig.update_multipliers", f"must be >= 0, got {self.update_multipliers}")
        check(all(e >= 0 for e in self.unfreeze_epochs.values()),
              "TrainConfig.unfreeze_epochs", f"must be >= 0, got {self.unfreeze_epochs}")

    def shape(self, step: StepSpec) -> None:
        step.multipliers.update(self.update_multipliers)
        step.unfreeze_epochs.update(self.unfreeze_epochs)

    def callbacks(self, step: keras.Model) -> list[keras.callbacks.Callback]:
        return [step.schedule.callback()] if step.schedule else []
