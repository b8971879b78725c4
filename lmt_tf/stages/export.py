"""The ``export`` stage: the current model as a SavedModel (and an MLflow model)."""

from __future__ import annotations

import tensorflow as tf

from lmt_tf.checks import check_arguments
from lmt_tf.data.pipeline import to_model_input
from lmt_tf.models.saved import export_saved_model, load_saved_model
from lmt_tf.stages.context import RunContext, Stage


class Export(Stage):
    """Writes the current model as a SavedModel, servable without lmt_tf, and logs it as
    the artifact ``saved_model/`` and as an MLflow pyfunc model that serves it with
    TensorFlow alone (``mlflow.pyfunc.load_model``, ``mlflow models serve``), with a
    signature. Both take raw features. Every task saves (saving may need all workers);
    only the chief logs.

    Args:
      allow_untrained: export the model even if no stage before trains it (the model as
        built: e.g. a transferred one); otherwise such a run is refused before it starts.
    """

    name = "export"
    untrained_remedy = "set export.allow_untrained = True to export the model as built"

    def __init__(self, allow_untrained: bool = False):
        check_arguments(self.name, type(self), locals())
        self.allow_untrained = allow_untrained

    @property
    def needs_trained_model(self) -> bool:
        return not self.allow_untrained

    def __repr__(self) -> str:
        return f"Export(allow_untrained={self.allow_untrained})" if self.allow_untrained \
            else "Export()"

    def work(self, context: RunContext) -> None:
        config, run = context.setup.configs.export, context.run
        if not (config.saved_model or config.mlflow_model):
            return
        target = context.session.own.export / "saved_model"
        size = export_saved_model(context.model, target)
        if run.logs:
            if config.saved_model:
                run.log_artifacts(target, "saved_model")
                run.log_metrics({"export.saved_model_bytes": size}, step=0)
                context.echo(f"lmt: SavedModel {target} ({size / 1e6:.1f} MB)")
            if config.mlflow_model:
                # Raw examples; the outputs of the SavedModel re-loaded outside any
                # strategy, which also checks that the export loads.
                example = to_model_input(tf.constant(context.splits.test.sample(4))).numpy()
                outputs = load_saved_model(target).predict(example, verbose=0)
                uri = run.log_served_model(target, example, outputs)
                context.echo(f"lmt: MLflow model {uri}")
