"""The ``evaluate`` stage: the current model, or one logged by an earlier run, judged on
the test split beyond its accuracy: per-class scores (by class name), confusion matrix,
calibration, robustness and efficiency, all logged under ``evaluate/``. Numbers and
documents (raw strings) alike."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tf_keras as keras

from lmt_tf import evaluation
from lmt_tf.checks import Annotated, Range, check_arguments
from lmt_tf.data.splits import is_text
from lmt_tf.errors import ConfigError
from lmt_tf.stages.context import RunContext, Stage


class Evaluate(Stage):
    """Evaluates ``model`` (a run id or name, an MLflow model URI, a SavedModel path;
    None: the model of the stages before) on the test split, as it is served: raw
    features in.

    Args:
      model: what to evaluate; None for this run's model.
      calibration_bins, noise_levels, shifts, latency_runs, max_examples, seed,
        word_drops: see ``evaluation.EvaluationConfig``.
    """

    name = "evaluate"
    chief_only = True
    untrained_remedy = "set evaluate.model to judge a model of an earlier run"

    def __init__(self, model: str | None = None,
                 calibration_bins: Annotated[int, Range(ge=1)] = 15,
                 noise_levels: Sequence[Annotated[float, Range(ge=0)]]
                 = (0.0, 0.1, 0.25, 0.5, 1.0),
                 shifts: Sequence[Annotated[int, Range(ge=0)]] = (0, 1, 2, 3),
                 latency_runs: Annotated[int, Range(ge=1)] = 50,
                 max_examples: Annotated[int, Range(ge=1)] | None = None,
                 seed: Annotated[int, Range(ge=0)] = 0,
                 word_drops: Sequence[Annotated[float, Range(ge=0, lt=1)]]
                 = (0.0, 0.1, 0.25, 0.5)):
        check_arguments(self.name, type(self), locals())
        self.model = model
        self.config = evaluation.EvaluationConfig(
            calibration_bins, tuple(noise_levels), tuple(shifts), tuple(word_drops),
            latency_runs, max_examples, seed)

    @property
    def needs_trained_model(self) -> bool:
        """This run's model is judged as the stages before trained it."""
        return self.model is None

    def describe(self) -> str:
        return f"evaluate ({self.model or 'this run'}'s model on the test split)"

    def check(self, context: RunContext) -> None:
        if context.splits.num_classes < 2:
            raise ConfigError(f"evaluate judges classifiers; data {context.splits.name} is a "
                              f"regression (num_classes {context.splits.num_classes})")

    def work(self, context: RunContext) -> None:
        model = self._model(context)
        x, y = context.test_arrays()
        if self.config.max_examples:
            x, y = x[: self.config.max_examples], y[: self.config.max_examples]
        directory = context.stage_dir(self.name).path
        splits = context.splits
        names = [splits.class_name(c) for c in range(splits.num_classes)]
        results = judge(model, x, y, splits.num_classes, self.config,
                        feature_scale(context), context.setup.plan.global_batch_size,
                        context.session.own.export / "saved_model" if self.model is None
                        else None, names)
        run = context.run
        metrics = results.pop("metrics")
        run.log_metrics({f"evaluate/{k}": v for k, v in metrics.items()}, step=0)
        evaluation.plot_confusion(results["confusion"], directory / "confusion_matrix.png",
                                  names if splits.class_names else ())
        evaluation.plot_reliability(results["calibration"], directory / "reliability.png")
        evaluation.plot_robustness(results["robustness"], directory / "robustness.png")
        for name in ("confusion_matrix.png", "reliability.png", "robustness.png"):
            run.log_artifact(directory / name, "evaluate")
        run.log_text(results["report"].as_markdown(), "evaluate/per_class.md")
        document = {**results, "class_names": names, "report": results["report"].metrics(),
                    "calibration": results["calibration"].__dict__,
                    "confusion": results["confusion"].tolist()}
        run.log_text(json.dumps(document, indent=1, default=str), "evaluate/evaluation.json")
        if self.model is not None:
            from lmt_tf.tracking.read import source_run_id

            source = source_run_id(self.model, context.setup.configs.tracking.tracking_uri)
            run.set_tags({"lmt.evaluated_model": self.model,
                          **({"lmt.evaluated_run": source} if source else {})})
        worst = int(np.argmin(results["report"].f1))
        what = "document" if is_text(x) else "example"
        context.echo(
            f"lmt: evaluate: accuracy {metrics['accuracy']:.4f}, macro F1 "
            f"{metrics['macro_f1']:.4f} (lowest: {names[worst]} "
            f"{results['report'].f1[worst]:.4f}), ECE {metrics['ece']:.4f}; latency per "
            f"{what} {metrics['latency_ms_batch_1']:.3f} ms at batch 1; plots in {directory}")

    def _model(self, context: RunContext) -> keras.Model:
        """The model to judge, outside any distribution strategy."""
        if self.model is None:
            copy = keras.models.clone_model(context.model)
            copy.set_weights(context.model.get_weights())
            return copy
        from lmt_tf.tracking.read import load_model

        loaded = load_model(self.model, context.setup.configs.tracking.tracking_uri)
        takes = tuple(loaded.input_shape[1:])
        if takes != tuple(context.splits.input_shape):
            raise ConfigError(f"evaluate.model {self.model} takes inputs of shape {takes}, "
                              f"but data {context.splits.name} has examples of shape "
                              f"{tuple(context.splits.input_shape)}")
        classes = loaded.output_shape[-1]
        if classes != context.splits.num_classes:
            raise ConfigError(f"evaluate.model {self.model} predicts {classes} classes, but "
                              f"data {context.splits.name} has {context.splits.num_classes}")
        return loaded


def feature_scale(context: RunContext) -> float:
    """The standard deviation of the raw training features (the unit of the noise; 1 for
    documents, which get no noise)."""
    split = context.splits.train
    x = split.x[:10_000] if hasattr(split, "x") else context.test_arrays()[0]
    if is_text(x):
        return 1.0
    return float(np.nanstd(np.asarray(x, np.float64))) or 1.0


def judge(model: keras.Model, x: np.ndarray, y: np.ndarray, num_classes: int,
          config: evaluation.EvaluationConfig, scale: float, batch_size: int,
          saved_model: Any = None, names: Sequence[str] = ()) -> dict[str, Any]:
    """Everything ``evaluate`` measures of ``model`` on (``x``, ``y``): the flat metrics
    under ``metrics`` and the objects the plots and reports are made of; ``names``: each
    class's name."""
    def predict(inputs: np.ndarray) -> np.ndarray:
        if inputs is x:  # the clean inputs (noise 0, shift 0, no word dropped)
            return probabilities
        return model.predict(inputs, batch_size=1024, verbose=0)

    probabilities = model.predict(x, batch_size=1024, verbose=0)
    report = evaluation.class_report(y, probabilities, num_classes, names)
    calibration = evaluation.calibration(y, probabilities, config.calibration_bins)
    curves = evaluation.robustness(predict, x, y, scale, config.noise_levels, config.shifts,
                                   config.seed, config.word_drops)
    speed = evaluation.efficiency(model, x, [1, batch_size], config.latency_runs,
                                  saved_model)
    metrics = {**report.metrics(), "ece": calibration.ece,
               "parameters": speed.parameters, "model_bytes": speed.model_bytes}
    metrics.update({f"accuracy_noise_{level:g}": value
                    for level, value in curves.get("noise", {}).items()})
    metrics.update({f"accuracy_shift_{shift}": value
                    for shift, value in curves.get("shift", {}).items()})
    metrics.update({f"accuracy_word_drop_{level:g}": value
                    for level, value in curves.get("word_drop", {}).items()})
    for size, times in speed.latency_ms.items():
        metrics[f"latency_ms_batch_{size}"] = times["mean"]
        metrics[f"latency_ms_p95_batch_{size}"] = times["p95"]
    return {"metrics": metrics, "report": report, "calibration": calibration,
            "confusion": report.confusion, "robustness": curves,
            "latency_ms": speed.latency_ms}
