"""Layer-wise learning-rate multipliers (discriminative fine-tuning), gradual unfreezing,
by block (every layer whose name starts with the block's name), and layer-wise rate
decay by the depth of a transformer's blocks (layers named ``block{i}_...``).

Each block's optimizer *update* (not its gradient, which Adam would normalise away) is
scaled by its factor; a block waiting to be unfrozen has factor 0 until its epoch. A
layer's depth factor multiplies its block's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


_BLOCK = re.compile(r"block(\d+)_")
LAYER_DECAY = "TrainConfig.layer_decay"


def layer_decay_factors(model: keras.Model, decay: float) -> dict[str, float]:
    """The update factor of each layer with weights by its depth in a transformer
    encoder (Clark et al., 2020; Bao et al., 2022): of N blocks (layers named
    ``block{i}_...``, i = 0 nearest the input), block i gets ``decay ** (N - i)``, the
    embeddings (layers named ``...embedding...``) ``decay ** (N + 1)``, and every other
    layer (the final norm, pooling, the classifier head) 1.

    Raises:
      ConfigError: naming the setting and the model's layers if none is a block.
    """
    layers = [layer.name for layer in model.layers if layer.trainable_weights]
    depth = {name: int(m.group(1)) for name in layers if (m := _BLOCK.match(name))}
    if not depth:
        raise ConfigError(f"{LAYER_DECAY} needs transformer blocks, layers named "
                          f"block{{i}}_... (block0_attention, block0_ffn1, ...), but model "
                          f"{model.name!r} has none (layers with weights: "
                          f"{', '.join(layers)})")
    blocks = max(depth.values()) + 1
    factors = {name: decay ** (blocks - i) for name, i in depth.items()}
    factors.update({name: decay ** (blocks + 1) for name in layers
                    if name not in depth and "embedding" in name})
    return factors


class BlockSchedule:
    """Per-block update factors, as variables the train step reads every step, times
    each layer's depth factor (a constant) under layer-wise rate decay."""

    def __init__(self, model: keras.Model, multipliers: Mapping[str, float],
                 unfreeze_epochs: Mapping[str, int], layer_decay: float = 1.0):
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
        self.depth_of: dict[int, float] = {}
        if layer_decay != 1.0:
            depths = layer_decay_factors(model, layer_decay)
            for layer in model.layers:
                for variable in layer.trainable_weights if layer.name in depths else ():
                    self.depth_of[id(variable)] = depths[layer.name]

    def scaled(self, variables: Sequence[tf.Variable]) -> list[tuple[tf.Variable, Any]]:
        """Each of ``variables`` whose update is scaled, with its factor this step: its
        block's factor times its depth factor."""
        pairs = []
        for variable in variables:
            block, depth = self.factor_of.get(id(variable)), self.depth_of.get(id(variable))
            if block is None and depth is None:
                continue
            factor = depth if block is None else block if depth is None else block * depth
            pairs.append((variable, factor))
        return pairs

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
    layer whose name starts with the block's name), and layer-wise rate decay by the
    depth of transformer blocks (``layer_decay_factors``); where a layer has both, its
    factors multiply."""

    update_multipliers: dict[str, float] = field(default_factory=dict)  # block -> factor
    unfreeze_epochs: dict[str, int] = field(default_factory=dict)  # block -> first epoch
    # Per block below the head: block i of N gets layer_decay ** (N - i), the embeddings
    # layer_decay ** (N + 1). 1: none.
    layer_decay: float = 1.0

    def validate(self, config: Any) -> None:
        check(all(f >= 0 for f in self.update_multipliers.values()),
              "TrainConfig.update_multipliers", f"must be >= 0, got {self.update_multipliers}")
        check(all(e >= 0 for e in self.unfreeze_epochs.values()),
              "TrainConfig.unfreeze_epochs", f"must be >= 0, got {self.unfreeze_epochs}")
        check(0 < self.layer_decay <= 1, LAYER_DECAY,
              f"must be in (0, 1] (1: no decay), got {self.layer_decay:g}")

    def shape(self, step: StepSpec) -> None:
        step.multipliers.update(self.update_multipliers)
        step.unfreeze_epochs.update(self.unfreeze_epochs)
        step.layer_decay = self.layer_decay

    def callbacks(self, step: keras.Model) -> list[keras.callbacks.Callback]:
        return [step.schedule.callback()] if step.schedule else []
