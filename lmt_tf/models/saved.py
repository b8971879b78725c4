"""A Keras model as a SavedModel on disk and back: what every export writes and every
logged-model reader loads. A SavedModel whose graph holds ops of a library beside
TensorFlow (TensorFlow Text's, for a WordPiece tokenizer inside the model) loads once
that library has registered them: ``load_saved_model`` imports it, or says in one line
what to install."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from lmt_tf.errors import LmtError

# The libraries whose ops a SavedModel of lmt may hold: module and pip requirement.
OP_LIBRARIES = {"tensorflow_text": "tensorflow-text>=2.21,<2.22"}


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
    """Loads a SavedModel written by ``export_saved_model`` under the default strategy.

    Raises:
      LmtError: if it holds ops that neither TensorFlow nor an installed library of
        ``OP_LIBRARIES`` defines.
    """
    register_ops(directory)
    with tf.distribute.get_strategy().scope():
        return keras.models.load_model(str(directory), compile=False)


def foreign_ops(directory: Path) -> set[str]:
    """The ops of the SavedModel in ``directory`` that TensorFlow itself does not define
    (a library's, such as TensorFlow Text's tokenizers)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(directory) / "saved_model.pb").read_bytes())
    ops: set[str] = set()
    for graph in proto.meta_graphs:
        functions = graph.graph_def.library.function
        nodes = [*graph.graph_def.node, *(n for f in functions for n in f.node_def)]
        # A node may call a function of the graph's library by its name.
        ops |= {n.op for n in nodes} - {f.signature.name for f in functions}
    return {op for op in ops if not hasattr(tf.raw_ops, op)}


def register_ops(directory: Path) -> list[str]:
    """Imports the libraries that define the ops the SavedModel in ``directory`` holds
    beyond TensorFlow's; returns their pip requirements, pinned to the installed
    versions (those a served copy of it needs besides TensorFlow).

    Raises:
      LmtError: naming the ops no installed library defines, and what to install.
    """
    from tensorflow.python.framework import op_def_registry

    unexplained = foreign_ops(directory)
    requirements = []
    for module, requirement in OP_LIBRARIES.items():
        if not unexplained:
            break
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        defined = {op for op in unexplained if op_def_registry.get(op) is not None}
        if defined:  # the ops registered once it is imported are its own
            distribution = requirement.split(">")[0].split("=")[0]
            requirements.append(f"{distribution}=={importlib.metadata.version(distribution)}")
            unexplained -= defined
    missing = {op for op in unexplained if op_def_registry.get(op) is None}
    if missing:
        install = " ".join(f"'{r}'" for r in OP_LIBRARIES.values())
        raise LmtError(f"the SavedModel {directory} holds ops TensorFlow {tf.__version__} "
                       f"does not define ({', '.join(sorted(missing))}): pip install "
                       f"{install} (a WordPiece tokenizer's are TensorFlow Text's)")
    return requirements
