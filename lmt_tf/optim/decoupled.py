"""Decoupled Greedy Learning (Belilovsky, Eickenberg and Oyallon, 2020, "Decoupled
Greedy Learning of CNNs"): the model is cut into blocks at named layers; each block
trains on the loss of its own auxiliary classifier, and no gradient crosses from one
block to the one before it. The last block's head is the model's own output.

Inference, evaluation and export use the original model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.errors import ConfigError
from lmt_tf.optim.model_transforms import ModelTransform
from lmt_tf.optim.technique import Technique
from lmt_tf.optim.train_step import TrainingOnlyMetrics


def _chain(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of a model in which each layer feeds the next (MLP, CNN builders)."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        if layer.input is not previous:
            raise ConfigError(f"TrainConfig.decoupled_blocks needs a chain of layers; layer "
                              f"{layer.name!r} of {model.name!r} does not take the output of "
                              f"the layer before it")
        previous = layer.output
    return layers


class DecoupledGreedyModel(TrainingOnlyMetrics):
    """Trains ``inner`` block by block; ``boundaries`` name the last layer of each block
    but the final one."""

    def __init__(self, inner: keras.Model, boundaries: Sequence[str], num_classes: int,
                 loss: str, **kwargs):
        super().__init__(name=f"{inner.name}_decoupled", **kwargs)
        layers = _chain(inner)
        names = [layer.name for layer in layers]
        unknown = [b for b in boundaries if b not in names[:-1]]
        if unknown:
            raise ConfigError(f"TrainConfig.decoupled_blocks names {unknown}, not layers of "
                              f"{inner.name!r} before its output (layers: {', '.join(names)})")
        self.inner = inner
        self._layers_in_order = layers
        self._boundaries = sorted(boundaries, key=names.index)
        self._loss = keras.losses.get(loss)
        self.heads = {b: keras.Sequential([keras.layers.Flatten(),
                                           keras.layers.Dense(num_classes, activation="softmax",
                                                              dtype="float32")],
                                          name=f"aux_{b}")
                      for b in self._boundaries}
        for layer in layers:  # heads have weights before the optimizer or a restore looks
            if layer.name in self.heads:
                self.heads[layer.name].build(layer.output.shape)
        self.block_losses_mean = [keras.metrics.Mean(name=f"block_{i}_loss")
                                  for i in range(len(self._boundaries))]
        self._training_only = tuple(m.name for m in self.block_losses_mean)

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def block_outputs(self, x, training: bool = True) -> list[tf.Tensor]:
        """The auxiliary heads' predictions at each boundary, then the final output."""
        outputs = []
        for layer in self._layers_in_order:
            x = layer(x, training=training)
            if layer.name in self.heads:
                outputs.append(self.heads[layer.name](x, training=training))
                x = tf.stop_gradient(x)  # the next block's loss does not reach this one
        return [*outputs, x]

    def block_variables(self) -> list[list[tf.Variable]]:
        """Trainable variables of each block, its auxiliary head included."""
        blocks, current = [], []
        for layer in self._layers_in_order:
            current += layer.trainable_variables
            if layer.name in self.heads:
                blocks.append(current + self.heads[layer.name].trainable_variables)
                current = []
        return [*blocks, current]

    def block_losses(self, x, y, training: bool = True) -> list[tf.Tensor]:
        """Each block's loss averaged over the global batch (replicas summed by the
        optimizer): auxiliary heads first, the model's own loss last."""
        return self._average_losses(y, self.block_outputs(x, training))

    def _average_losses(self, y, outputs: list[tf.Tensor]) -> list[tf.Tensor]:
        return [tf.nn.compute_average_loss(self._loss(y, out)) for out in outputs]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            outputs = self.block_outputs(x, training=True)
            aux = self._average_losses(y, outputs[:-1])
            final = self.compute_loss(x, y, outputs[-1], sample_weight)
            total = tf.add_n([*aux, final])
        variables = [v for block in self.block_variables() for v in block]
        self.optimizer.apply_gradients(zip(tape.gradient(total, variables), variables,
                                           strict=True))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for mean, loss in zip(self.block_losses_mean, aux, strict=True):
            mean.update_state(loss * replicas)
        self.compiled_metrics.update_state(y, outputs[-1], sample_weight)
        return {m.name: m.result() for m in self.metrics}


class DecoupledWrapper(ModelTransform):
    """Wraps the model in a ``DecoupledGreedyModel``; strips it again for export."""

    def __init__(self, boundaries: Sequence[str], loss: str):
        self.boundaries, self.loss = tuple(boundaries), loss

    def wrap(self, model: keras.Model) -> keras.Model:
        return DecoupledGreedyModel(model, self.boundaries, model.output_shape[-1], self.loss)

    def strip(self, wrapped: keras.Model) -> keras.Model:
        return wrapped.inner


@dataclass
class DecoupledBlocks(Technique):
    """Decoupled greedy learning: the model trains block by block, each on the loss of
    its own auxiliary head, with no gradient crossing between blocks."""

    decoupled_blocks: tuple[str, ...] = ()  # layers ending each greedily trained block

    replaces_step = True

    def __post_init__(self) -> None:
        if isinstance(self.decoupled_blocks, list):  # gin writes [...] as a list
            self.decoupled_blocks = tuple(self.decoupled_blocks)

    def wrapper(self, config: Any) -> ModelTransform:
        return DecoupledWrapper(self.decoupled_blocks, config.loss)
