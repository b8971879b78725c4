"""Which variables an optimizer's weight decay leaves alone: biases, the scale and shift
of normalization layers, embeddings, chosen by kind (``TrainConfig.exclude_from_weight_decay``).

Variables are picked from the model's structure (a weight called ``bias``, the weights of
a normalization or an embedding layer) and handed to Keras' ``exclude_from_weight_decay``
as variables, not as name patterns: Keras matches a pattern against the name of each
replica's copy (``dense/bias/replica_1:0`` under MirroredStrategy), but a variable by its
identity, which every copy shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check

SETTING = "TrainConfig.exclude_from_weight_decay"
KINDS = ("biases", "norms", "embeddings")
_NORMS = (keras.layers.LayerNormalization, keras.layers.BatchNormalization,
          keras.layers.GroupNormalization)


def excluded(model: keras.Model, kinds: Sequence[str]) -> list[tf.Variable]:
    """The trainable variables of ``model`` (its nested layers included) of ``kinds``:
    ``biases`` (every weight named ``bias``: dense, convolution, attention projections),
    ``norms`` (every weight of a LayerNormalization, BatchNormalization or
    GroupNormalization layer: gamma and beta), ``embeddings`` (of Embedding layers)."""
    picked: dict[int, tf.Variable] = {}

    def pick(variables: Sequence[tf.Variable]) -> None:
        for variable in variables:
            picked.setdefault(id(variable), variable)

    layers = [m for m in model.submodules if isinstance(m, keras.layers.Layer)]
    if "norms" in kinds:
        for layer in layers:
            if isinstance(layer, _NORMS):
                pick(layer.trainable_weights)
    if "embeddings" in kinds:
        for layer in layers:
            if isinstance(layer, keras.layers.Embedding):
                pick(layer.trainable_weights)
    if "biases" in kinds:
        pick([v for v in model.trainable_variables if _own_name(v) == "bias"])
    trainable = {id(v) for v in model.trainable_variables}
    return [v for key, v in picked.items() if key in trainable]


def exclude(optimizer: keras.optimizers.Optimizer, model: keras.Model,
            kinds: Sequence[str]) -> list[tf.Variable]:
    """Leaves ``model``'s variables of ``kinds`` out of ``optimizer``'s weight decay (call
    before the optimizer is built); returns them.

    Raises:
      ConfigError: if the optimizer has no weight decay to exclude anything from.
    """
    check(bool(optimizer.weight_decay), SETTING,
          f"leaves {', '.join(kinds)} out of the optimizer's weight decay, but "
          f"{type(optimizer).__name__} has none (weight_decay {optimizer.weight_decay}); set "
          f"keras.optimizers.{type(optimizer).__name__}.weight_decay, or leave this out")
    variables = excluded(model, kinds)
    optimizer.exclude_from_weight_decay(var_list=variables)
    return variables


def _own_name(variable: tf.Variable) -> str:
    """A weight's own name: ``bias`` for ``block0_attention/query/bias:0``."""
    return variable.name.rsplit("/", 1)[-1].split(":", 1)[0]
