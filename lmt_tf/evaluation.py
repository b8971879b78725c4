"""Judging a classifier beyond one accuracy: per-class precision, recall and F1 and the
confusion matrix (scikit-learn's), by class name, calibration (expected calibration error
and a reliability diagram), robustness (numbers: Gaussian noise and small shifts;
documents: words dropped), and efficiency (parameters, bytes, latency per example). Plain
functions of arrays and a model; the ``evaluate`` stage logs what they return."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check

# What a metric name cannot hold (MLflow allows word characters, . - space / :), and
# what would add a level to it (/) or is easily misread in one (:).
_REFUSED = re.compile(r"[^\w.\- ]")


@dataclass
class EvaluationConfig:
    """What the ``evaluate`` stage measures."""

    calibration_bins: int = 15  # equal-width confidence bins of the ECE
    # Gaussian noise added to the raw features: standard deviations as fractions of the
    # training features' standard deviation (0: the clean accuracy).
    noise_levels: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0)
    shifts: Sequence[int] = (0, 1, 2, 3)  # images: random translations up to N pixels
    # Documents: fractions of each document's words deleted at random (0: the clean
    # accuracy); noise and shifts are for numbers.
    word_drops: Sequence[float] = (0.0, 0.1, 0.25, 0.5)
    latency_runs: int = 50  # timed calls per batch size (after one untimed warm-up)
    max_examples: int | None = None  # test examples used; None: the whole test split
    seed: int = 0  # noise, shifts

    def __post_init__(self) -> None:
        check(self.calibration_bins >= 1, "EvaluationConfig.calibration_bins",
              f"must be >= 1, got {self.calibration_bins}")
        check(all(level >= 0 for level in self.noise_levels), "EvaluationConfig.noise_levels",
              f"must be >= 0, got {tuple(self.noise_levels)}")
        check(all(int(s) == s and s >= 0 for s in self.shifts), "EvaluationConfig.shifts",
              f"must be whole numbers of pixels >= 0, got {tuple(self.shifts)}")
        check(all(0 <= f < 1 for f in self.word_drops), "EvaluationConfig.word_drops",
              f"must be fractions in [0, 1), got {tuple(self.word_drops)}")
        check(self.latency_runs >= 1, "EvaluationConfig.latency_runs",
              f"must be >= 1, got {self.latency_runs}")
        check(self.max_examples is None or self.max_examples >= 1,
              "EvaluationConfig.max_examples", f"must be None or >= 1, got {self.max_examples}")


@dataclass
class ClassReport:
    """Per-class and overall scores of one set of predictions."""

    accuracy: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    macro: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # each class's name (empty: its id)

    def class_names(self) -> list[str]:
        """Each class's name, its id where none is given."""
        return self.names or [str(c) for c in range(len(self.support))]

    def metrics(self) -> dict[str, float]:
        """Accuracy, macro scores, and per class ``precision/class_<name>`` (likewise
        recall, f1)."""
        out = {"accuracy": self.accuracy, **{f"macro_{k}": v for k, v in self.macro.items()}}
        keys = class_keys(self.class_names())
        for name in ("precision", "recall", "f1"):
            for key, value in zip(keys, getattr(self, name), strict=True):
                out[f"{name}/{key}"] = value
        return out

    def as_markdown(self) -> str:
        lines = ["| id | class | precision | recall | F1 | support |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for c, (name, *row) in enumerate(zip(self.class_names(), self.precision, self.recall,
                                             self.f1, self.support, strict=True)):
            lines.append(f"| {c} | {name} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.4f} | "
                         f"{row[3]} |")
        lines.append(f"| | macro | {self.macro['precision']:.4f} | {self.macro['recall']:.4f} "
                     f"| {self.macro['f1']:.4f} | {sum(self.support)} |")
        return "\n".join(lines) + f"\n\naccuracy {self.accuracy:.4f}\n"


def class_keys(names: Sequence[str]) -> list[str]:
    """Each class's part of a metric name, ``class_<name>``: the name with what MLflow
    refuses in a metric name, and ``/`` (a level of the name), as ``_``; by id
    (``class_<id>``) for all if two names would then be one."""
    keys = ["class_" + _REFUSED.sub("_", str(name)) for name in names]
    return keys if len(set(keys)) == len(keys) else [f"class_{c}" for c in range(len(keys))]


def class_report(y: np.ndarray, probabilities: np.ndarray, num_classes: int,
                 names: Sequence[str] = ()) -> ClassReport:
    """Scores of the arg-max predictions against ``y`` (scikit-learn's definitions; a
    class never predicted has precision 0); ``names``: each class's name."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = probabilities.argmax(axis=-1)
    labels = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=labels, zero_division=0)
    return ClassReport(
        accuracy=float(np.mean(predicted == y)), precision=precision.tolist(),
        recall=recall.tolist(), f1=f1.tolist(), support=support.astype(int).tolist(),
        confusion=confusion_matrix(y, predicted, labels=labels),
        macro={"precision": float(precision.mean()), "recall": float(recall.mean()),
               "f1": float(f1.mean())}, names=[str(n) for n in names])


@dataclass
class Calibration:
    """Reliability of the predicted confidence: per equal-width bin of confidence, the
    examples in it, their mean confidence and their accuracy."""

    ece: float  # sum over bins of (examples in bin / all) * |accuracy - confidence|
    counts: list[int]
    confidence: list[float]
    accuracy: list[float]


def calibration(y: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> Calibration:
    """The expected calibration error (Guo et al., 2017) of the top-class confidence.

    Bin b (0-based) holds confidences in (b/bins, (b+1)/bins]; a confidence of 0 goes to
    the first bin. Empty bins count for nothing.
    """
    confidence = probabilities.max(axis=-1).astype(np.float64)
    correct = (probabilities.argmax(axis=-1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), 0.0)
        mean_acc = np.where(counts > 0, correct_sum / np.maximum(counts, 1), 0.0)
    ece = float(np.sum(counts / max(len(y), 1) * np.abs(mean_acc - mean_conf)))
    return Calibration(ece, counts.astype(int).tolist(), mean_conf.tolist(),
                       mean_acc.tolist())


def robustness(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray,
               scale: float, noise_levels: Sequence[float], shifts: Sequence[int],
               seed: int, word_drops: Sequence[float] = ()) -> dict[str, dict[float, float]]:
    """Accuracy under Gaussian noise of standard deviation ``level * scale`` added to the
    raw features, and (images: two or more example axes) under random translations of
    up to ``shift`` pixels along each image axis (np.roll, one draw per example).
    Documents (strings) instead: accuracy with each word deleted with probability
    ``word_drops[i]`` (one word is always kept)."""
    rng = np.random.default_rng(seed)
    if x.dtype.kind in "OSU":
        return {"word_drop": {float(f): _accuracy(predict(_dropped(x, f, rng) if f else x), y)
                              for f in word_drops}}
    out: dict[str, dict[float, float]] = {"noise": {}, "shift": {}}
    for level in noise_levels:
        noisy = x + rng.normal(0.0, level * scale, x.shape).astype(x.dtype) if level else x
        out["noise"][float(level)] = _accuracy(predict(noisy), y)
    if x.ndim >= 3:
        for shift in shifts:
            moved = _shifted(x, int(shift), rng) if shift else x
            out["shift"][int(shift)] = _accuracy(predict(moved), y)
    return out


def _dropped(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Documents with each whitespace-separated word deleted with probability
    ``fraction``, keeping at least one (a random one)."""
    out = np.empty(len(x), dtype=object)
    for i, doc in enumerate(x):
        raw = isinstance(doc, bytes)
        words = (doc.decode("utf-8", "replace") if raw else str(doc)).split()
        kept = [w for w in words if rng.random() >= fraction]
        if not kept and words:
            kept = [words[rng.integers(len(words))]]
        text = " ".join(kept)
        out[i] = text.encode("utf-8") if raw else text
    return out


def _shifted(x: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    moves = rng.integers(-shift, shift + 1, size=(len(x), 2))
    return np.stack([np.roll(example, tuple(move), axis=(0, 1))
                     for example, move in zip(x, moves, strict=True)])


def _accuracy(probabilities: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(probabilities.argmax(axis=-1) == y))


@dataclass
class Efficiency:
    """Size and speed of a model."""

    parameters: int
    model_bytes: int  # the SavedModel's files, or the weights' bytes without one
    latency_ms: dict[int, dict[str, float]]  # batch size -> mean and p95 per example


def latency_per_example(model: keras.Model, x: np.ndarray, batch_size: int,
                        runs: int) -> list[float]:
    """Milliseconds per example of ``runs`` timed forward passes of batches of
    ``batch_size`` examples, the next ones of ``x`` each time (round the end: documents
    differ in length), compiled (``tf.function`` of the model, traced before timing), as
    a deployed model runs; a document's time includes its tokenization."""
    forward = tf.function(lambda batch: model(batch, training=False))
    order = np.resize(np.arange(len(x)), (runs + 1) * batch_size)
    batches = [tf.constant(x[order[i * batch_size:(i + 1) * batch_size]])
               for i in range(runs + 1)]
    forward(batches[0])  # traces: not timed
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        forward(batch).numpy()
        times.append((time.perf_counter() - start) * 1000 / batch_size)
    return times


def efficiency(model: keras.Model, x: np.ndarray, batch_sizes: Sequence[int], runs: int,
               saved_model: Path | None = None) -> Efficiency:
    """Parameters, bytes, and the latency per example of one compiled forward pass at
    each batch size (see ``latency_per_example``)."""
    from lmt_tf.models.saved import directory_size

    latency = {}
    for size in sorted(set(batch_sizes)):
        times = latency_per_example(model, x, size, runs)
        latency[size] = {"mean": float(np.mean(times)), "p95": float(np.percentile(times, 95))}
    size = directory_size(saved_model) if saved_model and saved_model.is_dir() else \
        sum(w.nbytes for w in model.get_weights())
    return Efficiency(model.count_params(), int(size), latency)


def plot_confusion(confusion: np.ndarray, path: Path, names: Sequence[str] = ()) -> None:
    """The confusion matrix as a PNG, classes by name, counts in the cells (up to 25
    classes)."""
    plt = _pyplot()
    classes = len(confusion)
    side = max(5.0, 0.22 * classes + 2.5)
    figure, axes = plt.subplots(figsize=(side + 0.5, side))
    axes.imshow(confusion, cmap="Blues")
    labels = [str(n) for n in names] if len(names) == classes else list(range(classes))
    small = 7 if classes <= 25 else 5
    wide = max(len(str(label)) for label in labels) > 3
    axes.set_xticks(range(classes), labels, rotation=90 if wide else 0, fontsize=small)
    axes.set_yticks(range(classes), labels, fontsize=small)
    axes.set(xlabel="predicted class", ylabel="true class", title="confusion matrix (test)")
    limit = confusion.max() / 2
    if classes <= 25:
        for (i, j), count in np.ndenumerate(confusion):
            axes.text(j, i, str(count), ha="center", va="center", fontsize=7,
                      color="white" if count > limit else "black")
    _save(figure, path)


def plot_reliability(result: Calibration, path: Path) -> None:
    """Accuracy against confidence per bin, beside the diagonal of perfect calibration."""
    plt = _pyplot()
    bins = len(result.counts)
    centres = (np.arange(bins) + 0.5) / bins
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.bar(centres, result.accuracy, width=1 / bins, edgecolor="black", alpha=0.7,
             label="accuracy in bin")
    axes.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
             title=f"reliability (ECE {result.ece:.4f})")
    axes.legend(loc="upper left")
    _save(figure, path)


def plot_robustness(curves: dict[str, dict[Any, float]], path: Path) -> None:
    """Accuracy against noise level (and against shift, for images)."""
    plt = _pyplot()
    panels = [(k, v) for k, v in curves.items() if v]
    figure, all_axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4),
                                    squeeze=False)
    labels = {"noise": "noise std (x training std)", "shift": "max shift (pixels)",
              "word_drop": "fraction of words dropped"}
    for axes, (kind, curve) in zip(all_axes[0], panels, strict=True):
        axes.plot(list(curve), list(curve.values()), marker="o")
        axes.set(xlabel=labels[kind], ylabel="test accuracy", ylim=(0, 1),
                 title=f"accuracy under {kind.replace('_', ' ')}")
        axes.grid(alpha=0.3)
    _save(figure, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
