"""Feature preprocessing that travels inside the model: imputation, outlier clipping,
categorical encoding, feature selection and scaling are fitted on the training split
only, with scikit-learn where it fits, and become the first layers of the model. So the
training pipeline, validation, test, the SavedModel, the MLflow model and TFLite all take
the same raw features, and nothing about them is fitted twice.

Images stored as uint8 get their 1/255 rescaling here too (a Keras ``Rescaling`` layer):
the input pipelines only cast.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range, check, check_types, configured_call
from lmt_tf.data import tokenization
from lmt_tf.data.splits import Splits, holds_text
from lmt_tf.data.tokenization import Tokenizer
from lmt_tf.errors import ConfigError

IMPUTE = ("mean", "median", "constant")
CLIP = ("quantile", "zscore")
SCALE = ("standard", "minmax")
SELECT = ("variance", "mutual_info", "l1")
PREPROCESSING_PREFIX = "preprocess_"  # the names of the layers in front of the model
Quantile = Annotated[float, Range(ge=0, le=1)]
Builder = TypeVar("Builder", bound=Callable[..., Any])


@dataclass
class Preprocessing:
    """What is fitted on the training split and put in front of the model, in this order:
    impute, clip, encode categories, select, scale. Tabular features (one vector per
    example) only; uint8 images are rescaled to [0, 1] whatever is set here."""

    # mean | median | constant (fill_value); categories: mode
    impute: Annotated[str, OneOf(*IMPUTE)] | None = None
    fill_value: float = 0.0
    # quantile (clip_quantiles) | zscore (mean +- clip_z std)
    clip: Annotated[str, OneOf(*CLIP)] | None = None
    clip_quantiles: tuple[Quantile, Quantile] = (0.01, 0.99)  # (low, high)
    clip_z: Annotated[float, Range(gt=0)] = 3.0
    categorical: Sequence[str] = ()  # columns one-hot encoded (train values + 1 unknown)
    # variance (variance_threshold) | mutual_info | l1 (top k)
    select: Annotated[str, OneOf(*SELECT)] | None = None
    k: Annotated[int, Range(ge=1)] | None = None  # features kept by mutual_info and l1
    variance_threshold: Annotated[float, Range(ge=0)] = 0.0
    # C of the L1-penalised logistic regression (smaller: fewer)
    l1_strength: Annotated[float, Range(gt=0)] = 0.1
    # standard (zero mean, unit variance) | minmax ([0, 1])
    scale: Annotated[str, OneOf(*SCALE)] | None = None
    seed: Annotated[int, Range(ge=0)] = 0  # mutual information's neighbour jitter
    # Text: how documents become token ids (the model's first layer); None for numbers
    tokenizer: Tokenizer | None = None
    # Training rows a builder that fits its own arguments (fitting_builder: the click
    # models' count statistics) reads, from the start of the split
    fit_rows: Annotated[int, Range(ge=1)] = 1_000_000

    def __post_init__(self) -> None:
        check_types(self)
        low, high = self.clip_quantiles
        check(low < high, "Preprocessing.clip_quantiles",
              f"must be (low, high) with 0 <= low < high <= 1, got {self.clip_quantiles}")
        check(self.select not in ("mutual_info", "l1") or self.k is not None,
              "Preprocessing.k", f"must be >= 1 for select={self.select!r}, got {self.k}")
        self.clip_quantiles = tuple(self.clip_quantiles)
        self.categorical = tuple(self.categorical)

    @property
    def tabular(self) -> bool:
        """Whether any tabular step is configured."""
        return bool(self.impute or self.clip or self.categorical or self.select or self.scale)

    def fit(self, splits: Splits, model_fn: Callable[..., Any] | None = None
            ) -> FittedPreprocessing:
        """Fits every configured step on ``splits.train`` (and nothing else).

        Args:
          splits: the data.
          model_fn: the model builder; one that brings its own tokenizer
            (``tokenizing_builder``) gets documents as they are.

        Raises:
          ConfigError: for steps that do not fit the data (images, file-backed splits,
            unknown columns, more features asked for than there are), or a tokenizer
            where the model brings its own.
        """
        split = splits.train
        dtype = np.dtype(getattr(split, "x_dtype", None) or split.x.dtype)
        shape = tuple(splits.input_shape)
        if dtype.kind in "OUS" and tokenizes(model_fn):
            return self._leave_text(splits, model_fn)
        if fits_arguments(model_fn):
            return self._fit_builder(splits, model_fn)
        if dtype.kind in "OUS" or self.tokenizer is not None:
            return self._fit_text(splits)
        if not self.impute:
            _refuse_missing(splits)
        if not self.tabular:
            scale = splits.pixel_scale or (1 / 255 if dtype == np.uint8 else None)
            steps = [_step("rescale", scale=scale)] if scale else []
            return FittedPreprocessing(shape, shape, tuple(splits.features), steps)
        check(len(shape) == 1, "Preprocessing",
              f"imputation, clipping, encoding, selection and scaling work on tabular "
              f"features (one vector per example); data {splits.name} has examples of "
              f"shape {shape}")
        check(hasattr(split, "x"), "Preprocessing",
              f"fits on data in memory; data {splits.name} is read from files")
        names = list(splits.features) or [f"x{i}" for i in range(shape[0])]
        unknown = [c for c in self.categorical if c not in names]
        check(not unknown, "Preprocessing.categorical",
              f"{unknown} not among the columns of {splits.name}: {names}")
        return _Fitter(self, np.asarray(split.x, np.float64), np.asarray(split.y),
                       names).run()

    def _fit_builder(self, splits: Splits, model_fn: Callable[..., Any]
                     ) -> FittedPreprocessing:
        """The builder's own fitted arguments (``fitting_builder``), from the first
        ``fit_rows`` training rows streamed a chunk at a time; nothing in front of the
        model (its own layers hold what was fitted).

        Raises:
          ConfigError: if a tabular step or a tokenizer is configured all the same.
        """
        name = getattr(getattr(model_fn, "__wrapped__", model_fn), "__name__", "the model")
        check(not self.tabular and self.tokenizer is None, "Preprocessing",
              f"must not be configured: run_experiment.model {name} fits its own "
              f"feature engineering on the training split")
        shape = tuple(splits.input_shape)
        args = model_fn.fit_arguments(_training_rows(splits.train, self.fit_rows))
        return FittedPreprocessing(shape, shape, tuple(splits.features),
                                   [_step("builder", arguments=args)])

    def _leave_text(self, splits: Splits, model_fn: Callable[..., Any]) -> FittedPreprocessing:
        """Nothing fitted: the model takes the documents and tokenizes them itself.

        Raises:
          ConfigError: if a tokenizer or a tabular step is configured all the same.
        """
        name = getattr(getattr(model_fn, "__wrapped__", model_fn), "__name__", "the model")
        check(self.tokenizer is None, "Preprocessing.tokenizer",
              f"must not be set: run_experiment.model {name} tokenizes documents with its "
              f"source's tokenizer, whose ids its embeddings were trained on (a vocabulary "
              f"fitted on {splits.name} would give them other ids)")
        check(not self.tabular, "Preprocessing",
              f"imputation, clipping, encoding, selection and scaling work on numbers; "
              f"data {splits.name} is text")
        return FittedPreprocessing((), (), (), [], carried=True)

    def _fit_text(self, splits: Splits) -> FittedPreprocessing:
        """The tokenizer fitted on the training documents.

        Raises:
          ConfigError: for text without a tokenizer, a tokenizer without text, or a
            tabular step on text.
        """
        text = holds_text(splits.train)
        check(self.tokenizer is not None or not text, "Preprocessing.tokenizer",
              f"data {splits.name} is text: set Preprocessing.tokenizer = @Tokenizer() "
              f"(include gin/preprocessing/words.gin)")
        check(text, "Preprocessing.tokenizer",
              f"tokenizes documents; data {splits.name} has examples of shape "
              f"{splits.input_shape}")
        check(not self.tabular, "Preprocessing",
              f"imputation, clipping, encoding, selection and scaling work on numbers; "
              f"data {splits.name} is text")
        # File-backed splits (TFRecord shards) are read once for fitting.
        parts = {part: _documents(getattr(splits, part))
                 for part in ("train", "validation", "test")}
        step = self.tokenizer.fit(parts["train"], parts)
        width = step.get("sequence_length") or len(step["vocabulary"]) + 1
        return FittedPreprocessing((), (width,), (), [step])


@dataclass
class FittedPreprocessing:
    """The fitted steps: plain numbers, so they are logged as JSON and rebuilt as layers."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    features: tuple[str, ...]  # names of the output features (tabular data)
    steps: list[dict[str, Any]] = field(default_factory=list)
    # Documents the model tokenizes itself (``tokenizing_builder``): nothing fitted here
    carried: bool = False

    def layers(self) -> list[keras.layers.Layer]:
        """New Keras layers applying the steps, float32 whatever the precision policy."""
        made = []
        for step in self.steps:
            kind = step["kind"]
            name = PREPROCESSING_PREFIX + kind
            if kind == "tokenize":
                made.append(tokenization.tokenize_layer(step, name=name))
            elif kind == "rescale":
                made.append(keras.layers.Rescaling(step["scale"], name=name, dtype="float32"))
            elif kind == "impute":
                made.append(Impute(step["fill"], name=name, dtype="float32"))
            elif kind == "clip":
                made.append(ClipFeatures(step["low"], step["high"], name=name,
                                         dtype="float32"))
            elif kind == "encode":
                made.append(OneHotColumns(step["columns"], step["vocabularies"], name=name,
                                          dtype="float32"))
            elif kind == "select":
                made.append(SelectFeatures(step["keep"], name=name, dtype="float32"))
            elif kind == "scale":
                made.append(keras.layers.Normalization(
                    mean=step["mean"], variance=step["variance"], name=name, dtype="float32"))
        return made

    def as_json(self) -> str:
        return json.dumps({"input_shape": self.input_shape, "output_shape": self.output_shape,
                           "features": self.features, "steps": self.steps}, indent=1)

    @property
    def text(self) -> bool:
        """Whether the model takes documents (its first step tokenizes them)."""
        return bool(self.steps) and self.steps[0]["kind"] == "tokenize"

    def builder_args(self) -> dict[str, Any]:
        """What a model builder needs beyond input shape and classes: the vocabulary
        size (embedding rows) of a tokenizer, or what the builder fitted itself
        (``fitting_builder``)."""
        if self.text and "sequence_length" in self.steps[0]:
            return {"vocabulary_size": len(self.steps[0]["vocabulary"]) + 2}
        if self.steps and self.steps[0]["kind"] == "builder":
            return dict(self.steps[0]["arguments"])
        return {}

    def describe(self) -> str:
        """One line: what the model does to its raw input."""
        if self.carried:
            return "tokenize (the model's own tokenizer, fitted where it was trained)"
        if not self.steps:
            return "none"
        if self.text:
            return "tokenize (" + tokenization.describe(self.steps[0]) + ")"
        if self.steps[0]["kind"] == "builder":
            return "the model's own, fitted on the training split: " + ", ".join(
                self.steps[0]["arguments"])
        kinds = ", ".join(s["kind"] + (f" ({s['how']})" if "how" in s else "")
                          for s in self.steps)
        return f"{kinds}; features {self.input_shape} -> {self.output_shape}"

    def wrap(self, model_fn: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        """``model_fn`` building on the preprocessed features, with the steps in front
        (itself when there are none; given the fitted arguments of a builder that fits
        its own)."""
        if self.steps and self.steps[0]["kind"] == "builder":
            return FittedBuilder(model_fn, self.builder_args())
        return PreprocessedModel(model_fn, self) if self.steps else model_fn


def tokenizing_builder(builder: Builder) -> Builder:
    """Marks a model builder whose models, on text, take the documents and tokenize them
    with a tokenizer they bring (``build_transfer``: its text source's). A run with such
    a builder fits no tokenizer of its own, and refuses one configured all the same."""
    builder.brings_tokenizer = True
    return builder


def fitting_builder(builder: Builder, fit: Callable[[Iterator[np.ndarray]], dict[str, Any]]
                    ) -> Builder:
    """Marks a model builder that fits some of its own arguments on the training split:
    ``fit`` takes the training rows (NumPy batches, streamed) and returns keyword
    arguments for the builder (plain numbers: logged in preprocessing/fitted.json). The
    builder keeps them in its layers, so the exported model holds them (the click
    models' log-count mean and standard deviation)."""
    builder.fit_arguments = fit
    return builder


def fits_arguments(model_fn: Callable[..., Any] | None) -> bool:
    """Whether ``model_fn`` (maybe as gin wraps it) fits arguments of its own."""
    return callable(getattr(model_fn, "fit_arguments", None))


class FittedBuilder:
    """A model builder called with the arguments it fitted on the training split."""

    def __init__(self, model_fn: Callable[..., keras.Model], arguments: dict[str, Any]):
        self.model_fn = model_fn
        self.arguments = arguments

    def __call__(self, input_shape: Sequence[int], num_classes: int) -> keras.Model:
        return configured_call(self.model_fn, "run_experiment.model",
                               input_shape=input_shape, num_classes=num_classes,
                               **self.arguments)


def _training_rows(split: Any, limit: int) -> Iterator[np.ndarray]:
    """Up to ``limit`` rows of ``split`` from its start: in memory, or streamed from its
    files a chunk at a time."""
    x = getattr(split, "x", None)
    if x is not None:
        yield np.asarray(x[:limit])
        return
    seen = 0
    for rows, _ in split.chunks():
        yield rows[:limit - seen]
        seen += len(rows)
        if seen >= limit:
            return


def tokenizes(model_fn: Callable[..., Any] | None) -> bool:
    """Whether ``model_fn`` (maybe as gin wraps it) brings its own tokenizer."""
    return bool(getattr(model_fn, "brings_tokenizer", False))


class PreprocessedModel:
    """A model builder whose models take raw features: the preprocessing layers, then the
    builder's model on their output, as one flat functional model (not a nested one), so
    pruning, clustering and QAT see the builder's layers as before."""

    def __init__(self, model_fn: Callable[..., keras.Model], fitted: FittedPreprocessing):
        self.model_fn = model_fn
        self.fitted = fitted

    def __call__(self, input_shape: Sequence[int], num_classes: int) -> keras.Model:
        extra = self.fitted.builder_args()
        if extra:
            _check_takes(self.model_fn, extra)
        core = configured_call(self.model_fn, "run_experiment.model",
                               input_shape=self.fitted.output_shape, num_classes=num_classes,
                               **extra)
        if not isinstance(core, keras.Model) or not getattr(core, "_is_graph_network", False):
            raise ConfigError("run_experiment.model must build a functional or Sequential "
                              "Keras model to take preprocessing layers in front of it")
        if self.fitted.text:
            raw = keras.Input((), dtype=tf.string, name="text")
        else:
            raw = keras.Input(tuple(input_shape), name=core.input_names[0])
        x = raw
        for layer in self.fitted.layers():
            x = layer(x)
        # The builder's graph replayed on the preprocessed tensor: the same layers. Then
        # cloned (with the same weights: a transferred model's are trained), so that each
        # layer has this graph as its only one and `layer.input` means this model's.
        flat = keras.Model(raw, core.call(x), name=core.name)
        model = keras.models.clone_model(flat)
        _copy_weights(flat, model)
        return model


def _copy_weights(source: keras.Model, target: keras.Model) -> None:
    """``source``'s weights into ``target``'s, variable to variable (shard to shard for
    partitioned ones): never the whole model through this process's memory as
    ``get_weights``/``set_weights`` would (a model's variables on parameter servers), and
    nothing run in a graph (where ``runtime.footprint`` describes a model without
    initialising it)."""
    for to, of in zip(target.weights, source.weights, strict=True):
        for part, value in zip(getattr(to, "variables", None) or [to],
                               getattr(of, "variables", None) or [of], strict=True):
            part.assign(value)


def _check_takes(model_fn: Callable[..., keras.Model], extra: dict[str, Any]) -> None:
    """Raises ConfigError if the builder takes no ``vocabulary_size`` (text needs a
    model that embeds token ids)."""
    target = getattr(model_fn, "__wrapped__", model_fn)
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    missing = [name for name in extra if name not in parameters]
    if missing:
        name = getattr(target, "__name__", repr(target))
        raise ConfigError(f"run_experiment.model: {name} takes no {missing[0]}; text data "
                          f"needs a model that embeds token ids (build_transformer, "
                          f"build_bag_of_embeddings)")


def _documents(split: Any) -> np.ndarray:
    """A split's documents: in memory, or read from its files."""
    x = getattr(split, "x", None)
    return x if x is not None else split.documents()


def _refuse_missing(splits: Splits) -> None:
    """Raises ConfigError if a split in memory holds a missing value (NaN) that no
    imputation will fill: the model would predict NaN for it."""
    for part in ("train", "validation", "test"):
        x = getattr(getattr(splits, part), "x", None)
        if x is None or np.asarray(x).dtype.kind not in "fc":
            continue
        missing = np.isnan(x)
        if missing.any():
            at = tuple(int(i) for i in np.argwhere(missing)[0])
            feature = (repr(splits.features[at[1]]) if len(at) == 2
                       and at[1] < len(splits.features) else str(at[1:] if len(at) > 2
                                                                 else at[1]))
            raise ConfigError(f"data {splits.name}: the {part} features hold "
                              f"{int(missing.sum())} missing values (NaN), e.g. example "
                              f"{at[0]}, feature {feature}: set Preprocessing.impute")


def _step(kind: str, **values: Any) -> dict[str, Any]:
    return {"kind": kind, **values}


class _Fitter:
    """Fits the steps one after the other, each on the training features as the steps
    before it leave them."""

    def __init__(self, config: Preprocessing, x: np.ndarray, y: np.ndarray, names: list[str]):
        self.config, self.x, self.y, self.names = config, x, y, names
        self.steps: list[dict[str, Any]] = []

    def run(self) -> FittedPreprocessing:
        width = self.x.shape[1]
        categorical = [self.names.index(c) for c in self.config.categorical]
        if self.config.impute:
            self._impute(categorical)
        if self.config.clip:
            self._clip(categorical)
        if categorical:
            self._encode(categorical)
        if self.config.select:
            self._select()
        if self.config.scale:
            self._scale()
        return FittedPreprocessing((width,), (self.x.shape[1],), tuple(self.names), self.steps)

    def _impute(self, categorical: list[int]) -> None:
        from sklearn.impute import SimpleImputer

        how = self.config.impute
        imputer = SimpleImputer(strategy=how, fill_value=self.config.fill_value,
                                keep_empty_features=True).fit(self.x)
        fill = imputer.statistics_.astype(np.float64)
        if categorical:  # a category's missing value becomes its most frequent one
            modes = SimpleImputer(strategy="most_frequent", keep_empty_features=True).fit(
                self.x[:, categorical]).statistics_
            fill[categorical] = modes
        self.x = np.where(np.isnan(self.x), fill, self.x)
        self.steps.append(_step("impute", how=how, fill=fill.tolist()))

    def _clip(self, categorical: list[int]) -> None:
        how = self.config.clip
        if how == "quantile":
            low, high = np.quantile(self.x, self.config.clip_quantiles, axis=0)
        else:
            mean, std = self.x.mean(axis=0), self.x.std(axis=0)
            low, high = mean - self.config.clip_z * std, mean + self.config.clip_z * std
        low[categorical], high[categorical] = -np.inf, np.inf  # categories are not clipped
        self.x = np.clip(self.x, low, high)
        self.steps.append(_step("clip", how=how, low=_finite(low), high=_finite(high)))

    def _encode(self, categorical: list[int]) -> None:
        vocabularies = [np.unique(self.x[:, c]).tolist() for c in categorical]
        layer = OneHotColumns(categorical, vocabularies)
        self.x = layer(tf.constant(self.x, tf.float32)).numpy().astype(np.float64)
        kept = [n for i, n in enumerate(self.names) if i not in categorical]
        for column, vocabulary in zip(categorical, vocabularies, strict=True):
            name = self.names[column]
            kept += [f"{name}={v:g}" for v in vocabulary] + [f"{name}=?"]
        self.names = kept
        self.steps.append(_step("encode", columns=categorical, vocabularies=vocabularies))

    def _select(self) -> None:
        from sklearn import feature_selection

        how, k, width = self.config.select, self.config.k, self.x.shape[1]
        if how in ("mutual_info", "l1"):
            check(k <= width, "Preprocessing.k",
                  f"asks for {k} features, but there are {width}")
        if how == "variance":
            keep = feature_selection.VarianceThreshold(self.config.variance_threshold) \
                .fit(self.x).get_support(indices=True)
        elif how == "mutual_info":
            def score(x: np.ndarray, y: np.ndarray) -> np.ndarray:
                return feature_selection.mutual_info_classif(
                    x, y, random_state=self.config.seed)

            keep = feature_selection.SelectKBest(score, k=k).fit(self.x, self.y) \
                .get_support(indices=True)
        else:
            keep = _l1_selection(self.x, self.y, k, self.config.l1_strength, self.config.seed)
        check(len(keep) > 0, f"Preprocessing.select = {how!r}", "kept no feature")
        keep = sorted(int(i) for i in keep)
        self.x = self.x[:, keep]
        self.names = [self.names[i] for i in keep]
        self.steps.append(_step("select", how=how, keep=keep,
                                kept=list(self.names)))

    def _scale(self) -> None:
        how = self.config.scale
        if how == "standard":
            mean, variance = self.x.mean(axis=0), self.x.var(axis=0)
        else:  # min-max as a Normalization: (x - min) / (max - min)
            mean = self.x.min(axis=0)
            variance = (self.x.max(axis=0) - mean) ** 2
        variance = np.where(variance > 0, variance, 1.0)  # constant features stay put
        self.x = (self.x - mean) / np.sqrt(variance)
        self.steps.append(_step("scale", how=how, mean=mean.tolist(),
                                variance=variance.tolist()))


def _l1_selection(x: np.ndarray, y: np.ndarray, k: int, strength: float,
                  seed: int) -> np.ndarray:
    """The k features with the largest weights of an L1-penalised logistic regression on
    standardised features (scikit-learn's SelectFromModel)."""
    from sklearn.feature_selection import SelectFromModel
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    standard = StandardScaler().fit_transform(x)
    model = LogisticRegression(l1_ratio=1.0, C=strength, solver="liblinear",
                               random_state=seed, max_iter=1000)
    selector = SelectFromModel(model, max_features=k, threshold=-np.inf).fit(standard, y)
    return selector.get_support(indices=True)


def _finite(values: np.ndarray) -> list[float]:
    """JSON has no infinity: the float32 limits stand for it."""
    limit = float(np.finfo(np.float32).max)
    return np.clip(values, -limit, limit).tolist()


@keras.saving.register_keras_serializable(package="lmt")
class Impute(keras.layers.Layer):
    """Missing values (NaN) become each feature's fitted fill value."""

    def __init__(self, fill: Sequence[float], **kwargs: Any):
        super().__init__(**kwargs)
        self.fill = [float(v) for v in fill]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        fill = tf.constant(self.fill, x.dtype)
        return tf.where(tf.math.is_nan(x), tf.broadcast_to(fill, tf.shape(x)), x)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fill": self.fill}


@keras.saving.register_keras_serializable(package="lmt")
class ClipFeatures(keras.layers.Layer):
    """Each feature clipped to its fitted [low, high]."""

    def __init__(self, low: Sequence[float], high: Sequence[float], **kwargs: Any):
        super().__init__(**kwargs)
        self.low, self.high = [float(v) for v in low], [float(v) for v in high]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.minimum(tf.maximum(x, tf.constant(self.low, x.dtype)),
                          tf.constant(self.high, x.dtype))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "low": self.low, "high": self.high}


@keras.saving.register_keras_serializable(package="lmt")
class OneHotColumns(keras.layers.Layer):
    """The other columns as they are, then each categorical column as a one-hot block over
    its training values plus one slot for a value not seen in training."""

    def __init__(self, columns: Sequence[int], vocabularies: Sequence[Sequence[float]],
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.columns = [int(c) for c in columns]
        self.vocabularies = [[float(v) for v in vocabulary] for vocabulary in vocabularies]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        width = x.shape[-1]
        rest = [i for i in range(width) if i not in self.columns]
        parts = [tf.gather(x, rest, axis=-1)]
        for column, vocabulary in zip(self.columns, self.vocabularies, strict=True):
            value = x[:, column : column + 1]
            hot = tf.cast(tf.equal(value, tf.constant([vocabulary], x.dtype)), x.dtype)
            unknown = 1 - tf.reduce_sum(hot, axis=-1, keepdims=True)
            parts += [hot, unknown]
        return tf.concat(parts, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "columns": self.columns,
                "vocabularies": self.vocabularies}


@keras.saving.register_keras_serializable(package="lmt")
class SelectFeatures(keras.layers.Layer):
    """The selected features, in their original order."""

    def __init__(self, keep: Sequence[int], **kwargs: Any):
        super().__init__(**kwargs)
        self.keep = [int(i) for i in keep]

    def call(self, x: tf.Tensor) -> tf.Tensor:
        return tf.gather(x, self.keep, axis=-1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "keep": self.keep}


# lmt's own preprocessing layers (besides Keras' Rescaling and Normalization).
LAYERS = (Impute, ClipFeatures, OneHotColumns, SelectFeatures)
