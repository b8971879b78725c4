"""Quantization: TFLite exports measured in LiteRT, int8 weights, agreement with the
float model; quantization-aware fine-tuning into an int8 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.compression.tflite import convert, float_front, inner_dtypes, predict
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.data.sources import load_breast_cancer, load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.runtime.env import set_seed
from lmt_tf.stages import Train
from lmt_tf.stages.context import model_ready
from lmt_tf.stages.quantize import QAT, TFLite
from tests.conftest import all_runs
from tests.stages import run_stages

# int8 rounds weights and activations to 256 levels: a prediction changes only where the
# top two classes were within that rounding of each other. On a model that is right on
# ~95% of digits such near-ties are a few percent; 95% agreement leaves room for them and
# still fails a broken conversion (which agrees on ~10%, chance for 10 classes).
AGREEMENT = 0.95


def _run(stages, strategy=None):
    return run_stages(stages, hidden=64, epochs=4, strategy=strategy,
                      optimizer=lambda: keras.optimizers.Adam(0.01))


def _tflite(result, mode: str) -> bytes:
    return (result.run_dir / "stages" / "tflite" / f"model_{mode}.tflite").read_bytes()


def test_post_training_quantization_in_every_mode(in_tmp: Path) -> None:
    result = _run([Train(), TFLite(modes=("float", "dynamic", "float16", "int8"))])
    (run,) = all_runs(in_tmp)
    metrics = run.data.metrics
    x, _ = model_ready(load_digits().test)
    keras_predictions = result.model.predict(x, verbose=0)
    # The float conversion is the same function: LiteRT's accuracy equals Keras'.
    assert metrics["tflite/float/test_accuracy"] == pytest.approx(
        result.test_metrics["accuracy"], abs=1e-6)
    dtypes = {mode: set(inner_dtypes(_tflite(result, mode)).values())
              for mode in ("float", "float16", "int8")}
    assert dtypes["float"] == {"float32"} and "float16" in dtypes["float16"]
    assert dtypes["int8"] <= {"int8", "int32"}, dtypes  # weights and activations
    int8 = predict(_tflite(result, "int8"), x)
    agreement = np.mean(np.argmax(int8, -1) == np.argmax(keras_predictions, -1))
    assert agreement >= AGREEMENT, agreement
    # 4x fewer weight bytes; the flatbuffer's fixed part weighs on a model this small.
    assert metrics["tflite/int8/bytes"] < metrics["tflite/float/bytes"] / 2
    assert metrics["tflite/int8/test_accuracy"] > result.test_metrics["accuracy"] - 0.03
    assert all(metrics[f"tflite/{m}/latency_ms"] > 0 for m in ("float", "int8"))


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_quantization_aware_training_gives_an_int8_model(in_tmp: Path, strategy: str) -> None:
    from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy

    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    result = _run([Train(), QAT(epochs=1), TFLite(modes=("int8",))], make)
    (run,) = all_runs(in_tmp)
    qat_accuracy = run.data.metrics["qat/test_accuracy"]
    assert qat_accuracy > 0.85
    flat = _tflite(result, "int8")
    assert set(inner_dtypes(flat).values()) <= {"int8", "int32"}
    # QAT learned the int8 rounding: the converted model keeps the QAT model's accuracy.
    assert run.data.metrics["tflite/int8/test_accuracy"] == pytest.approx(qat_accuracy,
                                                                          abs=0.02)


@pytest.mark.parametrize("make, message", [
    (lambda: TFLite(modes=("int4",)), "tflite.modes must be a list of values from"),
    (lambda: TFLite(modes=()), "tflite.modes must list some of"),
    (lambda: QAT(preserve="everything"), "qat.preserve must be None or one of"),
    (lambda: QAT(epochs=0), "qat.epochs must be >= 1, got 0"),
])
def test_bad_quantization_settings(make, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_compression_report_has_a_row_per_stage_output(in_tmp: Path) -> None:
    import json

    from lmt_tf.stages.prune import Prune
    from tests.conftest import mlflow_client

    _run([Train(), Prune(final_sparsity=0.5, epochs=1, frequency=1),
          TFLite(modes=("float", "int8"))])
    (run,) = all_runs(in_tmp)
    client = mlflow_client(in_tmp)
    rows = json.loads(Path(client.download_artifacts(
        run.info.run_id, "compression/report.json", str(in_tmp))).read_text())
    by_stage = {row["stage"]: row for row in rows}
    assert list(by_stage) == ["train", "prune", "tflite:float", "tflite:int8"]
    assert by_stage["prune"]["nonzero_parameters"] < 0.6 * by_stage["train"]["nonzero_parameters"]
    assert by_stage["prune"]["gzip_bytes"] < by_stage["train"]["gzip_bytes"]
    assert by_stage["tflite:int8"]["bytes"] < by_stage["tflite:float"]["bytes"]
    assert by_stage["tflite:int8"]["test_accuracy"] == pytest.approx(
        run.data.metrics["tflite/int8/test_accuracy"])
    assert by_stage["prune"]["test_accuracy"] == pytest.approx(
        run.data.metrics["prune/test_accuracy"])
    assert all(row["latency_ms"] > 0 for row in rows)
    # Every latency says where it was measured (here, without a GPU: the CPU).
    assert by_stage["train"]["measured_on"] == "Keras, CPU"
    assert by_stage["tflite:int8"]["measured_on"] == "LiteRT, CPU, 1 thread"
    table = Path(client.download_artifacts(run.info.run_id, "compression/report.md",
                                           str(in_tmp))).read_text()
    assert table.count("\n") == 2 + len(rows) and "| tflite:int8 |" in table


def test_int8_keeps_a_tabular_preprocessing_front_float() -> None:
    """Raw breast-cancer features span areas in the thousands and ratios below 0.3; int8
    activations have one scale per tensor, so the imputation, clipping and scaling in
    front of the model stay float and quantization starts at their output."""
    splits = load_breast_cancer(missing_fraction=0.1, outlier_fraction=0.02)
    fitted = Preprocessing(impute="median", clip="quantile", scale="standard").fit(splits)
    set_seed(0)
    model = fitted.wrap(build_mlp)(splits.input_shape, 2)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(splits.train.x, splits.train.y, epochs=10, batch_size=64, verbose=0)
    front = float_front(model)
    for layer in ("preprocess_impute", "preprocess_clip", "preprocess_scale"):
        assert any(f"/{layer}/" in name for name in front), (layer, front)
    assert not any("dense" in name or "predictions" in name for name in front), front
    int8 = convert(model, "int8", splits.train.x)
    dtypes = inner_dtypes(int8)
    assert all(dtypes[name] != "int8" for name in front if name in dtypes), dtypes
    assert {dtypes[name] for name in dtypes if name.endswith("/MatMul")} == {"int8"}, dtypes
    x = splits.test.x
    agreement = np.mean(np.argmax(predict(int8, x), -1)
                        == np.argmax(model.predict(x, verbose=0), -1))
    assert agreement >= AGREEMENT, agreement


def test_a_mixed_float16_model_converts_as_float32() -> None:
    """A model trained under mixed_float16 converts through a float32 clone: no float16
    tensor inside the float flatbuffer, and its predictions are the Keras model's."""
    from lmt_tf.optim.model_transforms import inference_model
    from lmt_tf.runtime.strategy import default_strategy
    from lmt_tf.training.train_config import TrainConfig
    from lmt_tf.training.trainer import Trainer

    splits = load_digits()
    config = TrainConfig(epochs=1, global_batch_size=64, verbose=0,
                         precision="mixed_float16",
                         optimizer=lambda: keras.optimizers.Adam(0.01))
    trainer = Trainer(config, default_strategy())
    model = trainer.build_model(build_mlp, splits)
    trainer.fit(model, splits, seed=0)
    model = inference_model(model)
    assert model.get_layer("dense_0").compute_dtype == "float16"
    flat = convert(model, "float")
    assert "float16" not in set(inner_dtypes(flat).values())
    x = splits.test.x[:64].astype(np.float32)
    np.testing.assert_allclose(predict(flat, x), model.predict(x, verbose=0), atol=2e-3)
