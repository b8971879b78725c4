"""The ``export`` stage: the current model as a SavedModel (and an MLflow model)."""

from __future__ import annotations

import tensorflow as tf

from lmt_tf.data.pipeline import to_model_input
from lmt_tf.stages.context import RunContext, Stage
from lmt_tf.training.export import export_saved_model, load_saved_model


class Export(Stage):
    """Writes the current model as a SavedModel, servable without lmt_tf, and logs it as
    the artifact ``saved_model/`` and as an MLflow model (TensorFlow flavour, with a
    signature). Every task saves (saving may need all workers); only the chief logs. The
    MLflow model is logged from the SavedModel re-loaded outside any strategy, which also
    checks that the export loads."""

    name = "export"

    def run(self, context: RunContext) -> None:
        config, run = context.configs.export, context.run
        if context.done(self.name) or not (config.saved_model or config.mlflow_model):
            return
        target = context.own.export / "saved_model"
        size = export_saved_model(context.model, target)
        if run.logs:
            if config.saved_model:
                run.log_artifacts(target, "saved_model")
                run.log_metrics({"export.saved_model_bytes": size}, step=0)
                context.echo(f"lmt: SavedModel {target} ({size / 1e6:.1f} MB)")
            if config.mlflow_model:
                example = to_model_input(tf.constant(context.splits.test.sample(4))).numpy()
                uri = run.log_keras_model(load_saved_model(target), example)
                context.echo(f"lmt: MLflow model {uri}")
        context.mark_done(self.name)
