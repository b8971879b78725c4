"""The MLflow model lmt logs for a SavedModel (``served_model.py`` serving it with
TensorFlow alone): its signature and input example, its class names, its requirements,
logged without MLflow's progress bar."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def log_served(saved_model: Path, example: Any, outputs: Any,
               class_names: Sequence[str] = ()) -> str:
    """Logs the SavedModel directory ``saved_model`` to the active run as an MLflow pyfunc
    model that serves it with TensorFlow alone; returns its URI.

    Args:
      saved_model: the SavedModel (raw features in).
      example: a few raw examples (an array; documents: a list of str), logged as the
        model's input example (MLflow checks that the model answers it as served).
      outputs: the model's outputs for them (a classifier's: a DataFrame with a column
        per class); with ``example``, the signature.
      class_names: a classifier's class names in output order (the model config
        ``class_names`` and the metadata ``lmt.class_names``); empty otherwise.
    """
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    from lmt_tf import served_model
    from lmt_tf.models.saved import serving_requirements

    metadata = {"lmt.input": "raw features: the preprocessing is inside the model"}
    if class_names:
        metadata["lmt.class_names"] = list(class_names)
        metadata["lmt.output"] = ("class probabilities, a column per class named in "
                                  "lmt.class_names, in output order")
    # Every file of the SavedModel is copied into the model: no progress bar for that.
    with _environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=served_model.__file__,
            artifacts={"saved_model": str(saved_model)},
            signature=infer_signature(example, outputs), input_example=example,
            model_config={served_model.CLASS_NAMES: list(class_names)}, metadata=metadata,
            # Explicit, because inferring requirements re-loads the model in a subprocess.
            pip_requirements=serving_requirements(saved_model))
    return info.model_uri


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment variables set to ``values`` inside the context, as before after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
