"""A Keras model as a SavedModel on disk and back: what every export writes and every
logged-model reader loads."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf
import tf_keras as keras


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
