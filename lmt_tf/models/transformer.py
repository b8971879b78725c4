"""Text classifiers over token ids (the tokenizer is the layer in front of them:
``data.tokenization``): a transformer encoder and a bag-of-embeddings baseline.

Both take ids of shape (batch, length) with 0 for padding, any length up to
``input_shape[0]`` (the tokenizer's sequence length): a batch is as long as its
longest document. Layers are named by depth, so that layer-wise rates find the blocks:
``token_embedding``, ``position_embedding``, ``block{i}_norm1``, ``block{i}_attention``,
``block{i}_norm2``, ``block{i}_ffn1``, ``block{i}_ffn2`` (i = 0 at the input),
``final_norm``, ``predictions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range
from lmt_tf.errors import ConfigError

Size = Annotated[int, Range(ge=1)]  # units, heads, blocks, rows: at least one
Rate = Annotated[float, Range(ge=0, lt=1)]
POOLING = ("mean", "max", "first")


def build_transformer(input_shape: Sequence[Size], num_classes: Size,
                      vocabulary_size: Size, embed_dim: Size = 64, num_heads: Size = 4,
                      num_blocks: Size = 2, ff_dim: Size = 128, dropout: Rate = 0.1,
                      pooling: Annotated[str, OneOf(*POOLING)] = "mean") -> keras.Model:
    """A pre-norm transformer encoder classifier (Vaswani et al. 2017; pre-norm as in
    Xiong et al. 2020): token + learned position embeddings, ``num_blocks`` blocks of
    multi-head self-attention and a GELU feed-forward layer, each behind a layer norm
    and added to its input, a final layer norm, pooling over the tokens that are not
    padding, and a softmax over ``num_classes``. Padding is masked out of attention.

    Args:
      input_shape: (sequence_length,): the longest sequence of token ids.
      num_classes: output classes.
      vocabulary_size: rows of the token embedding (the tokenizer's ids).
      embed_dim: width of the embeddings and of every block.
      num_heads: attention heads; must divide ``embed_dim``.
      num_blocks: encoder blocks.
      ff_dim: width of each block's feed-forward layer.
      dropout: dropout rate after embeddings, attention and feed-forward layers.
      pooling: mean or max over the tokens, or the first token's state.

    Raises:
      ConfigError: for an input that is not a sequence, or heads not dividing the width.
    """
    length = _sequence_length(input_shape, "build_transformer")
    if embed_dim % num_heads:
        raise ConfigError(f"build_transformer.num_heads {num_heads} must divide embed_dim "
                          f"{embed_dim}")
    if pooling not in POOLING:
        raise ConfigError(f"build_transformer.pooling must be one of {POOLING}, got "
                          f"{pooling!r}")
    ids = keras.Input(shape=(None,), dtype="int64", name="token_ids")
    x = keras.layers.Embedding(vocabulary_size, embed_dim, name="token_embedding")(ids)
    x = PositionEmbedding(length, name="position_embedding")(x)
    x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    mask = AttentionMask(name="attention_mask")(ids)
    for i in range(num_blocks):
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        h = keras.layers.MultiHeadAttention(num_heads, embed_dim // num_heads,
                                            dropout=dropout, name=f"block{i}_attention")(
            h, h, attention_mask=mask)
        x = keras.layers.Add(name=f"block{i}_residual1")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        h = keras.layers.Dense(ff_dim, activation="gelu", name=f"block{i}_ffn1")(h)
        h = keras.layers.Dense(embed_dim, name=f"block{i}_ffn2")(h)
        h = keras.layers.Dropout(dropout, name=f"block{i}_dropout")(h)
        x = keras.layers.Add(name=f"block{i}_residual2")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    # In float32 under mixed precision, as layer norms and the softmax are: a sum over
    # hundreds of positions in bfloat16 (8 significant bits) loses the small terms.
    x = MaskedPooling(pooling, name="pooling", dtype="float32")([x, ids])
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(ids, outputs, name="transformer")


def build_bag_of_embeddings(input_shape: Sequence[Size], num_classes: Size,
                            vocabulary_size: Size, embed_dim: Size = 64,
                            hidden_units: Sequence[Size] = (), dropout: Rate = 0.0,
                            pooling: Annotated[str, OneOf("mean", "max")] = "mean"
                            ) -> keras.Model:
    """A bag of embeddings (fastText-like, Joulin et al. 2017; SWEM, Shen et al. 2018):
    each token's embedding, pooled over the tokens that are not padding, then
    ``hidden_units`` ReLU layers and a softmax. Order-blind; the baseline and a
    distillation student for the transformer.

    Args:
      input_shape: (sequence_length,).
      num_classes: output classes.
      vocabulary_size: rows of the token embedding.
      embed_dim: width of the embedding.
      hidden_units: ReLU layers after pooling.
      dropout: dropout rate after pooling and each hidden layer.
      pooling: mean or max over the tokens.
    """
    _sequence_length(input_shape, "build_bag_of_embeddings")
    ids = keras.Input(shape=(None,), dtype="int64", name="token_ids")
    x = keras.layers.Embedding(vocabulary_size, embed_dim, name="token_embedding")(ids)
    x = MaskedPooling(pooling, name="pooling", dtype="float32")([x, ids])  # (as above)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
        x = keras.layers.Dense(int(units), activation="relu", name=f"dense_{i}")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(ids, outputs, name="bag_of_embeddings")


def _sequence_length(input_shape: Sequence[int], builder: str) -> int:
    shape = tuple(input_shape)
    if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise ConfigError(f"{builder} takes sequences of token ids (input shape "
                          f"(sequence_length,)), got input shape {shape}: put a tokenizer "
                          f"in front (Preprocessing.tokenizer)")
    return shape[0]


@keras.utils.register_keras_serializable(package="lmt_tf")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position (0, 1, ...) to a sequence of vectors
    (batch, length, width), for lengths up to ``max_length``."""

    def __init__(self, max_length: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.max_length = int(max_length)

    def build(self, input_shape: Any) -> None:
        self.embeddings = self.add_weight(
            "embeddings", shape=(self.max_length, int(input_shape[-1])),
            initializer=keras.initializers.RandomUniform(-0.05, 0.05))
        super().build(input_shape)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        length = tf.shape(x)[1]
        return x + tf.cast(self.embeddings[tf.newaxis, :length], x.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_length": self.max_length}


@keras.utils.register_keras_serializable(package="lmt_tf")
class AttentionMask(keras.layers.Layer):
    """Token ids (batch, length) to an attention mask (batch, 1, length): every query
    may attend to every key that is not padding (id 0)."""

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.not_equal(ids, 0)[:, tf.newaxis, :]


@keras.utils.register_keras_serializable(package="lmt_tf")
class MaskedPooling(keras.layers.Layer):
    """Pools vectors (batch, length, width) over the positions whose token id is not
    padding: their mean or maximum, or the first position's vector."""

    def __init__(self, how: str = "mean", **kwargs: Any):
        super().__init__(**kwargs)
        if how not in POOLING:
            raise ConfigError(f"pooling must be one of {POOLING}, got {how!r}")
        self.how = how

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        x, ids = inputs
        if self.how == "first":
            return x[:, 0]
        keep = tf.cast(tf.not_equal(ids, 0), x.dtype)[:, :, tf.newaxis]
        if self.how == "max":
            lowest = tf.cast(x.dtype.min, x.dtype)
            return tf.reduce_max(x * keep + lowest * (1 - keep), axis=1)
        count = tf.maximum(tf.reduce_sum(keep, axis=1), tf.cast(1, x.dtype))
        return tf.reduce_sum(x * keep, axis=1) / count

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "how": self.how}
