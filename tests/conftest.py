"""Test session set-up: the host CPU is split into two logical devices before TensorFlow
initialises, so MirroredStrategy has two replicas to work with on a CPU-only machine."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmt_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
from lmt_tf.runtime.env import configure_cpu_devices, import_tensorflow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOGICAL_CPUS = 2


def pytest_configure(config: pytest.Config) -> None:
    import_tensorflow()
    configure_cpu_devices(LOGICAL_CPUS)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs the test in an empty working directory with the embedded MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def gin_file(in_tmp: Path):
    """Writes an experiment file that includes the project's fragments; returns its path."""

    def write(text: str, name: str = "exp.gin") -> str:
        path = in_tmp / name
        path.write_text(text)
        return str(path)

    return write


def mlflow_client(directory: Path):
    """A client on the embedded store in ``directory``."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{directory / 'mlruns.db'}")


def all_runs(directory: Path) -> list:
    """Every run of every experiment in the embedded store of ``directory``."""
    if not (directory / "mlruns.db").exists():
        return []
    client = mlflow_client(directory)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


TINY = """
include 'gin/data/digits.gin'
include 'gin/models/mlp.gin'
include 'gin/strategies/default.gin'
TrainConfig.optimizer = @keras.optimizers.SGD
keras.optimizers.SGD.learning_rate = 0.1
TrainConfig.epochs = 2
TrainConfig.global_batch_size = 64
TrainConfig.verbose = 0
build_mlp.hidden_units = (32,)
"""
