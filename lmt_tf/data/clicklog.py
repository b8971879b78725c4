"""A synthetic click log with a known optimum, so that a click model's quality can be
measured without outside data: dense counts and Zipf-distributed categorical ids, labels
drawn from a known logistic model, written as sharded TFRecords with the Bayes-optimal
log-loss and AUC of its own test split.

Each example is one int64 row of D + K columns (the issue 21 contract): D dense features,
non-negative counts (geometric, per-feature means from 1 to 1,000, like Criteo's 13
integer features), then K categorical ids in [0, 2**40) (unhashed). Feature k's ids are
the ranks 1..V_k of a Zipf law over a bounded vocabulary, drawn by the inverse CDF of a
continuous power law and mapped to ids by a 40-bit bijective mixing, so they look random
and no per-id table exists. The label is Bernoulli(sigmoid(z)) with the true logit

    z = bias + sum_k w_k(id_k) + sum_j u_j * g_j(count_j) + sum_(a,b) w_ab(id_a, id_b)

where w_k(id) and w_ab(id_a, id_b) are Gaussian numbers computed from (seed, feature,
id) by a 64-bit hash, never stored (a vocabulary of 10^7 ids per feature costs no
memory), u_j fixed Gaussian weights, and g_j the standardized log1p of a count. A linear
model of the single features cannot represent the crosses w_ab; a model with the crossed
features (or interactions of embeddings) can approach the optimum with enough data.

Every random draw of row i of a split is output i of a SplitMix64 stream keyed by
(seed, split, what is drawn): the rows are the same whatever the chunk size, and the
same config gives byte-identical shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmt_tf.checks import Annotated, Range, check, check_types
from lmt_tf.data.splits import Splits
from lmt_tf.data.tfrecord import (
    MANIFEST,
    ShardWriter,
    load_tfrecords,
    manifest_header,
    write_manifest,
)
from lmt_tf.errors import ConfigError, DataError

# Distinct values of the 26 categorical features of Criteo's Kaggle display-advertising
# challenge data (train.txt), as DLRM's data loader counts them: the default vocabularies.
CRITEO_CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683,
                        8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18,
                        15, 286181, 105, 142572)
CLASS_NAMES = ("no_click", "click")
ID_BITS = 40  # raw ids are in [0, 2**ID_BITS)
CHUNK_ROWS = 1 << 16  # rows generated, encoded and written at a time
AUC_BINS = 1 << 20  # histogram bins of the true probability for the streaming AUC
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds
GENERATOR = "load_clicklog"  # the manifest's "generator" names the function that wrote it

_SPLITS = {"train": 0, "validation": 1, "test": 2}
# What a stream draws (its key's second part), so no two draws share a stream.
_DENSE, _CATEGORICAL, _LABEL, _ID, _WEIGHT, _CROSS, _DENSE_WEIGHT = range(1, 8)
_U64 = np.uint64
_MASK40 = _U64((1 << ID_BITS) - 1)
_GOLDEN = _U64(0x9E3779B97F4A7C15)  # SplitMix64's increment


@dataclass
class ClickLogConfig:
    """The settings of a synthetic click log: its size, its features and the logistic
    model its labels are drawn from. The same settings give the same bytes."""

    train_examples: Annotated[int, Range(ge=1)] = 1_000_000
    validation_examples: Annotated[int, Range(ge=0)] = 100_000
    test_examples: Annotated[int, Range(ge=1)] = 100_000
    dense_features: Annotated[int, Range(ge=0)] = 13  # counts, columns 0..D-1
    categorical_features: Annotated[int, Range(ge=1)] = 26  # ids, columns D..D+K-1
    # Distinct ids of each categorical feature (Zipf ranks 1..V); () takes Criteo's
    # cardinalities (CRITEO_CARDINALITIES, repeated if there are more than 26 features).
    vocabulary_sizes: tuple[Annotated[int, Range(ge=1, le=1 << ID_BITS)], ...] = ()
    # s of the Zipf law: P(rank r) ~ r**-s; near 1 as in click logs
    zipf_exponent: Annotated[float, Range(gt=0, le=4)] = 1.05
    # Pairs of categorical features (0-based, among the K) whose ids interact: each pair
    # adds a weight per pair of ids to the logit.
    crosses: tuple[tuple[int, int], ...] = ((0, 1), (4, 5), (10, 12), (17, 18))
    bias: float = -1.8  # the logit's constant: sets the click rate (0.245 by default)
    categorical_scale: Annotated[float, Range(ge=0)] = 0.22  # sd of each id's weight
    cross_scale: Annotated[float, Range(ge=0)] = 0.5  # sd of each pair of ids' weight
    dense_scale: Annotated[float, Range(ge=0)] = 0.2  # sd of each dense feature's weight
    seed: Annotated[int, Range(ge=0, lt=1 << 63)] = 0
    shards: Annotated[int, Range(ge=1)] = 8  # TFRecord files per split

    def __post_init__(self) -> None:
        check_types(self)
        self.vocabulary_sizes = tuple(int(v) for v in self.vocabulary_sizes)
        self.crosses = tuple((int(a), int(b)) for a, b in self.crosses)
        k = self.categorical_features
        check(not self.vocabulary_sizes or len(self.vocabulary_sizes) == k,
              "ClickLogConfig.vocabulary_sizes",
              f"must give one size per categorical feature ({k}) or be () for Criteo's, "
              f"got {len(self.vocabulary_sizes)}")
        for a, b in self.crosses:
            check(0 <= a < k and 0 <= b < k and a != b, "ClickLogConfig.crosses",
                  f"must be pairs of two different categorical features in [0, {k}), "
                  f"got ({a}, {b})")
        sizes = [n for n in (self.train_examples, self.validation_examples,
                             self.test_examples) if n]
        check(self.shards <= min(sizes), "ClickLogConfig.shards",
              f"must be at most the {min(sizes):,} examples of the smallest split, got "
              f"{self.shards}")

    def vocabularies(self) -> tuple[int, ...]:
        """Each categorical feature's vocabulary size, the default resolved."""
        if self.vocabulary_sizes:
            return self.vocabulary_sizes
        k = self.categorical_features
        return (CRITEO_CARDINALITIES * (k // len(CRITEO_CARDINALITIES) + 1))[:k]

    def examples(self, split: str) -> int:
        """The number of examples of ``split``."""
        return getattr(self, f"{split}_examples")

    def feature_names(self) -> tuple[str, ...]:
        """Criteo's column names: I1.. for counts, C1.. for categorical ids."""
        return (tuple(f"I{j + 1}" for j in range(self.dense_features))
                + tuple(f"C{k + 1}" for k in range(self.categorical_features)))

    def as_json(self) -> dict[str, Any]:
        """The settings as the manifest records them (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# 64-bit hashing (NumPy's uint64 arithmetic wraps, as these functions need).

def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection of 64-bit words with full avalanche."""
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _key(*parts: int) -> np.uint64:
    """A stream's key: the parts folded through the mixer."""
    h = _U64(0x243F6A8885A308D3)
    with np.errstate(over="ignore"):
        for part in parts:
            h = _mix(np.asarray(h ^ _U64(part) + _GOLDEN))[()]
    return h


def _stream(key: np.uint64, rows: np.ndarray) -> np.ndarray:
    """Outputs ``rows`` of the SplitMix64 stream seeded with ``key``."""
    return _mix(key + rows * _GOLDEN)


def _uniform(h: np.ndarray) -> np.ndarray:
    """Uniform numbers in (0, 1] from 53 bits of each hash (never 0: they go into log)."""
    return ((h >> _U64(11)).astype(np.float64) + 1.0) * 2.0 ** -53


def _gaussian(h: np.ndarray) -> np.ndarray:
    """Standard normal numbers, by Box-Muller from the two 32-bit halves of each hash."""
    radius = np.sqrt(-2.0 * np.log(((h >> _U64(32)).astype(np.float64) + 1.0) * 2.0 ** -32))
    return radius * np.cos(2 * np.pi * (h & _U64(0xFFFFFFFF)).astype(np.float64) * 2.0 ** -32)


def _permute40(x: np.ndarray) -> np.ndarray:
    """A bijection of [0, 2**40): xor-shifts and odd multipliers modulo 2**40."""
    x = ((x ^ (x >> _U64(20))) * _U64(0xD6E8FEB86659FD93)) & _MASK40
    x = ((x ^ (x >> _U64(17))) * _U64(0xA0761D6478BD642F)) & _MASK40
    return x ^ (x >> _U64(21))


def zipf_ranks(u: np.ndarray, vocabulary: int, exponent: float) -> np.ndarray:
    """Ranks in 1..vocabulary: the inverse CDF at ``u`` (in (0, 1]) of a continuous power
    law t**-exponent on [1, vocabulary + 1), rounded down."""
    span = np.log(vocabulary + 1.0)
    if abs(1.0 - exponent) < 1e-9:
        t = np.exp(u * span)
    else:  # log1p/expm1 keep it exact for exponents near 1
        a = 1.0 - exponent
        t = np.exp(np.log1p(u * np.expm1(a * span)) / a)
    return np.clip(np.floor(t), 1, vocabulary).astype(np.uint64)


def zipf_top_share(vocabulary: int, exponent: float) -> float:
    """The probability of rank 1 under ``zipf_ranks``: what the top id's frequency is."""
    if abs(1.0 - exponent) < 1e-9:
        return math.log(2.0) / math.log(vocabulary + 1.0)
    a = 1.0 - exponent
    return math.expm1(a * math.log(2.0)) / math.expm1(a * math.log(vocabulary + 1.0))


def _log_count_moments(mean: float) -> tuple[float, float]:
    """Mean and sd of log1p(C) for C geometric on {0, 1, ...} with ``mean``, summed over
    the support until the tail is below 1e-17."""
    q = 1.0 / (1.0 + mean)
    k = np.arange(int(math.log(1e-17) / math.log1p(-q)) + 2, dtype=np.float64)
    pmf = q * np.exp(k * math.log1p(-q))
    values = np.log1p(k)
    mu = float(np.sum(pmf * values))
    return mu, float(np.sqrt(np.sum(pmf * (values - mu) ** 2)))


class ClickTruth:
    """The known model of a ``ClickLogConfig``: its rows, and the true logit of any row."""

    def __init__(self, config: ClickLogConfig):
        self.config = config
        d, seed = config.dense_features, config.seed
        self.vocabularies = config.vocabularies()
        self.dense_means = np.geomspace(1.0, 1000.0, d) if d > 1 else np.full(d, 10.0)
        moments = [_log_count_moments(m) for m in self.dense_means]
        self.log_count_mean = np.array([m for m, _ in moments])
        self.log_count_sd = np.array([s for _, s in moments])
        self.dense_weights = config.dense_scale * np.array(
            [_gaussian(np.asarray(_key(seed, _DENSE_WEIGHT, j)))[()] for j in range(d)])
        self._id_keys = [_key(seed, _ID, k) & _MASK40 for k in range(config.categorical_features)]
        self._weight_keys = [_key(seed, _WEIGHT, k) for k in range(config.categorical_features)]
        self._cross_keys = [_key(seed, _CROSS, c) for c in range(len(config.crosses))]

    def _draws(self, split: str, what: int, feature: int, rows: np.ndarray) -> np.ndarray:
        return _stream(_key(self.config.seed, _SPLITS[split], what, feature), rows)

    def rows(self, split: str, start: int, count: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``start .. start + count - 1`` of ``split``.

        Returns:
          (x, y, z): x int64 (count, D + K) raw features, y int64 labels in {0, 1}, z the
          true logits (float64).
        """
        c, d = self.config, self.config.dense_features
        rows = np.arange(start, start + count, dtype=np.uint64)
        x = np.empty((count, d + c.categorical_features), np.int64)
        with np.errstate(over="ignore"):
            for j in range(d):
                u = _uniform(self._draws(split, _DENSE, j, rows))
                x[:, j] = np.floor(np.log(u) / math.log1p(-1.0 / (1.0 + self.dense_means[j])))
            for k, vocabulary in enumerate(self.vocabularies):
                u = _uniform(self._draws(split, _CATEGORICAL, k, rows))
                ranks = zipf_ranks(u, vocabulary, c.zipf_exponent)
                x[:, d + k] = _permute40((ranks - _U64(1)) ^ self._id_keys[k]).astype(np.int64)
            z = self.logit(x)
            u = _uniform(self._draws(split, _LABEL, 0, rows)) - 2.0 ** -53  # [0, 1)
        return x, (u < _sigmoid(z)).astype(np.int64), z

    def logit(self, x: np.ndarray) -> np.ndarray:
        """The true logit of raw rows ``x`` (int64, (n, D + K)): the optimum's score."""
        c, d = self.config, self.config.dense_features
        x = np.asarray(x)
        z = np.full(len(x), c.bias, np.float64)
        ids = x[:, d:].astype(np.uint64)
        with np.errstate(over="ignore"):
            if d:
                g = (np.log1p(x[:, :d].astype(np.float64)) - self.log_count_mean) \
                    / self.log_count_sd
                z += g @ self.dense_weights
            for k, key in enumerate(self._weight_keys):
                z += c.categorical_scale * _gaussian(_mix(ids[:, k] ^ key))
            for (a, b), key in zip(c.crosses, self._cross_keys, strict=True):
                z += c.cross_scale * _gaussian(_mix(_mix(ids[:, a] ^ key) ^ ids[:, b]))
        return z

    def probability(self, x: np.ndarray) -> np.ndarray:
        """The true click probability of raw rows ``x``."""
        return _sigmoid(self.logit(x))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warning for large |z|


class OptimumMeter:
    """Streaming quality of the true probabilities on one split: the exact log-loss (a
    sum), the click rate, and the AUC from a histogram of the probabilities in
    ``AUC_BINS`` bins, so no split is held in memory. A click and a non-click in one bin
    count half a correctly ordered pair; ``auc_error`` bounds what that costs (about
    1e-6 whatever the number of rows)."""

    def __init__(self) -> None:
        self.rows = 0
        self.clicks = 0
        self._loss_sums: list[float] = []
        self._positives = np.zeros(AUC_BINS, np.int64)
        self._negatives = np.zeros(AUC_BINS, np.int64)

    def add(self, y: np.ndarray, z: np.ndarray) -> None:
        """Adds labels ``y`` (0/1) with their true logits ``z``."""
        clicked = y.astype(bool)
        # -log p = log(1 + e^-z); -log(1 - p) = log(1 + e^z)
        self._loss_sums.append(float(np.sum(np.where(clicked, np.logaddexp(0.0, -z),
                                                     np.logaddexp(0.0, z)))))
        bins = np.minimum((_sigmoid(z) * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        self._positives += np.bincount(bins[clicked], minlength=AUC_BINS)
        self._negatives += np.bincount(bins[~clicked], minlength=AUC_BINS)
        self.rows += len(y)
        self.clicks += int(clicked.sum())

    @property
    def logloss(self) -> float:
        """The mean log-loss of the true probabilities."""
        return math.fsum(self._loss_sums) / max(self.rows, 1)

    @property
    def click_rate(self) -> float:
        return self.clicks / max(self.rows, 1)

    @property
    def auc(self) -> float:
        """P(a click's probability > a non-click's), ties half."""
        positives, negatives = self._positives, self._negatives
        below = np.cumsum(negatives) - negatives  # non-clicks in lower bins
        pairs = int(positives.sum()) * int(negatives.sum())
        if not pairs:
            return float("nan")
        won = int(np.sum(positives * below)) + 0.5 * int(np.sum(positives * negatives))
        return won / pairs

    @property
    def auc_error(self) -> float:
        """The most ``auc`` can differ from the exact AUC: half the share of
        (click, non-click) pairs that share a bin."""
        pairs = int(self._positives.sum()) * int(self._negatives.sum())
        return 0.5 * int(np.sum(self._positives * self._negatives)) / pairs if pairs \
            else 0.0


def write_clicklog(config: ClickLogConfig, directory: str | Path,
                   chunk_rows: int = CHUNK_ROWS,
                   echo: Callable[[str], None] = print) -> Path:
    """Generates the click log of ``config`` into ``directory`` as ``write_shards`` lays
    out shards, chunk by chunk, with the reference numbers in the manifest:
    ``bayes_{test,validation}_{logloss,auc}`` and each split's ``*_click_rate``.

    Args:
      config: the settings.
      directory: a new or empty directory.
      chunk_rows: rows generated at a time (memory; the rows do not depend on it).
      echo: where progress lines go.

    Returns:
      The path of the manifest, written last.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    truth = ClickTruth(config)
    width = config.dense_features + config.categorical_features
    reference: dict[str, float] = {}
    manifest = manifest_header("clicklog", 2, (width,), "int64", "int64",
                               config.feature_names(), None, CLASS_NAMES)
    for split in _SPLITS:
        total, started, shown = config.examples(split), time.monotonic(), time.monotonic()
        meter = OptimumMeter()
        with ShardWriter(root, split, config.shards) as writer:
            for start in range(0, total, chunk_rows):
                x, y, z = truth.rows(split, start, min(chunk_rows, total - start))
                writer.write(x, y)
                meter.add(y, z)
                if time.monotonic() - shown > PROGRESS_SECONDS:
                    shown = time.monotonic()
                    echo(f"clicklog: {split}: {meter.rows:,}/{total:,} rows "
                         f"({meter.rows / total:.0%}) in {config.shards} shards, "
                         f"{meter.rows / (shown - started):,.0f} rows/s")
        manifest["splits"][split] = writer.entry()
        seconds = time.monotonic() - started
        if meter.rows:
            reference[f"{split}_click_rate"] = meter.click_rate
        if split != "train" and meter.rows:
            reference[f"bayes_{split}_logloss"] = meter.logloss
            reference[f"bayes_{split}_auc"] = meter.auc
        echo(f"clicklog: {split}: {total:,} rows in {config.shards} shards, "
             f"{seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} rows/s), click rate "
             f"{meter.click_rate:.4f}" + (f", Bayes log-loss {meter.logloss:.4f}, AUC "
                                          f"{meter.auc:.4f}" if split != "train" and total
                                          else ""))
    manifest["reference"] = reference
    manifest["generator"] = {"function": GENERATOR, "config": config.as_json()}
    return write_manifest(root, manifest)


def load_clicklog(directory: str, config: ClickLogConfig | None = None,
                  verify: bool = True) -> Splits:
    """The synthetic click log of ``config`` in ``directory``, generated there first if
    the directory holds none (see the module's docstring), read as streaming TFRecord
    splits. The splits' ``reference`` holds the Bayes-optimal test log-loss and AUC and
    the click rates, which a run logs as ``data/*`` metrics.

    Processes that load the same directory at once (the workers of a cluster) wait for
    one of them to generate it.

    Args:
      directory: where the shards are or go (a new, empty or earlier click log's).
      config: the settings (None: ``ClickLogConfig()``'s defaults).
      verify: read every file of a click log generated earlier before training (as
        ``load_tfrecords``); one just generated is not read again.

    Raises:
      ConfigError: if ``directory`` holds a click log of other settings (naming the
        first that differs; it is never overwritten), or other shards.
      DataError: if it holds files but no manifest.
    """
    config = config or ClickLogConfig()
    root = Path(directory)
    with _locked(root):
        fresh = not (root / MANIFEST).is_file()
        if fresh:
            _generate(config, root)
        else:
            _check_same(config, root)
    splits = load_tfrecords(str(root), verify=verify and not fresh)
    return dataclasses.replace(splits, name="clicklog")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Holds an exclusive lock beside ``root`` (a hidden file in its parent)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _generate(config: ClickLogConfig, root: Path) -> None:
    """Writes into a hidden sibling, then renames it to ``root``: a directory that has a
    manifest is complete, and an interrupted generation leaves only the sibling, which
    the next one removes."""
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} holds files but no {MANIFEST} (not a click log, or one "
                        f"whose writing was stopped): remove it or choose a new "
                        f"load_clicklog.directory")
    partial = root.parent / f".{root.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    print(f"clicklog: generating {config.train_examples:,}/{config.validation_examples:,}/"
          f"{config.test_examples:,} train/validation/test rows into {root}", flush=True)
    write_clicklog(config, partial, echo=lambda line: print(line, flush=True))
    os.rename(partial, root)  # onto an empty directory too


def _check_same(config: ClickLogConfig, root: Path) -> None:
    """Raises ConfigError unless ``root`` holds the click log of exactly ``config``."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except ValueError as e:
        raise DataError(f"{root / MANIFEST} is not readable JSON ({e})") from e
    generator = manifest.get("generator") or {}
    if generator.get("function") != GENERATOR:
        raise ConfigError(f"{root} holds shards not generated by load_clicklog: choose a "
                          f"new load_clicklog.directory (or read them with @load_tfrecords)")
    stored, wanted = generator.get("config") or {}, config.as_json()
    for name, value in wanted.items():
        if stored.get(name) != value:
            raise ConfigError(
                f"ClickLogConfig.{name} is {value!r}, but {root} holds the click log of "
                f"{name} = {stored.get(name)!r}; it is never overwritten: choose a new "
                f"load_clicklog.directory")
