"""The compression report: one row per stage output (the trained model, the pruned one,
each TFLite file, ...), with its size, accuracy and latency, logged as
``compression/report.json`` and a Markdown table ``compression/report.md``."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tf_keras as keras

from lmt_tf.evaluation import latency_per_example


@dataclass(frozen=True)
class Row:
    """One model a stage produced."""

    stage: str  # e.g. train, prune, tflite:int8
    parameters: int
    nonzero_parameters: int
    bytes: int  # the weights as saved (.npz), or the .tflite file
    gzip_bytes: int  # the same, gzip-compressed
    test_accuracy: float  # the interpreter's for TFLite
    latency_ms: float  # mean per example at batch 1
    # Where the latency was measured: Keras on the device TensorFlow places the model on
    # (a GPU's includes copying the example there), LiteRT on one CPU thread.
    measured_on: str = ""


def weight_counts(weights: Sequence[np.ndarray]) -> tuple[int, int]:
    """Parameters and non-zero parameters in ``weights``."""
    return (int(sum(w.size for w in weights)),
            int(sum(np.count_nonzero(w) for w in weights)))


def saved_bytes(weights: Sequence[np.ndarray]) -> tuple[int, int]:
    """Bytes of ``weights`` saved as one .npz, raw and gzip-compressed: what zeros and
    shared values save in storage and transfer (TF-MOT's guides measure the same way)."""
    buffer = io.BytesIO()
    np.savez(buffer, *weights)
    raw = buffer.getvalue()
    return len(raw), len(gzip.compress(raw, compresslevel=9))


def gzipped_bytes(weights: Sequence[np.ndarray]) -> int:
    """Bytes of ``weights`` saved as one .npz, gzip-compressed (see ``saved_bytes``)."""
    return saved_bytes(weights)[1]


def keras_row(stage: str, model: keras.Model, test_accuracy: float, x: np.ndarray,
              latency_runs: int = 50) -> Row:
    """The row of a Keras model; latency is one compiled forward pass of one example of
    ``x``, as for the evaluate stage (``evaluation.latency_per_example``)."""
    weights = model.get_weights()
    latency = float(np.mean(latency_per_example(model, x, 1, latency_runs)))
    return Row(stage, *weight_counts(weights), *saved_bytes(weights), test_accuracy,
               latency, f"Keras, {keras_device()}")


def tflite_row(stage: str, flat: bytes, test_accuracy: float, latency_ms: float,
               weights: Sequence[np.ndarray]) -> Row:
    """The row of a ``.tflite`` file measured in LiteRT, converted from ``weights``."""
    return Row(stage, *weight_counts(weights), len(flat),
               len(gzip.compress(flat, compresslevel=9)), test_accuracy, latency_ms,
               "LiteRT, CPU, 1 thread")


def keras_device() -> str:
    """The device a Keras model computes on in this process: its first GPU, else CPU."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name.rpartition("device:")[2] if gpus else "CPU"


def as_json(rows: list[Row]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=2) + "\n"


def as_markdown(rows: list[Row]) -> str:
    """The report as a Markdown table, sizes relative to the first row."""
    base = rows[0]
    lines = ["| stage | parameters | non-zero | bytes | gzip bytes | gzip vs first | "
             "test accuracy | latency ms (batch 1) | measured on |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r.stage} | {r.parameters:,} | {r.nonzero_parameters:,} | "
                     f"{r.bytes:,} | {r.gzip_bytes:,} | {base.gzip_bytes / r.gzip_bytes:.2f}x | "
                     f"{r.test_accuracy:.4f} | {r.latency_ms:.3f} | {r.measured_on} |")
    return "\n".join(lines) + "\n"


class CompressionReport:
    """The report of one run: rows as the stages add them, written to the run
    (``compression/report.json`` and ``.md``) after each stage that added some, so an
    interrupted run keeps what it measured, and printed once, after the last stage that
    compresses.

    Args:
      run: where the artifacts go (a ``tracking`` run).
      compressing: the names of the run's stages that compress, in order.
      echo: where the table is printed.
    """

    def __init__(self, run: Any, compressing: Sequence[str], echo: Callable[[str], None]):
        self.run, self.compressing, self.echo = run, list(compressing), echo
        self.rows: list[Row] = []
        self._written = 0

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def stage_done(self, stage: str) -> None:
        """Writes the rows so far if ``stage`` added any; prints the table after the last
        compressing stage."""
        if len(self.rows) > self._written:
            table = as_markdown(self.rows)
            self.run.log_text(as_json(self.rows), "compression/report.json")
            self.run.log_text(table, "compression/report.md")
            self._written = len(self.rows)
        if self.rows and self.compressing and stage == self.compressing[-1]:
            self.echo("lmt: compression report\n" + as_markdown(self.rows).rstrip())
