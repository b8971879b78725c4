"""A DLRM-style click model and its logistic-regression baseline, over raw click-log rows.

Both take the raw example of issue 21: one int64 row of ``num_dense`` non-negative counts
then K raw categorical ids (unhashed, up to 2**40 or beyond). All feature engineering is
inside the model, so the SavedModel answers raw rows:

- each raw id is hashed into buckets (a 64-bit mix of the id and a salt per feature,
  computed in unsigned 64-bit integers: exact for every int64 id, the same in any
  process, any build and after a SavedModel round trip);
- pairs of categorical features are crossed: the pair's ids hashed together into the
  cross's own buckets;
- the counts become ``(log1p(count) - mean) / std``, with statistics given to the
  builder (``dense_statistics`` computes them from training rows).

``build_dlrm`` embeds each hashed feature (one table per feature, or one shared table),
runs a bottom MLP over the dense features to the embedding width, lets the vectors
interact (pairwise dot products, as in DLRM, Naumov et al. 2019, or concatenation) and
ends in a top MLP. ``build_wide`` is logistic regression on the same hashed features.
Both end in one logit z and a softmax over [0, z] (column 1 = sigmoid(z), the click
probability), so sparse categorical cross-entropy is the log-loss.

The embedding tables are ``keras.layers.Embedding`` layers named ``*_embedding``: a
parameter-server partitioner shards them, and their gradients stay row-sparse
(``tf.IndexedSlices``): nothing here multiplies or one-hots a whole table.
``dlrm_parameters`` and ``wide_parameters`` count the parameters by arithmetic, without
building anything (a 10^9-parameter model is 4 GB of float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range
from lmt_tf.errors import ConfigError

Size = Annotated[int, Range(ge=1)]  # units, rows, widths: at least one
INTERACTIONS = ("dot", "concat")
MASK64 = (1 << 64) - 1
# splitmix64 (Steele et al. 2014; Vigna): the increment and the finaliser's multipliers.
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def mix64(value: int) -> int:
    """splitmix64's finaliser on a Python integer modulo 2**64: the reference the
    TensorFlow ops (``_mix``) compute, and what a test or another process can hash with."""
    z = value & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def feature_salt(feature: int) -> int:
    """The salt of categorical feature ``feature`` (0-based): added to its raw ids before
    mixing, so one id in two features lands in unrelated buckets (a shared table)."""
    return ((feature + 1) * GOLDEN) & MASK64


def cross_salt(cross: int) -> int:
    """The salt of the ``cross``-th feature cross (0-based), apart from every feature's
    (the features' salts count up from 1, the crosses' down from 2**64)."""
    return ((-(cross + 1)) * GOLDEN) & MASK64


def hash_id(raw: int, feature: int, buckets: int) -> int:
    """The bucket of raw id ``raw`` of categorical feature ``feature`` (pure Python)."""
    return mix64((raw & MASK64) + feature_salt(feature)) % buckets


def hash_cross(first: int, second: int, cross: int, buckets: int) -> int:
    """The bucket of the ``cross``-th cross of a pair of raw ids (pure Python)."""
    return mix64(mix64((first & MASK64) + cross_salt(cross)) + (second & MASK64)) % buckets


def _uint64(values: int | Sequence[int]) -> tf.Tensor:
    """A uint64 constant of exact values. Not ``tf.constant(list, tf.uint64)``: in a
    traced function (a SavedModel's signature) TensorFlow 2.21 converts a Python list
    holding numbers above 2**63 through float64 and rounds them."""
    return tf.constant(np.array(values, dtype=np.uint64))


def _mix(z: tf.Tensor) -> tf.Tensor:
    """``mix64`` on a uint64 tensor (TensorFlow's uint64 products wrap modulo 2**64)."""
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(30, tf.uint64)))
    z = z * _uint64(MIX1)
    z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(27, tf.uint64)))
    z = z * _uint64(MIX2)
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, tf.constant(31, tf.uint64)))


def _buckets_of(z: tf.Tensor, buckets: Sequence[int]) -> tf.Tensor:
    """int64 bucket ids: the uint64 hashes ``z`` modulo each column's bucket count."""
    return tf.cast(tf.math.floormod(z, _uint64(buckets)), tf.int64)


@keras.saving.register_keras_serializable(package="lmt")
class Columns(keras.layers.Layer):
    """Columns ``start`` to ``stop`` (exclusive; None: the last) of [batch, width]. A
    layer, not ``x[:, a:b]``: in a ``tf.Graph`` (counting parameters without allocating
    them) tf-keras evaluates a raw op's constant inputs in a Session, which initialises
    every variable created so far."""

    def __init__(self, start: int, stop: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.start, self.stop = int(start), None if stop is None else int(stop)

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return x[:, self.start:self.stop]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "start": self.start, "stop": self.stop}


@keras.saving.register_keras_serializable(package="lmt")
class RowSum(keras.layers.Layer):
    """[batch, ...] -> the sum of each example's values [batch, 1], in float32."""

    def call(self, x: tf.Tensor) -> tf.Tensor:
        x = tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])
        return tf.reduce_sum(x, axis=1, keepdims=True)


@keras.saving.register_keras_serializable(package="lmt")
class HashedIds(keras.layers.Layer):
    """Raw int64 ids [batch, K] -> their buckets [batch, K]: column f hashed with
    feature f's salt modulo ``buckets[f]`` (``hash_id``)."""

    def __init__(self, buckets: Sequence[int], **kwargs: Any):
        super().__init__(**kwargs)
        self.buckets = [int(b) for b in buckets]

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        salts = _uint64([feature_salt(f) for f in range(len(self.buckets))])
        z = _mix(tf.bitcast(tf.cast(ids, tf.int64), tf.uint64) + salts)
        return _buckets_of(z, self.buckets)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "buckets": self.buckets}


@keras.saving.register_keras_serializable(package="lmt")
class HashedCrosses(keras.layers.Layer):
    """Raw int64 ids [batch, K] -> one bucket per cross [batch, C]: cross c hashes the
    ids of its pair ``pairs[c]`` together modulo ``buckets`` (``hash_cross``)."""

    def __init__(self, pairs: Sequence[Sequence[int]], buckets: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.pairs = [[int(a), int(b)] for a, b in pairs]
        self.buckets = int(buckets)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        raw = tf.bitcast(tf.cast(ids, tf.int64), tf.uint64)
        first = tf.gather(raw, [a for a, _ in self.pairs], axis=1)
        second = tf.gather(raw, [b for _, b in self.pairs], axis=1)
        salts = _uint64([cross_salt(c) for c in range(len(self.pairs))])
        z = _mix(_mix(first + salts) + second)
        return _buckets_of(z, [self.buckets] * len(self.pairs))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pairs": self.pairs, "buckets": self.buckets}


@keras.saving.register_keras_serializable(package="lmt")
class LogStandardize(keras.layers.Layer):
    """Counts [batch, D] (int64, negatives read as 0) -> ``(log1p(count) - mean) / std``
    in float32, with the statistics fixed in the layer (so in the SavedModel)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs: Any):
        super().__init__(**kwargs)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def call(self, counts: tf.Tensor) -> tf.Tensor:
        x = tf.math.log1p(tf.maximum(tf.cast(counts, tf.float32), 0.0))
        return (x - tf.constant(self.mean)) / tf.constant(self.std)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="lmt")
class DotInteraction(keras.layers.Layer):
    """Vectors [batch, n, d] -> the dot products of every pair of them [batch,
    n(n-1)/2] (the strict upper triangle of their Gram matrix, row by row): DLRM's
    feature interaction."""

    def call(self, vectors: tf.Tensor) -> tf.Tensor:
        n = vectors.shape[1]
        gram = tf.matmul(vectors, vectors, transpose_b=True)
        upper = [i * n + j for i in range(n) for j in range(i + 1, n)]
        return tf.gather(tf.reshape(gram, [-1, n * n]), upper, axis=1)


@keras.saving.register_keras_serializable(package="lmt")
class ClickSoftmax(keras.layers.Layer):
    """One logit z [batch, 1] -> softmax([0, z]) [batch, 2]: (no click, click), column 1
    equal to sigmoid(z)."""

    def call(self, logit: tf.Tensor) -> tf.Tensor:
        logit = tf.cast(logit, tf.float32)
        return tf.nn.softmax(tf.concat([tf.zeros_like(logit), logit], axis=-1))


@keras.saving.register_keras_serializable(package="lmt")
class ClickAUC(keras.metrics.AUC):
    """ROC AUC of the click probability (column 1 of the [no click, click] softmax)
    against integer 0/1 labels: Keras' AUC takes one probability per example, not a
    2-class softmax. Bound by name: ``TrainConfig.metrics = ["ClickAUC"]`` (logged as
    ``test_click_auc``). 1000 thresholds: within about 1e-3 of the exact AUC."""

    def __init__(self, name: str = "click_auc", num_thresholds: int = 1000, **kwargs: Any):
        super().__init__(name=name, num_thresholds=num_thresholds, **kwargs)

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor,
                     sample_weight: tf.Tensor | None = None) -> Any:
        y_true = tf.reshape(tf.cast(y_true, tf.float32), [-1])
        return super().update_state(y_true, y_pred[:, 1], sample_weight)


# keras.metrics.get (and so TrainConfig.metrics) resolves the name.
keras.utils.get_custom_objects()["ClickAUC"] = ClickAUC


@dataclass(frozen=True)
class ClickFeatures:
    """The validated settings of the hashed features, shared by both builders."""

    num_dense: int
    buckets: tuple[int, ...]  # per categorical feature
    shared_buckets: int | None
    crosses: tuple[tuple[int, int], ...]
    cross_buckets: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_categorical(self) -> int:
        return len(self.buckets)

    def embedding_rows(self) -> int:
        """Rows of all embedding tables together."""
        single = self.shared_buckets if self.shared_buckets else sum(self.buckets)
        return single + len(self.crosses) * self.cross_buckets


def _positive(name: str, setting: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name}.{setting} must be an integer >= 1, got {value!r}")
    return int(value)


def _sizes(name: str, setting: str, values: Sequence[Any]) -> tuple[int, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(f"{name}.{setting} must be a list of integers >= 1, got {values!r}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | np.integer)
           or v < 1]
    if bad:
        raise ConfigError(f"{name}.{setting} must be a list of integers >= 1, got "
                          f"{tuple(values)}")
    return tuple(int(v) for v in values)


def _per_dense(name: str, setting: str, value: float | Sequence[float] | None,
               count: int, default: float) -> tuple[float, ...]:
    """A statistic per dense feature: one number for all, or ``count`` of them."""
    if value is None:
        return (default,) * count
    values = [value] * count if isinstance(value, int | float) else list(value)
    if len(values) != count:
        raise ConfigError(f"{name}.{setting} must be a number or {count} numbers (one per "
                          f"dense feature), got {len(values)}")
    return tuple(float(v) for v in values)


def _features(name: str, input_shape: Sequence[int], num_classes: int, num_dense: int,
              buckets: int | Sequence[int], shared_buckets: int | None,
              crosses: Sequence[Sequence[int]], cross_buckets: int,
              dense_mean: float | Sequence[float] | None,
              dense_std: float | Sequence[float] | None) -> ClickFeatures:
    """Checks the settings both builders share.

    Raises:
      ConfigError: one line naming the setting, the value and what is allowed.
    """
    num_dense = _positive(name, "num_dense", num_dense)
    shape = tuple(input_shape)
    if len(shape) != 1 or not isinstance(shape[0], int | np.integer) \
            or shape[0] <= num_dense:
        raise ConfigError(f"{name} needs rows of num_dense={num_dense} counts then at "
                          f"least one categorical id (shape ({num_dense} + K,)), got "
                          f"input shape {shape}")
    if num_classes != 2:
        raise ConfigError(f"{name} predicts click / no click (num_classes 2), got "
                          f"num_classes={num_classes}")
    k = int(shape[0]) - num_dense
    if isinstance(buckets, int | np.integer):
        per_feature = (_positive(name, "buckets", buckets),) * k
    else:
        per_feature = _sizes(name, "buckets", buckets)
        if len(per_feature) != k:
            raise ConfigError(f"{name}.buckets must be one number or {k} (one per "
                              f"categorical feature), got {len(per_feature)}")
    if shared_buckets is not None:
        shared_buckets = _positive(name, "shared_buckets", shared_buckets)
        per_feature = (shared_buckets,) * k  # every feature hashes into the one table
    pairs: list[tuple[int, int]] = []
    for pair in crosses:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ConfigError(f"{name}.crosses must be pairs of categorical feature "
                              f"indices (i, j), got {pair!r}")
        a, b = pair
        if not all(isinstance(i, int | np.integer) and 0 <= i < k for i in (a, b)):
            raise ConfigError(f"{name}.crosses: {tuple(pair)} names a feature out of range; "
                              f"categorical features are 0..{k - 1}")
        if a == b or (int(a), int(b)) in pairs:
            raise ConfigError(f"{name}.crosses: {tuple(pair)} must pair two different "
                              f"features, each pair once")
        pairs.append((int(a), int(b)))
    mean = _per_dense(name, "dense_mean", dense_mean, num_dense, 0.0)
    std = _per_dense(name, "dense_std", dense_std, num_dense, 1.0)
    if min(std) <= 0:
        raise ConfigError(f"{name}.dense_std must be > 0, got {min(std)}")
    return ClickFeatures(num_dense, per_feature, shared_buckets, tuple(pairs),
                         _positive(name, "cross_buckets", cross_buckets), mean, std)


def _inputs(features: ClickFeatures
            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor | None]:
    """The raw row, its standardised counts, its hashed ids and its crosses' buckets."""
    d = features.num_dense
    raw = keras.Input((d + features.num_categorical,), dtype="int64", name="features")
    dense = LogStandardize(features.mean, features.std, name="log_standardize")(
        Columns(0, d, name="counts")(raw))
    ids = Columns(d, name="ids")(raw)
    hashed = HashedIds(features.buckets, name="hashed_ids")(ids)
    crossed = (HashedCrosses(features.crosses, features.cross_buckets,
                             name="hashed_crosses")(ids) if features.crosses else None)
    return raw, dense, hashed, crossed


def _embedded(features: ClickFeatures, hashed: tf.Tensor,
              crossed: tf.Tensor | None, dim: int,
              initializer: str = "uniform") -> tf.Tensor:
    """The embedding vectors of every feature then every cross: [batch, K + C, dim].

    Each lookup is a gather on its table (row-sparse gradients): per feature
    ``cat_<f>_embedding`` (or one ``shared_embedding`` for all), per cross
    ``cross_<a>_<b>_embedding``."""

    def table(rows: int, name: str) -> keras.layers.Embedding:
        return keras.layers.Embedding(rows, dim, embeddings_initializer=initializer,
                                      name=name)

    if features.shared_buckets:
        parts = [table(features.shared_buckets, "shared_embedding")(hashed)]
    else:
        parts = [table(rows, f"cat_{f}_embedding")(
            Columns(f, f + 1, name=f"cat_{f}_bucket")(hashed))
            for f, rows in enumerate(features.buckets)]
    for c, (a, b) in enumerate(features.crosses):
        parts.append(table(features.cross_buckets, f"cross_{a}_{b}_embedding")(
            Columns(c, c + 1, name=f"cross_{a}_{b}_bucket")(crossed)))
    return parts[0] if len(parts) == 1 else keras.layers.Concatenate(
        axis=1, name="embeddings")(parts)


def _mlp(widths: Sequence[int], inputs: int) -> int:
    """Parameters of dense layers (weights and biases) from ``inputs`` through ``widths``."""
    total = 0
    for width in widths:
        total += inputs * width + width
        inputs = width
    return total


def _check_model(name: str, embedding_dim: int, bottom_units: Sequence[int],
                 top_units: Sequence[int], interaction: str
                 ) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    dim = _positive(name, "embedding_dim", embedding_dim)
    bottom = _sizes(name, "bottom_units", bottom_units)
    top = _sizes(name, "top_units", top_units)
    if interaction not in INTERACTIONS:
        raise ConfigError(f"{name}.interaction must be one of {INTERACTIONS}, got "
                          f"{interaction!r}")
    return dim, bottom, top


def build_dlrm(input_shape: Sequence[Size], num_classes: Size, num_dense: Size = 13,
               buckets: Size | Sequence[Size] = 1000, shared_buckets: Size | None = None,
               embedding_dim: Size = 8, crosses: Sequence[Sequence[int]] = (),
               cross_buckets: Size = 1000, bottom_units: Sequence[Size] = (16,),
               top_units: Sequence[Size] = (16,),
               interaction: Annotated[str, OneOf(*INTERACTIONS)] = "dot",
               dense_mean: float | Sequence[float] | None = None,
               dense_std: float | Sequence[float] | None = None) -> keras.Model:
    """A DLRM click model on raw rows [num_dense counts | K raw ids] (int64).

    Args:
      input_shape: (num_dense + K,).
      num_classes: 2 (no click, click).
      num_dense: leading columns that are counts.
      buckets: hashed buckets (embedding rows) per categorical feature: one number for
        all, or one per feature.
      shared_buckets: if set, every feature hashes into one table of this many rows
        (``shared_embedding``; the feature's salt keeps their ids apart) instead of a
        table each (``cat_<f>_embedding``); ``buckets`` is then unused.
      embedding_dim: width of every embedding and of the bottom MLP's output.
      crosses: pairs (i, j) of categorical features (0-based) crossed, each into a table
        of its own (``cross_<i>_<j>_embedding``).
      cross_buckets: hashed buckets (rows) per cross.
      bottom_units: ReLU layers over the standardised counts, before the projection to
        ``embedding_dim``.
      top_units: ReLU layers over the interaction, before the logit.
      interaction: ``dot`` (pairwise dot products of all vectors, and the bottom
        output) or ``concat`` (all vectors side by side).
      dense_mean: mean of log1p(count) per dense feature (or one for all; default 0).
      dense_std: its standard deviation (default 1); see ``dense_statistics``.

    Returns:
      A functional model: int64 [batch, num_dense + K] -> [batch, 2] probabilities.

    Raises:
      ConfigError: for a bad input width, a cross naming a feature out of range,
        non-positive sizes or an unknown interaction, naming the setting.
    """
    features = _features("build_dlrm", input_shape, num_classes, num_dense, buckets,
                         shared_buckets, crosses, cross_buckets, dense_mean, dense_std)
    dim, bottom_widths, top_widths = _check_model("build_dlrm", embedding_dim, bottom_units,
                                                  top_units, interaction)
    raw, dense, hashed, crossed = _inputs(features)
    bottom = dense
    for i, units in enumerate((*bottom_widths, dim)):
        bottom = keras.layers.Dense(units, activation="relu", name=f"bottom_{i}")(bottom)
    vectors = _embedded(features, hashed, crossed, dim)
    if interaction == "dot":
        stacked = keras.layers.Concatenate(axis=1, name="vectors")(
            [keras.layers.Reshape((1, dim), name="bottom_vector")(bottom), vectors])
        x = keras.layers.Concatenate(name="interaction")(
            [bottom, DotInteraction(name="dot_interaction")(stacked)])
    else:
        x = keras.layers.Concatenate(name="interaction")(
            [bottom, keras.layers.Flatten(name="flat_embeddings")(vectors)])
    for i, units in enumerate(top_widths):
        x = keras.layers.Dense(units, activation="relu", name=f"top_{i}")(x)
    logit = keras.layers.Dense(1, dtype="float32", name="logit")(x)
    return keras.Model(raw, ClickSoftmax(name="predictions", dtype="float32")(logit),
                       name="dlrm")


def build_wide(input_shape: Sequence[Size], num_classes: Size, num_dense: Size = 13,
               buckets: Size | Sequence[Size] = 1000, shared_buckets: Size | None = None,
               crosses: Sequence[Sequence[int]] = (), cross_buckets: Size = 1000,
               dense_mean: float | Sequence[float] | None = None,
               dense_std: float | Sequence[float] | None = None) -> keras.Model:
    """Logistic regression on the features ``build_dlrm`` sees: z = bias + w . dense +
    the weight of each feature's bucket + the weight of each cross's bucket (each a
    1-wide embedding: a weight per bucket, row-sparse like the DLRM's).

    Args:
      input_shape, num_classes, num_dense, buckets, shared_buckets, crosses,
      cross_buckets, dense_mean, dense_std: as for ``build_dlrm``.

    Returns:
      A functional model: int64 [batch, num_dense + K] -> [batch, 2] probabilities.

    Raises:
      ConfigError: as ``build_dlrm``.
    """
    features = _features("build_wide", input_shape, num_classes, num_dense, buckets,
                         shared_buckets, crosses, cross_buckets, dense_mean, dense_std)
    raw, dense, hashed, crossed = _inputs(features)
    weights = RowSum(name="bucket_weights", dtype="float32")(
        _embedded(features, hashed, crossed, 1, "zeros"))
    linear = keras.layers.Dense(1, dtype="float32", kernel_initializer="zeros",
                                name="dense_linear")(dense)
    logit = keras.layers.Add(name="logit", dtype="float32")([linear, weights])
    return keras.Model(raw, ClickSoftmax(name="predictions", dtype="float32")(logit),
                       name="wide")


def dlrm_parameters(input_shape: Sequence[int], num_classes: int = 2, num_dense: int = 13,
                    buckets: int | Sequence[int] = 1000, shared_buckets: int | None = None,
                    embedding_dim: int = 8, crosses: Sequence[Sequence[int]] = (),
                    cross_buckets: int = 1000, bottom_units: Sequence[int] = (16,),
                    top_units: Sequence[int] = (16,), interaction: str = "dot",
                    dense_mean: float | Sequence[float] | None = None,
                    dense_std: float | Sequence[float] | None = None) -> int:
    """The parameters ``build_dlrm`` with these arguments has, by arithmetic alone
    (nothing built or allocated).

    Raises:
      ConfigError: as ``build_dlrm``.
    """
    features = _features("build_dlrm", input_shape, num_classes, num_dense, buckets,
                         shared_buckets, crosses, cross_buckets, dense_mean, dense_std)
    dim, bottom, top = _check_model("build_dlrm", embedding_dim, bottom_units, top_units,
                                    interaction)
    vectors = features.num_categorical + len(features.crosses)
    width = (dim + (vectors + 1) * vectors // 2 if interaction == "dot"
             else dim + vectors * dim)
    return (features.embedding_rows() * dim + _mlp((*bottom, dim), features.num_dense)
            + _mlp((*top, 1), width))


def wide_parameters(input_shape: Sequence[int], num_classes: int = 2, num_dense: int = 13,
                    buckets: int | Sequence[int] = 1000, shared_buckets: int | None = None,
                    crosses: Sequence[Sequence[int]] = (), cross_buckets: int = 1000,
                    dense_mean: float | Sequence[float] | None = None,
                    dense_std: float | Sequence[float] | None = None) -> int:
    """The parameters ``build_wide`` with these arguments has, by arithmetic alone.

    Raises:
      ConfigError: as ``build_wide``.
    """
    features = _features("build_wide", input_shape, num_classes, num_dense, buckets,
                         shared_buckets, crosses, cross_buckets, dense_mean, dense_std)
    return features.embedding_rows() + features.num_dense + 1


def dense_statistics(rows: np.ndarray | Iterable[np.ndarray], num_dense: int = 13
                     ) -> tuple[list[float], list[float]]:
    """The mean and standard deviation of log1p(count) of each dense feature, over raw
    rows (an array, or batches of rows read in turn: a training split streamed from its
    shards), for ``dense_mean`` and ``dense_std``. A constant feature gets std 1.

    Raises:
      ConfigError: if there are no rows, or rows narrower than ``num_dense``.
    """
    batches = [rows] if isinstance(rows, np.ndarray) else rows
    # Chan et al.'s pairwise merge of (count, mean, sum of squared deviations): one pass,
    # and no cancellation (a constant feature's deviation stays exactly 0).
    count, mean, squares = 0, np.zeros(num_dense), np.zeros(num_dense)
    for batch in batches:
        batch = np.asarray(batch)
        if batch.ndim != 2 or batch.shape[1] < num_dense:
            raise ConfigError(f"dense_statistics needs rows of at least num_dense="
                              f"{num_dense} columns, got shape {batch.shape}")
        if not len(batch):
            continue
        x = np.log1p(np.maximum(batch[:, :num_dense].astype(np.float64), 0))
        n, batch_mean = len(x), x.mean(axis=0)
        delta = batch_mean - mean
        squares += ((x - batch_mean) ** 2).sum(axis=0) + delta**2 * count * n / (count + n)
        mean += delta * n / (count + n)
        count += n
    if not count:
        raise ConfigError("dense_statistics needs at least one row")
    std = np.sqrt(squares / count)
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()


# The custom layers a SavedModel of these models holds.
LAYERS = (Columns, RowSum, HashedIds, HashedCrosses, LogStandardize, DotInteraction, ClickSoftmax)
