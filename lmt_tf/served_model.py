"""The MLflow model that lmt logs, as MLflow's "model from code": this file is copied into
the logged model, and serves the run's SavedModel (artifact ``saved_model``) through its
serving signature with TensorFlow alone.

So ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need neither lmt_tf nor
Keras: a fresh interpreter, or the scoring server, loads it whatever Keras version is
installed, and nothing prints a progress bar per request. The SavedModel takes raw
features (its preprocessing is inside it). This module imports nothing from lmt_tf.
"""

from __future__ import annotations

import os

# Should anything in the serving process import Keras, it must be tf-keras (Keras 2),
# which wrote the SavedModel; set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

BATCH = 1024  # examples per call of the signature
# A model with a WordPiece tokenizer inside needs TensorFlow Text's ops (lmt's logged
# model lists it in its requirements).
TEXT_REQUIREMENT = "tensorflow-text>=2.21,<2.22"


class SavedModelPredictor(mlflow.pyfunc.PythonModel):
    """Predicts with the serving signature of the SavedModel in ``saved_model``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import tensorflow as tf

        self._tf = tf
        self._loaded = _load(tf, context.artifacts["saved_model"])
        self._serve = self._loaded.signatures["serving_default"]
        ((self._input, spec),) = self._serve.structured_input_signature[1].items()
        self._shape = [-1 if d is None else int(d) for d in spec.shape]
        self._dtype = spec.dtype.as_numpy_dtype
        (self._output,) = self._serve.structured_outputs

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input,
                params: dict | None = None) -> np.ndarray:
        """The model's outputs (class probabilities) for ``model_input``: an array or a
        DataFrame of raw examples, flat or in the model's input shape."""
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else model_input
        x = np.asarray(x, self._dtype).reshape(self._shape)
        outputs = [self._serve(**{self._input: self._tf.constant(x[i:i + BATCH])})
                   [self._output].numpy() for i in range(0, len(x), BATCH)]
        return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def _load(tf, directory: str):
    """The SavedModel in ``directory``; one whose graph holds TensorFlow Text's ops (a
    WordPiece tokenizer) once ``tensorflow_text`` has registered them.

    Raises:
      RuntimeError: in one line, if those ops are missing and TensorFlow Text is not
        installed.
    """
    try:
        return tf.saved_model.load(directory)
    except Exception as e:  # TensorFlow's NotFoundError names the op
        if "not registered" not in str(e):
            raise
        op = str(e).split("'")[1] if str(e).count("'") >= 2 else "?"
        try:
            import tensorflow_text  # noqa: F401  (registers its ops with TensorFlow)
        except ImportError:
            raise RuntimeError(f"the SavedModel {directory} holds the op {op}, which "
                               f"TensorFlow Text defines: pip install "
                               f"'{TEXT_REQUIREMENT}'") from None
        return tf.saved_model.load(directory)


mlflow.models.set_model(SavedModelPredictor())
