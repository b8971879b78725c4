"""The ``qat`` stage (quantization-aware fine-tuning) and the ``tflite`` stage (TFLite
exports, quantized after training or from a QAT model, measured in LiteRT)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmt_tf.checks import Annotated, OneOf, Range, check, check_arguments
from lmt_tf.compression.quantization import QuantizationAware
from lmt_tf.compression.report import tflite_row
from lmt_tf.compression.tflite import MODES, after_tokenizer, convert, measure, tokenized
from lmt_tf.models.saved import export_saved_model, load_saved_model
from lmt_tf.stages.context import RunContext, Stage, model_ready, prefixed
from lmt_tf.stages.fine_tune import Epochs, FineTune


class QAT(FineTune):
    """Quantization-aware fine-tuning (TF-MOT ``quantize_model``, 8-bit) for ``epochs``.
    ``preserve`` = ``sparsity`` (PQAT) or ``clusters`` (CQAT) keeps what an earlier prune
    or cluster stage made. The QAT model goes on; a ``tflite`` stage makes it int8."""

    name = "qat"

    def __init__(self, epochs: Epochs = 1,
                 preserve: Annotated[str, OneOf("sparsity", "clusters")] | None = None):
        check_arguments(self.name, type(self), locals())
        super().__init__(epochs)
        self.preserve = preserve

    def describe(self) -> str:
        scheme = {None: "QAT", "sparsity": "PQAT", "clusters": "CQAT"}[self.preserve]
        return f"qat ({scheme}, {self.epochs} epoch(s))"

    def check(self, context: RunContext) -> None:
        # Every layer quantizable, before anything trains; a stage before it that trains a
        # new model (a student) leaves that to the transform's own check.
        stages = list(context.setup.stages)
        before = stages[:stages.index(self)] if self in stages else []
        if not any(getattr(stage, "fresh_model", False) for stage in before):
            QuantizationAware(self.preserve).check(context.model)

    def transform(self, context: RunContext) -> QuantizationAware:
        return QuantizationAware(self.preserve)


class TFLite(Stage):
    """Converts the current model to TFLite once per mode and measures each file in the
    LiteRT interpreter: test accuracy, mean latency per example at batch 1, bytes. A text
    model converts without its tokenizer: the ``.tflite`` takes token ids (words,
    WordPiece) or TF-IDF vectors (a bag of words).
    Logged as ``tflite/<mode>/...`` metrics and ``tflite/model_<mode>.tflite`` artifacts.

    Args:
      modes: any of ``float``, ``dynamic`` (int8 weights), ``float16``, ``int8`` (int8
        weights and activations, calibrated on training examples).
      representative_examples: training examples that calibrate ``int8``.
      latency_examples: examples timed one at a time.
    """

    name = "tflite"
    compresses = True
    needs_trained_model = True  # it measures the model it converts

    def __init__(self, modes: Sequence[Annotated[str, OneOf(*MODES)]] = ("float", "int8"),
                 representative_examples: Annotated[int, Range(ge=1)] = 200,
                 latency_examples: Annotated[int, Range(ge=1)] = 100):
        check_arguments(self.name, type(self), locals())
        check(bool(modes), "tflite.modes", f"must list some of {MODES}, got {modes!r}")
        self.modes = tuple(modes)
        self.representative_examples = representative_examples
        self.latency_examples = latency_examples

    def check(self, context: RunContext) -> None:
        examples = len(context.splits.train)
        check("int8" not in self.modes or self.representative_examples <= examples,
              "tflite.representative_examples",
              f"must be at most the {examples} training examples of {context.splits.name} "
              f"(they calibrate int8), got {self.representative_examples}")

    def describe(self) -> str:
        return f"tflite ({', '.join(self.modes)})"

    def work(self, context: RunContext) -> None:
        own = context.stage_dir(self.name)
        with tempfile.TemporaryDirectory(prefix="lmt-tflite-") as scratch:
            # Every task saves (saving may need all workers); the chief converts the
            # model re-loaded outside any strategy.
            saved = Path(scratch) / "saved_model"
            export_saved_model(context.model, saved)
            if not context.setup.role.is_chief:
                return
            model = load_saved_model(saved)
        x, y = context.test_arrays()
        representative = model_ready(context.splits.train, self.representative_examples)[0]
        network = after_tokenizer(model)
        if network is not None:
            # String ops are not TFLite builtins: the network after the tokenizer
            # converts, fed (and calibrated) with the ids the model's own tokenizer makes.
            x, representative = tokenized(model, x), tokenized(model, representative)
            model = network
            takes = (f"token ids ({x.shape[1]} int64 per document, padded with 0)"
                     if x.dtype == np.int64
                     else f"TF-IDF vectors ({x.shape[1]} float32 per document)")
            context.echo(f"lmt: tflite: the .tflite files take {takes}, made by the model's "
                         f"tokenizer, which stays in the SavedModel")
        weights = model.get_weights()
        keras_accuracy = context.test_metrics.get("accuracy")
        sizes = {}
        for mode in self.modes:
            flat = convert(model, mode, representative)
            path = own.path / f"model_{mode}.tflite"
            path.write_bytes(flat)
            result = measure(flat, x, y, self.latency_examples)
            sizes[mode] = result.bytes
            context.run.log_metrics(prefixed({"test_accuracy": result.accuracy,
                                              "latency_ms": result.latency_ms,
                                              "bytes": result.bytes}, f"{self.name}/{mode}"),
                                    step=0)
            context.report.add(tflite_row(f"tflite:{mode}", flat, result.accuracy,
                                             result.latency_ms, weights))
            against = f"; Keras {keras_accuracy:.4f}" if keras_accuracy is not None else ""
            smaller = (f" ({sizes['float'] / result.bytes:.1f}x smaller than float)"
                       if "float" in sizes and mode != "float" else "")
            context.echo(f"lmt: tflite {mode}: test accuracy {result.accuracy:.4f} (LiteRT"
                         f"{against}), {result.bytes / 1e6:.2f} MB{smaller}, "
                         f"{result.latency_ms:.3f} ms per example")
        if context.run.logs:
            context.run.log_artifacts(own.path, self.name)
