"""Evaluation: per-class scores equal scikit-learn's classification_report, the ECE equals
a hand computation, robustness falls with noise; the evaluate stage logs it all, also
standalone on a logged model (`lmt evaluate`), and refuses a model that cannot take the
data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmt_tf.cli import main
from lmt_tf.evaluation import calibration, class_keys, class_report, robustness
from tests.conftest import TINY, all_runs, mlflow_client
from tests.tiny_text import R8, tiny_text_gin


def test_per_class_scores_equal_scikit_learns_classification_report() -> None:
    from sklearn.metrics import classification_report

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    probabilities = rng.dirichlet(np.ones(4), 300)
    probabilities[np.arange(150), y[:150]] += 1  # half of them right
    report = class_report(y, probabilities, 4)
    expected = classification_report(y, probabilities.argmax(-1), output_dict=True,
                                     zero_division=0)
    for c in range(4):
        for ours, theirs in (("precision", "precision"), ("recall", "recall"),
                             ("f1", "f1-score")):
            assert getattr(report, ours)[c] == pytest.approx(expected[str(c)][theirs])
        assert report.support[c] == expected[str(c)]["support"]
    assert report.accuracy == pytest.approx(expected["accuracy"])
    assert report.macro["f1"] == pytest.approx(expected["macro avg"]["f1-score"])
    assert report.confusion.sum() == 300 and np.trace(report.confusion) == \
        round(expected["accuracy"] * 300)


def test_ece_equals_a_hand_computation() -> None:
    # Four examples, 2 classes, 5 bins of width 0.2.
    probabilities = np.array([[0.9, 0.1], [0.55, 0.45], [0.3, 0.7], [0.2, 0.8]])
    y = np.array([0, 1, 1, 0])
    # Confidences 0.9 (right), 0.55 (wrong), 0.7 (right), 0.8 (wrong).
    # Bins: (0.4,0.6]: {0.55, acc 0}; (0.6,0.8]: {0.7 right, 0.8 wrong: conf 0.75, acc
    # 0.5}; (0.8,1.0]: {0.9, acc 1}.
    hand = 1 / 4 * abs(0 - 0.55) + 2 / 4 * abs(0.5 - 0.75) + 1 / 4 * abs(1 - 0.9)
    result = calibration(y, probabilities, bins=5)
    assert result.ece == pytest.approx(hand)
    assert result.counts == [0, 0, 1, 2, 1]
    assert calibration(np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 1.0]])).ece == 0


def test_accuracy_falls_as_noise_grows() -> None:
    x = np.repeat(np.eye(3, dtype=np.float32), 50, axis=0)
    y = np.repeat(np.arange(3), 50)
    curves = robustness(lambda a: a, x, y, 1.0, (0.0, 0.3, 3.0), (), seed=0)
    noise = list(curves["noise"].values())
    assert noise[0] == 1.0 and noise[0] >= noise[1] > noise[2]
    assert curves["shift"] == {}  # no image axes: no shifts


@pytest.mark.slow
def test_evaluate_stage_and_standalone_evaluation_of_a_logged_model(gin_file, in_tmp: Path,
                                                                    capsys) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 3\nrun_experiment.stages = "
                          "[@train(), @export(), @evaluate()]\nevaluate.latency_runs = 5\n")
    assert main(["run", exp]) == 0
    (trained,) = all_runs(in_tmp)
    metrics = trained.data.metrics
    assert metrics["evaluate/accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert {f"evaluate/f1/class_{c}" for c in range(10)} <= set(metrics)
    assert metrics["evaluate/accuracy_noise_0"] == metrics["evaluate/accuracy"]
    assert metrics["evaluate/accuracy_noise_1"] < metrics["evaluate/accuracy"]
    assert "evaluate/accuracy_shift_2" in metrics and metrics["evaluate/latency_ms_batch_1"] > 0
    client = mlflow_client(in_tmp)
    logged = {a.path for a in client.list_artifacts(trained.info.run_id, "evaluate")}
    for name in ("confusion_matrix.png", "reliability.png", "robustness.png",
                 "per_class.md", "evaluation.json"):
        assert f"evaluate/{name}" in logged
    plot = Path(client.download_artifacts(trained.info.run_id, "evaluate/reliability.png"))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Standalone, on the logged model: a new run pointing at the evaluated one.
    assert main(["evaluate", f"runs:/{trained.info.run_id}/model", exp,
                 "--gin_param", "evaluate.latency_runs = 5"]) == 0
    (standalone,) = [r for r in all_runs(in_tmp) if r.info.run_id != trained.info.run_id]
    assert standalone.data.tags["lmt.evaluated_run"] == trained.info.run_id
    assert standalone.data.metrics["evaluate/accuracy"] == pytest.approx(
        metrics["evaluate/accuracy"], abs=1e-6)
    assert standalone.data.metrics["evaluate/ece"] == pytest.approx(
        metrics["evaluate/ece"], abs=1e-6)

    # A model that cannot take the data: one line, exit 2.
    capsys.readouterr()
    other = gin_file(TINY.replace("include 'gin/data/digits.gin'",
                                  "include 'gin/data/breast_cancer.gin'"), "other.gin")
    assert main(["evaluate", trained.info.run_id, other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes inputs of shape (8, 8), but data breast_cancer" in err[0]


def test_class_keys_name_metrics_by_class_as_mlflow_allows() -> None:
    assert class_keys(["earn", "money-fx", "T-shirt/top", "a:b"]) == [
        "class_earn", "class_money-fx", "class_T-shirt_top", "class_a_b"]
    assert class_keys(list("0123")) == ["class_0", "class_1", "class_2", "class_3"]
    # Two names that become one key: every class by its id instead.
    assert class_keys(["a/b", "a:b"]) == ["class_0", "class_1"]
    report = class_report(np.array([0, 1, 1]), np.eye(2)[[0, 1, 0]], 2, ["spam", "ham"])
    assert report.metrics()["recall/class_ham"] == 0.5
    assert "| 1 | ham | 1.0000 | 0.5000 | 0.6667 | 2 |" in report.as_markdown()


def test_accuracy_falls_as_words_are_dropped() -> None:
    # A "model" that is right exactly when the document still holds its class's word.
    words = np.array(["alpha", "beta"])
    y = np.arange(200) % 2
    docs = np.array([" ".join([words[c]] + ["filler"] * 3) for c in y], dtype=object)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.array([[float("alpha" in d), float("beta" in d)] for d in x])

    curves = robustness(predict, docs, y, 1.0, (0.0, 1.0), (1,), seed=0,
                        word_drops=(0.0, 0.5, 0.9))
    assert set(curves) == {"word_drop"}  # no noise or shifts for documents
    drop = curves["word_drop"]
    assert drop[0.0] == 1.0 and 1.0 > drop[0.5] > drop[0.9] > 0.0


TINY_TEXT = "include 'gin/data/reuters_r8.gin'\n" + tiny_text_gin(1000, 32) + """
include 'gin/strategies/default.gin'
TrainConfig.optimizer = @keras.optimizers.Adam
TrainConfig.epochs = 1
TrainConfig.steps_per_epoch = 5
TrainConfig.global_batch_size = 32
TrainConfig.verbose = 0
run_experiment.stages = [@train(), @export(), @evaluate()]
evaluate.latency_runs = 3
evaluate.word_drops = (0.0, 0.5)
"""


def test_evaluate_judges_a_text_model_on_raw_documents_by_class_name(gin_file, in_tmp: Path,
                                                                      capsys) -> None:
    import json
    import warnings

    exp = gin_file(TINY_TEXT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", exp]) == 0
    printed = capsys.readouterr()
    assert "latency per document" in printed.out
    # Logging the MLflow model prints no warning of MLflow's (UserWarnings are shown to
    # a user; its store's deprecations are not) and no progress bar.
    shown = [str(w.message) for w in caught
             if "mlflow" in w.filename and issubclass(w.category, UserWarning)]
    assert not shown, shown
    assert "Downloading artifacts" not in printed.err and "it/s]" not in printed.err
    (trained,) = all_runs(in_tmp)
    metrics = trained.data.metrics
    # The raw test documents judged as served score what training's evaluation scored.
    assert metrics["evaluate/accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert {f"evaluate/{m}/class_{name}" for m in ("precision", "recall", "f1")
            for name in R8} <= set(metrics)
    assert metrics["evaluate/accuracy_word_drop_0"] == metrics["evaluate/accuracy"]
    assert not any("noise" in k or "shift" in k for k in metrics)
    assert 0 <= metrics["evaluate/ece"] <= 1 and metrics["evaluate/latency_ms_batch_1"] > 0
    client = mlflow_client(in_tmp)
    run_id = trained.info.run_id
    document = json.loads(Path(client.download_artifacts(
        run_id, "evaluate/evaluation.json")).read_text())
    assert tuple(document["class_names"]) == R8
    # Names by id: R8's test split has 1,083 'earn' and 696 'acq' stories (Cachopo).
    table = Path(client.download_artifacts(run_id, "evaluate/per_class.md")).read_text()
    assert any(line.startswith("| 2 | earn |") and line.endswith("| 1083 |")
               for line in table.splitlines())
    assert any(line.startswith("| 0 | acq |") and line.endswith("| 696 |")
               for line in table.splitlines())

    # lmt evaluate on the logged model: the same judgement in a new run.
    assert main(["evaluate", f"runs:/{run_id}/model", exp, "--gin_param",
                 "evaluate.word_drops = (0.0,)"]) == 0
    (standalone,) = [r for r in all_runs(in_tmp) if r.info.run_id != run_id]
    for key in ("evaluate/accuracy", "evaluate/ece", "evaluate/f1/class_earn"):
        assert standalone.data.metrics[key] == pytest.approx(metrics[key], abs=1e-6), key
