"""The logged model serves the way users deploy it: MNIST (as trained, compressed by QAT,
federated, transferred), a CSV file with missing cells and a categorical column, the
corrupted breast-cancer data, and Reuters R8 newswire (a tiny transformer with its
tokenizer inside), each trained with its preprocessing inside the model. The MLflow model
then takes raw examples (documents: strings) and answers as the run's own model does,
a column per class named by the class in output order: in-process, in a fresh
interpreter that never imported lmt_tf (through ``mlflow.pyfunc``), and through
``mlflow models serve``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lmt_tf import config
from lmt_tf.config import run_parsed
from lmt_tf.invocation import RunOptions
from tests.test_processes import _free_port, _reap, wait_for_health
from tests.tiny_text import R8, tiny_text_gin

COMMON = """
include 'gin/strategies/default.gin'
run_experiment.model = @build_mlp
build_mlp.hidden_units = (16,)
TrainConfig.optimizer = @keras.optimizers.Adam
TrainConfig.epochs = 1
TrainConfig.global_batch_size = 32
TrainConfig.verbose = 0
"""
EXPERIMENTS = {
    "mnist": "include 'gin/data/mnist.gin'\nTrainConfig.steps_per_epoch = 5\n",
    "csv": """run_experiment.data = @load_csv
load_csv.path = 'table.csv'
Preprocessing.impute = 'median'
Preprocessing.categorical = ['site']
Preprocessing.scale = 'standard'
""",
    "cancer": """include 'gin/data/breast_cancer.gin'
load_breast_cancer.missing_fraction = 0.1
load_breast_cancer.outlier_fraction = 0.02
include 'gin/preprocessing/clean.gin'
""",
    "compressed": """include 'gin/data/mnist.gin'
TrainConfig.steps_per_epoch = 5
run_experiment.stages = [@train(), @qat(), @export()]
qat.epochs = 1
""",
    "federated": """include 'gin/data/digits.gin'
include 'gin/federated/fedavg.gin'
PartitionConfig.clients = 4
FederatedConfig.rounds = 2
""",
    "transferred": """run_experiment.data = @few_shot
few_shot.data = @load_mnist
few_shot.per_class = 5
run_experiment.model = @build_transfer
build_transfer.source = '{mnist}'
""",
    "text": "include 'gin/data/reuters_r8.gin'\n" + tiny_text_gin(2000, 48)
            + "TrainConfig.steps_per_epoch = 10\n",
}
# Each run's class names, in output order.
CLASSES = {"mnist": tuple("0123456789"), "compressed": tuple("0123456789"),
           "federated": tuple("0123456789"), "transferred": tuple("0123456789"),
           "csv": ("0", "1"), "cancer": ("malignant", "benign"), "text": R8}


def _write_table(path: Path) -> None:
    """A CSV of the breast-cancer data's first five columns with 10% empty cells and a
    categorical column 'site' (1, 2 or 3)."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    rng = np.random.default_rng(0)
    rows = ["site," + ",".join(n.replace(" ", "_") for n in bunch.feature_names[:5]) + ",label"]
    for x, y in zip(bunch.data[:, :5], bunch.target, strict=True):
        cells = ["" if rng.random() < 0.1 else f"{v:g}" for v in x]
        rows.append(",".join([str(rng.integers(1, 4)), *cells, str(y)]))
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The runs in one store (the quickstart-like MNIST model, then compressed by QAT,
    federated, transferred; the CSV and breast-cancer models): for each, its model URI,
    raw test examples and the run's own predictions on them."""
    from lmt_tf.tracking.read import find_run

    root = tmp_path_factory.mktemp("served")
    _write_table(root / "table.csv")
    store = f"sqlite:///{root / 'mlruns.db'}"
    previous = os.getcwd()
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = store
    try:
        runs = {}
        for name, text in EXPERIMENTS.items():
            text = text.replace("{mnist}", runs.get("mnist", {}).get("run_id", ""))
            (root / f"{name}.gin").write_text(COMMON + text)
            config.parse([str(root / f"{name}.gin")], [])
            result = run_parsed(options=RunOptions(config_files=[f"{name}.gin"],
                                                       echo=lambda _: None))
            x = _raw_test_examples(name, root)
            runs[name] = {"uri": f"runs:/{result.run_id}/model", "x": x,
                          "run_id": result.run_id,
                          "expected": result.model.predict(x, verbose=0)}
            assert find_run(result.run_id).info.status == "FINISHED"
    finally:
        os.chdir(previous)
        del os.environ["MLFLOW_TRACKING_URI"]
    return {"store": store, "runs": runs}


def _raw_test_examples(name: str, root: Path) -> np.ndarray:
    from lmt_tf.data import files, sources, text

    splits = {"mnist": sources.load_mnist, "compressed": sources.load_mnist,
              "transferred": sources.load_mnist, "federated": sources.load_digits,
              "csv": lambda: files.load_csv(str(root / "table.csv")),
              "cancer": lambda: sources.load_breast_cancer(0.1, 0.02),
              "text": text.load_reuters}[name]()
    if name == "text":
        return splits.test.x[:300].astype(str)  # documents as a user holds them
    x = splits.test.x[:8].astype(np.float32)
    if name in ("csv", "cancer"):
        assert np.isnan(x).any(), "the raw examples include missing values"
    return x


def test_the_logged_model_answers_as_the_run_in_process(served: dict) -> None:
    import mlflow.pyfunc

    for name, run in served["runs"].items():
        with _tracking(served["store"]):
            model = mlflow.pyfunc.load_model(run["uri"])
        answer = model.predict(run["x"])
        # A column per class, named by the class, in the model's output order.
        assert tuple(answer.columns) == CLASSES[name], name
        assert tuple(model.metadata.metadata["lmt.class_names"]) == CLASSES[name], name
        assert [c.name for c in model.metadata.get_output_schema().inputs] == \
            list(CLASSES[name])
        np.testing.assert_allclose(answer.to_numpy(), run["expected"], rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_a_text_model_takes_documents_in_every_form_a_user_holds_them(served: dict) -> None:
    """A list of str, an array, a Series, a DataFrame of one column, one string: the
    same answers (the signature's one string column takes them all)."""
    import mlflow.pyfunc
    import pandas as pd

    run = served["runs"]["text"]
    docs = [str(doc) for doc in run["x"][:5]]
    with _tracking(served["store"]):
        model = mlflow.pyfunc.load_model(run["uri"])
    assert str(model.metadata.get_input_schema()) == "[string (required)]"
    for form in (docs, np.array(docs, object), pd.Series(docs), pd.DataFrame({"text": docs})):
        np.testing.assert_allclose(model.predict(form).to_numpy(), run["expected"][:5],
                                   rtol=1e-5, atol=1e-6, err_msg=type(form).__name__)
    np.testing.assert_allclose(model.predict(docs[0]).to_numpy(), run["expected"][:1],
                               rtol=1e-5, atol=1e-6)


class _tracking:
    def __init__(self, store: str):
        self.store = store

    def __enter__(self) -> None:
        import mlflow

        self.previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.store)

    def __exit__(self, *exc: object) -> None:
        import mlflow

        mlflow.set_tracking_uri(self.previous)


FRESH = """
import sys
import numpy as np
import mlflow.pyfunc
arrays = dict(np.load(sys.argv[1]))
out = {}
for name in sys.argv[2:]:
    model = mlflow.pyfunc.load_model(arrays.pop(name + "/uri").item())
    out[name] = model.predict(arrays[name + "/x"]).to_numpy()
assert not any(m.split(".")[0] == "lmt_tf" for m in sys.modules), "lmt_tf was imported"
np.savez(sys.argv[1] + ".out.npz", **out)
"""


@pytest.mark.slow
def test_a_fresh_interpreter_loads_every_logged_model_without_lmt_tf(
        served: dict, tmp_path: Path) -> None:
    arrays = {}
    for name, run in served["runs"].items():
        arrays[f"{name}/uri"] = np.array(run["uri"])
        arrays[f"{name}/x"] = run["x"]
    np.savez(tmp_path / "in.npz", **arrays)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["MLFLOW_TRACKING_URI"] = served["store"]
    done = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "in.npz"),
                           *served["runs"]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = np.load(tmp_path / "in.npz.out.npz")
    for name, run in served["runs"].items():
        np.testing.assert_allclose(answers[name], run["expected"], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "csv", "cancer", "text"])
def test_mlflow_models_serve_answers_raw_examples_as_the_run(served: dict, name: str,
                                                             tmp_path: Path) -> None:
    run, port = served["runs"][name], _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["MLFLOW_TRACKING_URI"] = served["store"]
    # The scoring server runs `uvicorn` from PATH: the environment's, as when activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", run["uri"],
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=tmp_path, env=env, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(base, server, "mlflow models serve", timeout=180)
        except AssertionError:
            raise AssertionError(log.read_text()[-3000:]) from None
        # Raw examples as a user posts them; the breast-cancer rows carry NaN for the
        # missing values (Python's JSON writes it, MLflow's server reads it); documents
        # are a JSON list of strings.
        body = json.dumps({"inputs": run["x"].tolist()}).encode()
        for _ in range(2):  # two requests: neither prints a progress bar
            request = urllib.request.Request(f"{base}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as reply:
                records = json.load(reply)["predictions"]
            # One record per example: each class's probability under its name, in order.
            assert all(tuple(record) == CLASSES[name] for record in records)
            answer = np.asarray([list(record.values()) for record in records], np.float32)
            np.testing.assert_allclose(answer, run["expected"], rtol=1e-5, atol=1e-6)
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(30)
        _reap(server)
    printed = log.read_text()
    assert "Could not locate class" not in printed
    assert "ETA" not in printed and "/step" not in printed, printed[-2000:]

