"""Distillation: the loss against a hand computation; a student taught by an earlier run,
or by this experiment's trained model under mirrored with micro-batches; bad teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.cli import main
from lmt_tf.compression.distillation import distillation_loss
from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.models.saved import export_saved_model
from lmt_tf.stages import Export, Train
from lmt_tf.stages.distill import Distill
from tests.conftest import TINY, all_runs
from tests.stages import run_stages


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_the_loss_equals_a_hand_computation(temperature: float) -> None:
    student_logits = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
    teacher_logits = np.array([[3.0, 0.5, 0.2], [0.1, 1.5, 0.3]])
    y, alpha = np.array([0, 2]), 0.3
    hard = -np.log(_softmax(student_logits)[np.arange(2), y])
    t, s = _softmax(teacher_logits / temperature), _softmax(student_logits / temperature)
    kl = np.sum(t * (np.log(t) - np.log(s)), axis=-1)
    expected = np.mean(alpha * hard + (1 - alpha) * temperature ** 2 * kl)
    got = distillation_loss(y, student_logits.astype(np.float32),
                            teacher_logits.astype(np.float32), alpha, temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def _run(stages, strategy=None, micro_batches: int = 1, **options):
    return run_stages(stages, hidden=16, epochs=2, strategy=strategy,
                      micro_batches=micro_batches,
                      optimizer=lambda: keras.optimizers.Adam(0.01), **options)


def test_logits_are_read_before_the_softmax() -> None:
    from lmt_tf.compression.distillation import logit_function
    from lmt_tf.data.sources import load_digits

    model = build_mlp((8, 8), 10)
    x = load_digits().test.x[:4]
    logits = logit_function(model)(x).numpy()
    np.testing.assert_allclose(_softmax(logits), model.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)


def test_a_student_taught_by_an_earlier_runs_model(gin_file, in_tmp: Path) -> None:
    gin_file(TINY + "build_mlp.hidden_units = (64,)\nExportConfig.mlflow_model = True\n")
    assert main(["run", "exp.gin"]) == 0
    (teacher_run,) = all_runs(in_tmp)
    result = _run([Distill(teacher=teacher_run.info.run_id, epochs=2), Export()])
    runs = {r.info.run_id: r for r in all_runs(in_tmp)}
    student_run = runs[result.run_id]
    assert student_run.info.status == "FINISHED"
    assert student_run.data.metrics["distill/test_accuracy"] > 0.6  # learnt (chance: 0.1)
    assert result.model.get_layer("dense_0").units == 16  # the student, not the teacher


def test_self_distillation_under_mirrored_with_micro_batches(in_tmp: Path) -> None:
    from lmt_tf.runtime.strategy import mirrored_strategy

    student = Distill(epochs=3, student=lambda **k: build_mlp(hidden_units=(16,), **k))
    result = _run([Train(), student], lambda: mirrored_strategy(2), micro_batches=2)
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["distill/test_accuracy"] > 0.5
    assert result.model.get_layer("dense_0").units == 16  # the student given


def test_a_missing_teacher_run_fails_with_the_earlier_stages_logged(in_tmp: Path) -> None:
    with pytest.raises(LmtError, match="no MLflow run with id or name 'no-such-run'"):
        _run([Train(), Distill(teacher="no-such-run"), Export()])
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED" and "test_accuracy" in run.data.metrics


def test_a_teacher_with_other_outputs_is_refused(in_tmp: Path) -> None:
    export_saved_model(build_mlp((8, 8), 5), in_tmp / "five")
    with pytest.raises(ConfigError, match=r"outputs \(None, 5\), but the student predicts 10"):
        _run([Distill(teacher=str(in_tmp / "five"))])


def test_bad_distillation_settings() -> None:
    with pytest.raises(ConfigError, match="distill.alpha must be in"):
        Distill(alpha=2)
    with pytest.raises(ConfigError, match="distill.temperature must be > 0"):
        Distill(temperature=0)
