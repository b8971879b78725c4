"""The MLflow model that lmt logs, as MLflow's "model from code": this file is copied into
the logged model, and serves the run's SavedModel (artifact ``saved_model``) through its
serving signature with TensorFlow alone.

So ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need neither lmt_tf nor
Keras: a fresh interpreter, or the scoring server, loads it whatever Keras version is
installed, and nothing prints a progress bar per request. The SavedModel takes raw
features (its preprocessing is inside it): numbers, or documents (strings) for a model
whose tokenizer is its first layer. A classifier answers a DataFrame whose columns are
its class names in output order (the model config's ``class_names``), so the scoring
server answers ``{"predictions": [{"earn": 0.97, ...}]}``. This module imports nothing
from lmt_tf.
"""

from __future__ import annotations

import contextlib
import os

# Should anything in the serving process import Keras, it must be tf-keras (Keras 2),
# which wrote the SavedModel; set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

BATCH = 1024  # examples per call of the signature
# What defines a WordPiece tokenizer's ops (FastBertNormalize, ...) beside TensorFlow.
TEXT_REQUIREMENT = "tensorflow-text>=2.21,<2.22"
CLASS_NAMES = "class_names"  # the model config's key: each output column's class name


class SavedModelPredictor(mlflow.pyfunc.PythonModel):
    """Predicts with the serving signature of the SavedModel in ``saved_model``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # A subword tokenizer's ops (WordPiece) live in tensorflow-text: registered by
        # its import, before the SavedModel that uses them loads.
        with contextlib.suppress(ImportError):
            import tensorflow_text  # noqa: F401
        import tensorflow as tf

        self._tf = tf
        self._loaded = _load(tf, context.artifacts["saved_model"])
        self._serve = self._loaded.signatures["serving_default"]
        ((self._input, spec),) = self._serve.structured_input_signature[1].items()
        self._shape = [-1 if d is None else int(d) for d in spec.shape]
        self._dtype = spec.dtype.as_numpy_dtype
        self._text = spec.dtype == tf.string
        (self._output,) = self._serve.structured_outputs
        self._classes = [str(c) for c in (context.model_config or {}).get(CLASS_NAMES) or ()]

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame | np.ndarray:
        """The model's outputs for ``model_input``: raw examples, flat or in the model's
        input shape, as an array or a DataFrame (documents: strings, one per row). A
        classifier's class probabilities come as a DataFrame with a column per class,
        named, in output order; other outputs as an array."""
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        x = _documents(x) if self._text else np.asarray(x, self._dtype).reshape(self._shape)
        outputs = [self._serve(**{self._input: self._tf.constant(x[i:i + BATCH])})
                   [self._output].numpy() for i in range(0, len(x), BATCH)]
        width = len(self._classes) or 1
        y = np.concatenate(outputs) if outputs else np.zeros((0, width), np.float32)
        if self._classes and y.ndim == 2 and y.shape[1] == len(self._classes):
            return pd.DataFrame(y, columns=self._classes)
        return y


def _documents(x: object) -> np.ndarray:
    """Documents, one per row or item of ``x`` (a cell holding a list of documents, as
    ``{"text": [...]}`` becomes, gives each of them), as a 1-D array of bytes."""
    if isinstance(x, (str, bytes)):
        x = [x]
    docs: list[bytes] = []
    for item in np.asarray(x, object).reshape(-1):
        if isinstance(item, (list, tuple, np.ndarray)):
            docs.extend(_documents(item))
        else:
            docs.append(item if isinstance(item, bytes) else str(item).encode("utf-8"))
    return np.asarray(docs, object)


def _load(tf, directory: str):
    """The SavedModel in ``directory``.

    Raises:
      RuntimeError: in one line, if its graph holds an op TensorFlow does not define
        (a WordPiece tokenizer's, without tensorflow-text installed).
    """
    try:
        return tf.saved_model.load(directory)
    except Exception as e:  # TensorFlow: "Op type not registered 'FastBertNormalize' in..."
        message = str(e)
        if "not registered" not in message or message.count("'") < 2:
            raise
        op = message.split("'")[1]
        raise RuntimeError(f"the SavedModel {directory} holds the op {op}, which TensorFlow "
                           f"does not define: pip install '{TEXT_REQUIREMENT}' (a WordPiece "
                           f"tokenizer's ops are TensorFlow Text's)") from None


mlflow.models.set_model(SavedModelPredictor())
