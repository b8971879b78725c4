"""SavedModels on disk: what serving one requires beyond TensorFlow."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from lmt_tf.models.mlp import build_mlp
from lmt_tf.models.saved import export_saved_model, foreign_ops, serving_requirements


def test_a_graph_with_tensorflow_text_ops_requires_tensorflow_text(tmp_path: Path) -> None:
    import importlib.metadata

    import tensorflow_text

    export_saved_model(build_mlp((8, 8), 10, hidden_units=(4,)), tmp_path / "mlp")
    assert foreign_ops(tmp_path / "mlp") == set()
    assert serving_requirements(tmp_path / "mlp") == [f"tensorflow=={tf.__version__}"]

    class Folding(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, documents: tf.Tensor) -> tf.Tensor:
            return tensorflow_text.case_fold_utf8(documents)

    tf.saved_model.save(Folding(), str(tmp_path / "text"))
    assert foreign_ops(tmp_path / "text") == {"CaseFoldUTF8"}
    assert serving_requirements(tmp_path / "text") == [
        f"tensorflow=={tf.__version__}",
        f"tensorflow-text=={importlib.metadata.version('tensorflow-text')}"]
