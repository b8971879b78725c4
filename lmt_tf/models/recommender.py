"""A two-tower-style rating model: user and item embeddings, then an MLP.

Its embedding tables are the variables that parameter-server training partitions across
parameter servers (hybrid placement: sparse lookups on the ps, dense compute on workers).
"""

from __future__ import annotations

from collections.abc import Sequence

import tf_keras as keras

from lmt_tf.checks import Annotated, Range
from lmt_tf.errors import ConfigError

Size = Annotated[int, Range(ge=1)]  # units, channels, rows: at least one


def build_recommender(input_shape: Sequence[Size], num_classes: Size, num_users: Size = 943,
                      num_items: Size = 1682, embedding_dim: Size = 64,
                      hidden_units: Sequence[Size] = (64,)) -> keras.Model:
    """Predicts a rating from (user index, item index) pairs.

    Args:
      input_shape: must be (2,): user index and item index, int64.
      num_classes: 1 for a rating (regression); more for a softmax over classes.
      num_users: rows of the user embedding table (largest user index + 1).
      num_items: rows of the item embedding table (largest item index + 1).
      embedding_dim: width of both embeddings.
      hidden_units: ReLU layers after the concatenated embeddings.

    Raises:
      ConfigError: for an input that is not a (user, item) pair or non-positive sizes.
    """
    if tuple(input_shape) != (2,):
        raise ConfigError(f"build_recommender needs (user, item) pairs of shape (2,), "
                          f"got {tuple(input_shape)}")
    if min(num_users, num_items, embedding_dim, *hidden_units) < 1:
        raise ConfigError("build_recommender sizes must be positive")
    pairs = keras.Input(shape=(2,), dtype="int64", name="user_item")
    users = keras.layers.Embedding(num_users, embedding_dim, name="user_embedding")(
        pairs[:, 0])
    items = keras.layers.Embedding(num_items, embedding_dim, name="item_embedding")(
        pairs[:, 1])
    x = keras.layers.Concatenate()([users, items])
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(int(units), activation="relu", name=f"dense_{i}")(x)
    if num_classes == 1:
        outputs = keras.layers.Dense(1, dtype="float32", name="rating")(x)
    else:
        outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                     name="predictions")(x)
    return keras.Model(pairs, outputs, name="recommender")
