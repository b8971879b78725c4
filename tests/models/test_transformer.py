"""The transformer and the bag of embeddings over token ids: padding changes nothing,
masked pooling and position embeddings by hand, the tokenizer inside the exported model
(raw strings in a fresh process), and the numerics of training it: accumulation, bf16,
float16 with loss scaling."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.tokenization import Tokenizer
from lmt_tf.models.saved import export_saved_model, serving_requirements
from lmt_tf.models.transformer import (
    MaskedPooling,
    PositionEmbedding,
    build_bag_of_embeddings,
    build_transformer,
)
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer
from tests.conftest import PROJECT_ROOT
from tests.data.test_tokenization import SEQUENCE, text_splits

VOCABULARY = 60  # ids of the tests' bare models
TINY = {"embed_dim": 16, "num_heads": 2, "num_blocks": 1, "ff_dim": 32, "dropout": 0.0}


def tiny_transformer(pooling: str = "mean") -> keras.Model:
    set_seed(0)
    return build_transformer((SEQUENCE,), 4, VOCABULARY, pooling=pooling, **TINY)


def tiny_bag() -> keras.Model:
    set_seed(0)
    return build_bag_of_embeddings((SEQUENCE,), 4, VOCABULARY, embed_dim=16,
                                   hidden_units=(16,))


MODELS = {"transformer_mean": tiny_transformer,
          "transformer_max": functools.partial(tiny_transformer, "max"),
          "transformer_first": functools.partial(tiny_transformer, "first"),
          "bag_of_embeddings": tiny_bag}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padding_changes_no_prediction(name: str) -> None:
    """A document predicts the same alone and beside a longer one (its row padded)."""
    model = MODELS[name]()
    rng = np.random.default_rng(0)
    short = rng.integers(2, VOCABULARY, 5)
    long = rng.integers(2, VOCABULARY, SEQUENCE)
    alone = model(short[None], training=False).numpy()
    padded = np.zeros((2, SEQUENCE), np.int64)
    padded[0, :5], padded[1] = short, long
    beside = model(padded, training=False).numpy()
    np.testing.assert_allclose(beside[0], alone[0], atol=1e-5)
    assert np.abs(beside[1] - alone[0]).max() > 1e-3  # the other document differs


def test_masked_pooling_by_hand() -> None:
    x = tf.constant([[[1.0, 2.0], [3.0, 8.0], [5.0, -6.0]],
                     [[7.0, 1.0], [9.0, 9.0], [9.0, 9.0]],
                     [[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]]])
    ids = tf.constant([[7, 8, 9], [3, 0, 0], [0, 0, 0]], tf.int64)
    mean = MaskedPooling("mean")([x, ids]).numpy()
    np.testing.assert_allclose(mean, [[3.0, 4 / 3], [7.0, 1.0], [0.0, 0.0]], rtol=1e-6)
    maximum = MaskedPooling("max")([x, ids]).numpy()
    np.testing.assert_array_equal(maximum[:2], [[5.0, 8.0], [7.0, 1.0]])
    np.testing.assert_array_equal(MaskedPooling("first")([x, ids]).numpy(),
                                  [[1.0, 2.0], [7.0, 1.0], [4.0, 4.0]])


def test_position_embedding_adds_by_position_and_refuses_longer_sequences() -> None:
    layer = PositionEmbedding(4)
    layer.build((None, None, 2))
    layer.set_weights([np.arange(8, dtype=np.float32).reshape(4, 2)])
    np.testing.assert_array_equal(layer(tf.ones((1, 3, 2))).numpy(),
                                  [[[1, 2], [3, 4], [5, 6]]])
    with pytest.raises(tf.errors.InvalidArgumentError):
        layer(tf.ones((1, 6, 2)))  # beyond max_length: no position to add


def text_model(kind: str, model_fn=build_transformer):
    """A tiny text model, its tokenizer fitted on the corpus' training split."""
    splits = text_splits()
    tokenizer = Tokenizer(kind=kind, vocabulary_size=200, sequence_length=SEQUENCE)
    fitted = Preprocessing(tokenizer=tokenizer).fit(splits)
    set_seed(0)
    extra = TINY if model_fn is build_transformer else {"embed_dim": 16}
    builder = fitted.wrap(functools.partial(model_fn, **extra))
    return splits, builder


def test_the_tokenizer_truncates_what_positions_cannot_hold() -> None:
    _, builder = text_model("wordpiece")
    model = builder((), 4)
    words = ("oil crude the said bank " * 20).split()
    long, first = " ".join(words), " ".join(words[:SEQUENCE])
    predictions = model.predict(np.array([long, first, "oil"], object), verbose=0)
    np.testing.assert_allclose(predictions[0], predictions[1], atol=1e-6)
    assert np.abs(predictions[2] - predictions[1]).max() > 1e-3


SUBPROCESS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    sys.modules["tensorflow_text"] = None  # first without TensorFlow Text
    import mlflow
    from lmt_tf import served_model
    from lmt_tf.errors import LmtError
    from lmt_tf.models.saved import load_saved_model
    directory, out = Path(sys.argv[1]), {}

    def served(path):
        model = served_model.SavedModelPredictor()
        model.load_context(mlflow.pyfunc.PythonModelContext({"saved_model": str(path)}, None))
        return model

    try:
        load_saved_model(directory / "wordpiece")
    except LmtError as e:
        out["lmt_error"] = str(e)
    try:
        served(directory / "wordpiece")
    except RuntimeError as e:
        out["served_error"] = str(e)
    del sys.modules["tensorflow_text"]
    docs = json.loads((directory / "docs.json").read_text())
    for kind in ("words", "wordpiece"):
        expected = np.load(directory / f"{kind}.npy")
        out[kind] = [float(np.abs(served(directory / kind).predict(None, docs)
                                  - expected).max())]
    lmt = load_saved_model(directory / "wordpiece").predict(np.array(docs, object), verbose=0)
    out["wordpiece"].append(float(np.abs(lmt - expected).max()))
    print(json.dumps(out))
""")


def test_the_saved_model_predicts_raw_strings_in_a_fresh_process(tmp_path: Path) -> None:
    """Words and WordPiece: the SavedModel, loaded by the served MLflow model (TensorFlow
    alone) in a new interpreter, and the WordPiece one by lmt, predicts what the model in
    memory does; without TensorFlow Text, loading it is one line naming what to
    install."""
    docs = ["oil crude barrel", "the bank said interest rates " * 12, "oilbarrelmoney",
            "Wheat, corn and jazz!", "stock"]
    for kind in ("words", "wordpiece"):
        _, builder = text_model(kind)
        model = builder((), 4)
        np.save(tmp_path / f"{kind}.npy", model.predict(np.array(docs, object), verbose=0))
        export_saved_model(model, tmp_path / kind)
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    tensorflow = f"tensorflow=={tf.__version__}"
    text = f"tensorflow-text=={importlib.metadata.version('tensorflow-text')}"
    assert serving_requirements(tmp_path / "words") == [tensorflow]
    assert serving_requirements(tmp_path / "wordpiece") == [tensorflow, text]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", SUBPROCESS, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["words"] == [0.0] and out["wordpiece"] == [0.0, 0.0]  # served; and lmt
    assert out["lmt_error"] == (
        f"the SavedModel {tmp_path / 'wordpiece'} holds ops TensorFlow {tf.__version__} "
        f"does not define (FastBertNormalize, FastWordpieceTokenizeWithOffsets): pip "
        f"install 'tensorflow-text>=2.21,<2.22' (a WordPiece tokenizer's are TensorFlow "
        f"Text's)")
    assert out["served_error"] == (
        f"the SavedModel {tmp_path / 'wordpiece'} holds the op FastBertNormalize, which "
        f"TensorFlow does not define: pip install 'tensorflow-text>=2.21,<2.22' (a "
        f"WordPiece tokenizer's ops are TensorFlow Text's)")


def test_a_clone_predicts_what_the_model_does() -> None:
    """Evaluate and the compression stages clone the model: the tokenizer rebuilds."""
    _, builder = text_model("wordpiece")
    model = builder((), 4)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    docs = np.array(["oil crude barrel", "oilbarrelmoney said"], object)
    np.testing.assert_array_equal(copy.predict(docs, verbose=0), model.predict(docs, verbose=0))


def train(splits, builder, steps: int = 2, epochs: int = 1, **settings) -> tuple:
    config = TrainConfig(epochs=epochs, steps_per_epoch=steps, global_batch_size=32,
                         verbose=0, **settings)
    trainer = Trainer(config, default_strategy())
    set_seed(3)
    model = trainer.build_model(builder, splits)
    history = trainer.fit(model, splits, seed=1).history
    return model, history


def test_accumulating_micro_batches_gives_the_update_of_one_big_batch() -> None:
    """4 micro-batches of 8 documents, each padded to its own longest, update the
    weights as one batch of 32 padded to the longest of all."""
    splits, builder = text_model("wordpiece")
    set_seed(3)
    initial = builder((), 4).get_weights()
    sgd = functools.partial(keras.optimizers.SGD, 0.5)
    big, _ = train(splits, builder, optimizer=sgd)
    accumulated, _ = train(splits, builder, optimizer=sgd, micro_batches=4)
    assert int(accumulated.optimizer.iterations.numpy()) == 2
    moved = 0
    for before, a, b in zip(initial, big.get_weights(),
                            inference_model(accumulated).get_weights(), strict=True):
        np.testing.assert_allclose(b - before, a - before, rtol=1e-4, atol=1e-6)
        moved += int(np.abs(a - before).max() > 1e-4)
    assert moved > len(initial) // 2  # the updates compared are not nothing


def test_a_bfloat16_transformer_trains() -> None:
    splits, builder = text_model("wordpiece")
    model, history = train(splits, builder, steps=8, epochs=3, precision="mixed_bfloat16",
                           optimizer=functools.partial(keras.optimizers.Adam, 0.005))
    inner = inference_model(model)
    assert inner.get_layer("block0_attention").compute_dtype == "bfloat16"
    assert inner.get_layer("pooling").compute_dtype == "float32"  # sums in float32
    assert all(v.dtype == "float32" for v in inner.trainable_variables)
    assert np.isfinite(history["loss"]).all()
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    probabilities = inner.predict(splits.test.x, verbose=0)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities.argmax(axis=1) == splits.test.y).mean() > 0.8


def test_a_float16_transformer_takes_loss_scaled_steps_on_the_cpu() -> None:
    splits, builder = text_model("words")
    model, history = train(splits, builder, steps=2, precision="mixed_float16",
                           micro_batches=2)
    assert isinstance(model.optimizer, keras.mixed_precision.LossScaleOptimizer)
    inner = inference_model(model)
    assert inner.get_layer("block0_ffn1").compute_dtype == "float16"
    assert inner.output.dtype == "float32"
    assert np.isfinite(history["loss"]).all() and np.isfinite(history["gradient_norm"]).all()
    assert int(model.optimizer.iterations.numpy()) == 2
