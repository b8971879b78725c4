"""The ``export`` stage: the current model as a SavedModel (and an MLflow model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check_arguments
from lmt_tf.data.pipeline import to_model_input
from lmt_tf.data.splits import Splits
from lmt_tf.models.saved import export_saved_model, load_saved_model
from lmt_tf.stages.context import RunContext, Stage


class Export(Stage):
    """Writes the current model as a SavedModel, servable without lmt_tf, and logs it as
    the artifact ``saved_model/`` and as an MLflow pyfunc model that serves it with
    TensorFlow alone (``mlflow.pyfunc.load_model``, ``mlflow models serve``), with a
    signature and an input example. Both take raw features (documents: strings). The
    MLflow model of a classifier answers a column per class, named by the class in output
    order. Every task saves (saving may need all workers); only the chief logs.

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
                names = class_names(context.splits)
                example, outputs = served_example(load_saved_model(target),
                                                  context.splits.test.sample(4), names)
                if not isinstance(outputs, pd.DataFrame):  # not one output per class
                    names = ()
                uri = run.log_served_model(target, example, outputs, names)
                context.echo(f"lmt: MLflow model {uri}" + (
                    f" (answers a column per class: {_shown(names)})" if names else ""))


def class_names(splits: Splits) -> tuple[str, ...]:
    """A classifier's class names in output order (its label ids where the data names
    none); nothing for a regression."""
    if splits.num_classes < 2:
        return ()
    return tuple(splits.class_name(c) for c in range(splits.num_classes))


def served_example(model: keras.Model, raw: np.ndarray, names: tuple[str, ...]
                   ) -> tuple[Any, Any]:
    """The input example of the MLflow model and its outputs, as the served model takes
    and answers them: raw examples (documents: a list of str, which the scoring server
    takes as ``{"inputs": [...]}``), and ``model``'s outputs for them (a classifier's: a
    DataFrame with a column per class). ``model`` is the SavedModel re-loaded outside any
    strategy, which also checks that the export loads."""
    inputs = to_model_input(tf.constant(raw)).numpy()
    outputs = model.predict(inputs, verbose=0)
    if inputs.dtype.kind in "OSU":  # documents, as JSON carries them
        example: Any = [doc.decode("utf-8") if isinstance(doc, bytes) else str(doc)
                        for doc in inputs]
    else:
        example = inputs
    if names and outputs.ndim == 2 and outputs.shape[1] == len(names):
        outputs = pd.DataFrame(outputs, columns=list(names))
    return example, outputs


def _shown(names: tuple[str, ...]) -> str:
    """Class names for one line: the first eight."""
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
