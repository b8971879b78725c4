"""A Keras model as a SavedModel on disk and back: what every export writes and every
logged-model reader loads."""

from __future__ import annotations

import contextlib
import importlib.metadata
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
    if foreign_ops(directory):
        _register_text_ops()
    with tf.distribute.get_strategy().scope():
        return keras.models.load_model(str(directory), compile=False)


def _register_text_ops() -> None:
    """Registers the ops of tensorflow-text (a subword tokenizer's), if installed: a
    SavedModel that uses them loads only after its import (without it, TensorFlow's
    error names the op that is not registered)."""
    with contextlib.suppress(ImportError):
        import tensorflow_text  # noqa: F401


def graph_ops(directory: Path) -> set[str]:
    """The names of the ops in the SavedModel's graphs and functions (none without a
    ``saved_model.pb``: loading it will say so)."""
    from tensorflow.core.protobuf import saved_model_pb2

    file = Path(directory) / "saved_model.pb"
    if not file.is_file():
        return set()
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(file.read_bytes())
    ops = set()
    for graph in proto.meta_graphs:
        ops |= {node.op for node in graph.graph_def.node}
        for function in graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops


def foreign_ops(directory: Path) -> set[str]:
    """The ops of the SavedModel that are not TensorFlow's own (``tf.raw_ops``), such as
    a WordPiece tokenizer's from tensorflow-text."""
    return {op for op in graph_ops(directory) if not hasattr(tf.raw_ops, op)}


def serving_requirements(directory: Path) -> list[str]:
    """The pip requirements of serving the SavedModel: this TensorFlow, and
    tensorflow-text (this version) if the graph uses ops outside TensorFlow's own."""
    requirements = [f"tensorflow=={tf.__version__}"]
    if foreign_ops(directory):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            requirements.append(
                f"tensorflow-text=={importlib.metadata.version('tensorflow-text')}")
    return requirements
