"""The in-memory form every data source returns: three labelled splits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from lmt_tf.checks import Annotated, Range
from lmt_tf.errors import ConfigError, DataError

# The settings data sources share, with their ranges.
Fraction = Annotated[float, Range(ge=0, lt=1)]  # of all examples, held out
Count = Annotated[int, Range(ge=0)]  # examples held out
Seed = Annotated[int, Range(ge=0)]  # NumPy takes no negative seeds


@dataclass(frozen=True)
class Split:
    """Examples and integer labels of one split."""

    x: np.ndarray  # (n, ...) features; uint8 images or float32
    y: np.ndarray  # (n,) int labels in [0, num_classes)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} examples but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def sample(self, count: int) -> np.ndarray:
        """The first ``count`` feature rows, e.g. as an input example of an export."""
        return self.x[:count]

    # The input pipelines live in pipeline.py, which imports TensorFlow.
    def train_input_fn(self, plan, seed: int, start_epoch: int, input_config=None,
                       start_step: int = 0):
        """See ``pipeline.array_train_input_fn``; ``input_config`` is an InputConfig."""
        from lmt_tf.data.pipeline import array_train_input_fn

        policy = input_config.auto_shard_policy if input_config else "AUTO"
        bucket = input_config.bucket_by_length if input_config else 0
        return array_train_input_fn(self, plan, seed, start_epoch, policy, start_step, bucket)

    def eval_dataset(self, global_batch_size: int):
        """See ``pipeline.array_eval_dataset``."""
        from lmt_tf.data.pipeline import array_eval_dataset

        return array_eval_dataset(self, global_batch_size)


@dataclass(frozen=True)
class Splits:
    """A data set divided into train, validation and test splits: ``Split`` arrays in
    memory, or file-backed splits with the same methods (``TFRecordSplit``)."""

    name: str
    train: Split
    validation: Split
    test: Split
    num_classes: int
    source: str = ""  # where the data came from: a file, a directory, a package's loader
    features: tuple[str, ...] = ()  # names of tabular feature columns, where known
    # Images: the factor that brings raw pixel values to [0, 1], applied inside the model
    # (None: 1/255 for uint8 images, else nothing).
    pixel_scale: float | None = None
    # Classification: each class's name, in label order (the model's output columns);
    # empty where a source knows none (then the label ids are the names).
    class_names: tuple[str, ...] = ()
    # Numbers a run is measured against, known from how the data were made (a synthetic
    # source's Bayes-optimal test log-loss, its click rate): logged as metrics data/<name>.
    reference: Mapping[str, float] = field(default_factory=dict)

    def digest(self) -> str:
        """A fingerprint of the data: SHA-256 (first 16 hex digits) of every in-memory
        split's examples and labels; of a file-backed split's file names and counts (and
        the files' SHA-256, where its manifest lists them)."""
        sha = hashlib.sha256()
        for part in (self.train, self.validation, self.test):
            if isinstance(part, Split) and is_text(part.x):
                sha.update(_text_bytes(part.x))
                sha.update(np.ascontiguousarray(part.y).tobytes())
            elif isinstance(part, Split):
                sha.update(np.ascontiguousarray(part.x).tobytes())
                sha.update(np.ascontiguousarray(part.y).tobytes())
            else:
                sha.update(repr((getattr(part, "files", ()), getattr(part, "counts", ())))
                           .encode())
                sha.update("".join(getattr(part, "checksums", ())).encode())
        return sha.hexdigest()[:16]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.example_shape

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test)}

    def validate(self) -> Splits:
        """Checks what training relies on, before it starts: at least one feature and
        one example in each split (validation may be empty only if held out as 0), one
        example shape throughout, no infinite feature (NaN is a missing value, for
        ``Preprocessing.impute``), and for classification (``num_classes`` > 1) integer
        labels in ``[0, num_classes)``, for a regression finite targets. File-backed
        splits check their labels as their files are verified (``load_tfrecords``).

        Raises:
          DataError: naming the data set (its source), the split, the example, the
            feature and the value that is wrong.
        """
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise DataError(f"data {self.name}: num_classes must be a positive integer, "
                            f"got {self.num_classes!r}")
        for part in ("train", "validation", "test"):
            split = getattr(self, part)
            if len(split) == 0 and part != "validation":
                raise DataError(f"data {self.name}: the {part} split has no examples")
            shape = split.example_shape
            if not shape and holds_text(split):
                pass  # documents: one string each
            elif not shape or int(np.prod(shape)) < 1:
                raise DataError(f"data {self.name}: {part} examples have shape {shape}; "
                                f"at least one feature is needed")
            if shape != self.input_shape:
                raise DataError(f"data {self.name}: {part} examples have shape {shape}, "
                                f"train examples {self.input_shape}")
            if isinstance(split, Split) and len(split):
                where = f"data {self.name}{f' ({self.source})' if self.source else ''}: {part}"
                _check_features(split.x, self.features, where)
                _check_labels(split.y, self.num_classes, where)
        if self.class_names and len(self.class_names) != self.num_classes:
            raise DataError(f"data {self.name}: {len(self.class_names)} class names for "
                            f"{self.num_classes} classes")
        twice = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
        if twice:  # they name the served model's output columns
            raise DataError(f"data {self.name}: class name {twice[0]!r} names more than one "
                            f"class")
        return self

    def class_name(self, label: int) -> str:
        """The name of class ``label`` (its id where the source names none)."""
        return self.class_names[label] if self.class_names else str(label)


def is_text(x: np.ndarray) -> bool:
    """Whether examples ``x`` are documents (strings) rather than numbers."""
    return np.asarray(x).dtype.kind in "OUS"


def holds_text(split: object) -> bool:
    """Whether a split (in memory, or file-backed with an ``x_dtype``) holds documents."""
    x = getattr(split, "x", None)
    if x is not None:
        return is_text(x)
    return np.dtype(getattr(split, "x_dtype", "float32")).kind in "OUS"


def _text_bytes(x: np.ndarray) -> bytes:
    """What a fingerprint of documents hashes: each one's UTF-8, length-prefixed."""
    sha = hashlib.sha256()
    for doc in x:
        data = str(doc).encode("utf-8")
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.digest()


def _check_features(x: np.ndarray, names: tuple[str, ...], where: str) -> None:
    """Raises DataError at the first infinite feature value (integers cannot be), or the
    first empty document of text."""
    x = np.asarray(x)
    if is_text(x):
        empty = [i for i, doc in enumerate(x) if not isinstance(doc, str) or not doc.strip()]
        if empty:
            raise DataError(f"{where} example {empty[0]}: {x[empty[0]]!r} is not a "
                            f"non-empty document ({len(empty)} in all)")
        return
    if x.dtype.kind not in "fc":
        return
    infinite = np.isinf(x)
    if infinite.any():
        at = tuple(int(i) for i in np.argwhere(infinite)[0])
        raise DataError(f"{where} example {at[0]}, feature {_feature(at, names)}: {x[at]} "
                        f"is not a finite number ({int(infinite.sum())} in all)")


def _feature(at: tuple[int, ...], names: tuple[str, ...]) -> str:
    """The feature of the element ``at`` (example first): its name where known."""
    if len(at) == 2:
        return repr(names[at[1]]) if at[1] < len(names) else str(at[1])
    return str(at[1:])


def not_class_ids(y: np.ndarray) -> np.ndarray:
    """Which of the float labels ``y`` no class id can be: not finite, not whole, or
    beyond the integers a float holds exactly (2**53)."""
    y = np.asarray(y, np.float64)
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(y) | (np.mod(y, 1) != 0) | (np.abs(y) >= 2.0 ** 53)


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    """Raises DataError at the first label that is not a class id in [0, num_classes)
    (``num_classes`` 1, a regression: not a finite number)."""
    y = np.asarray(y)
    if num_classes == 1:
        bad = ~np.isfinite(y) if y.dtype.kind in "fc" else np.zeros(len(y), bool)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where} example {i}: target {y[i]} is not a finite number")
        return
    if y.dtype.kind in "fc":
        fractional = not_class_ids(y)
        if fractional.any():
            i = int(np.flatnonzero(fractional)[0])
            raise DataError(f"{where} example {i}: label {y[i]} is not a class id (labels "
                            f"are integers in [0, {num_classes})); {int(fractional.sum())} "
                            f"in all")
    elif y.dtype.kind not in "iub":
        raise DataError(f"{where} labels must be integer class ids for {num_classes} "
                        f"classes, got {y.dtype} values such as {y[:3].tolist()}")
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        bad = y[outside]
        raise DataError(f"{where} has labels outside [0, {num_classes}): "
                        f"{len(bad)} such as {bad[:3].tolist()} (example "
                        f"{int(np.flatnonzero(outside)[0])})")


def hold_out(train: Split, size: int | float, seed: int) -> tuple[Split, Split]:
    """Splits ``train`` into (rest, held-out) with a seeded permutation.

    Args:
      train: the examples to divide.
      size: number of held-out examples, or a fraction in (0, 1).
      seed: seed of the permutation; the same seed gives the same division.

    Raises:
      ConfigError: if ``size`` leaves no training examples or is negative.
    """
    n = len(train)
    count = int(round(size * n)) if isinstance(size, float) and size < 1 else int(size)
    if not 0 <= count < n:
        raise ConfigError(f"a hold-out of {size!r} is not possible from {n} examples")
    order = np.random.default_rng(seed).permutation(n)
    rest, held = np.sort(order[: n - count]), np.sort(order[n - count :])
    return Split(train.x[rest], train.y[rest]), Split(train.x[held], train.y[held])


def three_way(data: Split, name: str, num_classes: int, validation_fraction: float,
              test_fraction: float, seed: int, source: str = "",
              features: tuple[str, ...] = (), class_names: tuple[str, ...] = ()) -> Splits:
    """``data`` divided into train, validation and test splits by seeded hold-outs of
    the given fractions of all examples."""
    for label, value in (("validation_fraction", validation_fraction),
                         ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{label} must be in [0, 1), got {value!r}")
    n = len(data)
    rest, test = hold_out(data, int(round(test_fraction * n)), seed)
    train, val = hold_out(rest, int(round(validation_fraction * n)), seed + 1)
    return Splits(name, train, val, test, num_classes, source, features,
                  class_names=class_names)
