"""Compression of a tiny Reuters R8 transformer, tokenizer in front: pruning reaches the
target in the attention projections and leaves the embeddings, layer norms and custom
layers dense; the ``.tflite`` takes the tokenizer's ids, and their padding is inert (a
WordPiece model's ids too, a bag of words' TF-IDF vectors); QAT refuses in one line before
training; the distilled student has the teacher's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf import experiment
from lmt_tf.cli import main
from lmt_tf.compression.pruning import check_m_by_n, pruned_layers
from lmt_tf.compression.tflite import inner_dtypes, interpreter, predict, tokenized, tokenizer
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.tokenization import BagOfWords, Tokenize, Tokenizer, WordPieceTokenize
from lmt_tf.errors import ConfigError
from lmt_tf.invocation import Configs, ExportConfig, RunOptions
from lmt_tf.models.transformer import build_bag_of_embeddings
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.stages import Train
from lmt_tf.stages.context import RunContext, Stage
from lmt_tf.stages.distill import Distill
from lmt_tf.stages.prune import Prune
from lmt_tf.stages.quantize import TFLite
from lmt_tf.training.train_config import TrainConfig
from tests.conftest import all_runs, mlflow_client
from tests.tiny_text import (
    TOKENS,
    r8_few_shot_gin,
    tiny_r8,
    tiny_text_configs,
    tiny_text_gin,
    tiny_text_model,
    tiny_transformer,
)

PROJECTIONS = ("query", "key", "value", "attention_output")


class _Keep(Stage):
    """Keeps the model the stages before it left (the pruned one, here)."""

    name = "keep"

    def __init__(self) -> None:
        self.model: keras.Model | None = None

    def work(self, context: RunContext) -> None:
        self.model = context.model


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory):
    """One run: train, prune the attention and feed-forward kernels to 50%, TFLite float
    and int8 of the pruned model, distil it into a bag of embeddings."""
    directory = tmp_path_factory.mktemp("text")
    kept = _Keep()
    stages = [Train(), Prune(final_sparsity=0.5, epochs=1, frequency=1,
                             layers=("block*_attention", "block*_ffn*")),
              kept, TFLite(modes=("float", "int8"), representative_examples=50),
              Distill(student=lambda **k: build_bag_of_embeddings(embed_dim=8, **k),
                      epochs=1)]
    configs = Configs(
        train=TrainConfig(epochs=1, global_batch_size=32, verbose=0,
                          optimizer=lambda: keras.optimizers.Adam(0.003)),
        export=ExportConfig(mlflow_model=False),
        preprocess=Preprocessing(tokenizer=Tokenizer(vocabulary_size=2000,
                                                     sequence_length=TOKENS)))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = experiment.run_experiment(
            tiny_r8, tiny_transformer, name="text", strategy=default_strategy,
            stages=stages, configs=configs, options=RunOptions(echo=lambda _: None))
    (run,) = all_runs(directory)
    return directory, run, result, kept.model


def _artifact(directory: Path, run, path: str) -> str:
    return Path(mlflow_client(directory).download_artifacts(
        run.info.run_id, path, str(directory))).read_text()


def test_pruning_reaches_the_target_in_every_attention_projection(text_run) -> None:
    directory, run, _, pruned = text_run
    attention = pruned.get_layer("block0_attention")
    assert isinstance(attention, keras.layers.MultiHeadAttention)  # stripped, not wrapped
    kernels = {w.name.split("/")[-2]: w.numpy() for w in attention.weights
               if w.name.endswith("kernel:0")}
    assert sorted(kernels) == sorted(PROJECTIONS)
    kernels.update({name: pruned.get_layer(name).kernel.numpy()
                    for name in ("block0_ffn1", "block0_ffn2")})
    for name, kernel in kernels.items():
        # TF-MOT keeps round(size * (1 - sparsity)) weights of each kernel.
        assert int(np.sum(kernel == 0)) == kernel.size - round(kernel.size * 0.5), name
    assert run.data.metrics["prune/sparsity/block0_attention"] == pytest.approx(0.5)
    # The rest stays dense: embeddings, layer norms, the head, every bias.
    for layer in ("token_embedding", "position_embedding", "block0_norm1", "final_norm",
                  "predictions"):
        for weight in pruned.get_layer(layer).weights:
            assert np.mean(weight.numpy() == 0) < 0.01, weight.name
    assert isinstance(pruned.get_layer("preprocess_tokenize"), Tokenize)


def test_layers_to_prune_by_pattern_and_what_cannot_be_pruned() -> None:
    model = tiny_transformer(input_shape=(TOKENS,), num_classes=8, vocabulary_size=100)
    assert pruned_layers(model, ("block*_attention", "block*_ffn*")) == [
        "block0_attention", "block0_ffn1", "block0_ffn2"]
    # TF-MOT's choice by default: every kernel it prunes, the embedding's included; no
    # layer norm (its registry lists none of their weights), no custom layer.
    assert pruned_layers(model) == ["block0_attention", "block0_ffn1", "block0_ffn2",
                                    "predictions", "token_embedding"]
    with pytest.raises(ConfigError, match=r"pattern 'block9\*' matches no prunable layer"):
        pruned_layers(model, ("block9*",))
    with pytest.raises(ConfigError, match=r"prune cannot prune \['block0_norm1'\]"):
        pruned_layers(model, ("block0_norm1",))
    # 2:4 masks are for 2-D and 4-D kernels; an attention projection is 3-D.
    check_m_by_n(model, ["block0_ffn1", "token_embedding"])
    with pytest.raises(ConfigError, match=r"prune.m_by_n prunes 2-D .* of block0_attention "
                                          r"is 3-D \(16, 2, 8\)"):
        check_m_by_n(model, ["block0_attention"])


def test_what_pruning_leaves_dense_is_one_logged_line(text_run) -> None:
    directory, run, _, _ = text_run
    line = _artifact(directory, run, "prune/layers.txt")
    assert line.count("\n") == 1
    assert line.startswith("pruning block0_attention (query, key, value, attention_output "
                           "kernels), block0_ffn1, block0_ffn2; left dense: ")
    for part in ("preprocess_tokenize (Tokenize): no weights",
                 "token_embedding (Embedding), predictions (Dense): not in prune.layers",
                 "position_embedding (PositionEmbedding): not in TF-MOT's prune registry",
                 "block0_norm1, block0_norm2, final_norm (LayerNormalization)",
                 "biases"):
        assert part in line, (part, line)


def test_the_tflite_model_takes_token_ids_and_their_padding_is_inert(text_run) -> None:
    directory, run, _, pruned = text_run
    flat = (directory / "lmt_work").glob("text/*/stages/tflite/model_float.tflite")
    flat = next(flat).read_bytes()
    documents = tiny_r8().test.x
    ids = tokenized(pruned, documents)
    assert ids.shape == (len(documents), TOKENS) and ids.dtype == np.int64
    lite = predict(flat, ids)
    # Each short document alone in Keras (no padding at all) against its ids padded
    # with 0 to the sequence length in LiteRT: the masks make the padding inert.
    lengths = (ids != 0).sum(axis=1)
    short = np.flatnonzero(lengths < TOKENS // 2)
    assert len(short) >= 10
    alone = np.concatenate([pruned(tf.constant([documents[i]])).numpy() for i in short])
    np.testing.assert_allclose(lite[short], alone, atol=1e-5)
    np.testing.assert_allclose(lite, pruned.predict(documents, verbose=0), atol=1e-5)
    metrics = run.data.metrics
    assert metrics["tflite/float/test_accuracy"] == pytest.approx(
        metrics["prune/test_accuracy"], abs=1e-6)
    # int8, calibrated on the tokenizer's ids of training documents: weights and
    # activations of the feed-forward layers in int8; attention's masked softmax float
    # (the -1e9 Keras adds for padding would take the whole int8 range); predictions
    # close to the float model's.
    int8 = next((directory / "lmt_work").glob("text/*/stages/tflite/model_int8.tflite"))
    dtypes = inner_dtypes(int8.read_bytes())
    ffn = {dtype for name, dtype in dtypes.items() if "/block0_ffn1/" in name}
    assert ffn <= {"int8", "int32"} and "int8" in ffn, ffn
    # The scores plus the mask, and their softmax, in float (then quantized for the
    # int8 product with the values).
    softmax = {name.rpartition("/")[2]: dtype for name, dtype in dtypes.items()
               if "/block0_attention/softmax" in name}
    assert softmax["add"] == softmax["Softmax"] == "float32", softmax
    agreement = np.mean(np.argmax(predict(int8.read_bytes(), ids), -1) == np.argmax(lite, -1))
    assert agreement >= 0.9, agreement
    assert metrics["tflite/int8/bytes"] < metrics["tflite/float/bytes"] / 2


def test_the_distilled_student_has_the_teachers_tokenizer(text_run) -> None:
    directory, run, result, _ = text_run
    student = result.model
    assert student.name == "bag_of_embeddings"
    (tokenize,) = [layer for layer in student.layers if isinstance(layer, Tokenize)]
    fitted = json.loads(_artifact(directory, run, "preprocessing/fitted.json"))
    assert tokenize.vocabulary == fitted["steps"][0]["vocabulary"]
    assert tokenize.sequence_length == TOKENS
    documents = tiny_r8().test.x[:4]
    assert student.predict(documents, verbose=0).shape == (4, 8)  # raw strings in
    assert 0 < run.data.metrics["distill/test_accuracy"] <= 1


def test_qat_refuses_the_transformer_in_one_line_before_training(gin_file, in_tmp: Path,
                                                                 capsys) -> None:
    gin_file("include 'gin/strategies/default.gin'\n" + tiny_text_gin(2000, TOKENS)
             + r8_few_shot_gin(5) + "TrainConfig.global_batch_size = 8\n"
             "TrainConfig.verbose = 0\nExportConfig.mlflow_model = False\n"
             "run_experiment.stages = [@train(), @qat(), @tflite()]\n")
    assert main(["run", "exp.gin"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("lmt: error: qat cannot quantize 'transformer': TF-MOT "), err
    for named in ("token_embedding (Embedding)", "block0_attention (MultiHeadAttention)",
                  "(LayerNormalization)", "position_embedding (PositionEmbedding)",
                  "tflite.modes = ['int8']"):
        assert named in err[0], (named, err[0])
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED" and "loss" not in run.data.metrics  # nothing trained


@pytest.mark.parametrize("kind", ["wordpiece", "tf_idf"])
def test_a_wordpiece_or_bag_of_words_model_converts_behind_its_tokenizer(
        kind: str, in_tmp: Path) -> None:
    """WordPiece ids, like words', go to the network after the tokenizer, which converts;
    a bag of words' TF-IDF vectors likewise (its string ops are not TFLite builtins
    either). The ``.tflite`` answers on them as the Keras model does on the documents."""
    echoed: list[str] = []
    result = experiment.run_experiment(
        tiny_r8, tiny_text_model(kind), name=kind, strategy=default_strategy,
        stages=[Train(), TFLite(modes=("float",))], configs=tiny_text_configs(kind),
        options=RunOptions(echo=echoed.append))
    model = result.model
    tokenize = tokenizer(model)
    documents = tiny_r8().test.x
    x = tokenized(model, documents)
    if kind == "wordpiece":
        assert isinstance(tokenize, WordPieceTokenize)
        assert x.dtype == np.int64 and x.shape == (len(documents), TOKENS)
        takes = f"take token ids ({TOKENS} int64 per document, padded with 0)"
    else:
        assert isinstance(tokenize, BagOfWords)
        width = len(tokenize.vocabulary) + 1
        assert x.dtype == np.float32 and x.shape == (len(documents), width)
        takes = f"take TF-IDF vectors ({width} float32 per document)"
    assert any(takes in line for line in echoed), echoed
    flat = (result.run_dir / "stages" / "tflite" / "model_float.tflite").read_bytes()
    (entry,) = interpreter(flat).get_input_details()
    assert entry["dtype"] == x.dtype and entry["shape"][1] == x.shape[1]
    np.testing.assert_allclose(predict(flat, x), model.predict(documents, verbose=0),
                               atol=1e-5)
    (run,) = all_runs(in_tmp)
    assert run.data.metrics["tflite/float/test_accuracy"] == pytest.approx(
        result.test_metrics["accuracy"], abs=1e-6)
