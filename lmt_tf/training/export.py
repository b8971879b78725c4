"""Export of a trained model as a SavedModel, with its size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check_types


@dataclass
class ExportConfig:
    """What a finished run exports."""

    saved_model: bool = True  # write a SavedModel and log it as a run artifact
    mlflow_model: bool = True  # log an MLflow pyfunc model serving the SavedModel

    def __post_init__(self) -> None:
        check_types(self)


def directory_size(path: Path) -> int:
    """Bytes in all files below ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_saved_model(model: keras.Model, directory: Path) -> int:
    """Writes ``model`` as a SavedModel (servable without lmt_tf) and returns its size
    in bytes."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(directory), save_format="tf", include_optimizer=False)
    return directory_size(directory)


def load_saved_model(directory: Path) -> keras.Model:
    """Loads a SavedModel written by ``export_saved_model`` under the default strategy."""
    with tf.distribute.get_strategy().scope():
        return keras.models.load_model(str(directory), compile=False)
