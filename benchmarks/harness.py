"""What the benchmark scripts share: running an experiment (a file of experiments/ with
bindings, or dataclasses into a scratch store), few-shot transfer against training from
scratch, a teacher and its students with and without distillation, the machine a result
was measured on, and writing the result under benchmarks/results/.

The scripts run as ``python benchmarks/NAME.py``, so this module is imported as
``harness`` (the script's folder is first on the path)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lmt_tf
from lmt_tf.runtime.env import import_tensorflow

import_tensorflow()
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from lmt_tf import config, experiment  # noqa: E402
from lmt_tf.data.preprocessing import Preprocessing  # noqa: E402
from lmt_tf.data.splits import Splits  # noqa: E402
from lmt_tf.invocation import Configs, ExportConfig, RunOptions  # noqa: E402
from lmt_tf.stages import Export, Train  # noqa: E402
from lmt_tf.stages.context import Stage  # noqa: E402
from lmt_tf.stages.distill import Distill  # noqa: E402
from lmt_tf.tracking.config import TrackingConfig  # noqa: E402
from lmt_tf.training.train_config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_file(file: str, bindings: Sequence[str]) -> dict[str, Any]:
    """Runs ``experiments/<file>`` with ``bindings`` (quietly, no MLflow model) in the
    store in force; its run id and its metrics."""
    from lmt_tf.tracking.read import find_run

    config.parse([str(ROOT / "experiments" / file)],
                 [*bindings, "TrainConfig.verbose = 0", "ExportConfig.mlflow_model = False"])
    result = config.run_parsed(options=RunOptions(echo=lambda _: None))
    return {"run_id": result.run_id, **find_run(result.run_id).data.metrics}


@contextlib.contextmanager
def scratch_store(tracking_uri: str | None = None) -> Iterator[Path]:
    """A temporary working directory for the runs inside, and the store in force there:
    ``tracking_uri``, else a new SQLite store in that directory."""
    before = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri or f"sqlite:///{Path(tmp) / 'mlruns.db'}"
        try:
            yield Path(tmp)
        finally:
            os.chdir(before[0])
            if before[1] is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before[1]


def few_shot_rows(shots: Sequence[int], seeds: int, transfer: tuple[str, list[str]],
                  scratch: tuple[str, list[str]],
                  per_shots: Callable[[int], list[str]] = lambda shots: []) -> list[dict]:
    """For each N of ``shots`` and each seed: test accuracy of the transferred model (an
    experiment file and its bindings), of the same data from scratch, and of the
    transferred run's prototypes, each run drawing N per class with the seed (and
    ``per_shots(N)``'s bindings); printed as they come."""
    rows = []
    for n in shots:
        for seed in range(seeds):
            common = [f"few_shot.per_class = {n}", f"few_shot.seed = {seed}",
                      f"run_experiment.seed = {seed}", *per_shots(n)]
            moved = run_file(transfer[0], [*common, *transfer[1]])
            fresh = run_file(scratch[0], [*common, *scratch[1]])
            row = {"shots": n, "seed": seed, "transfer": moved["test_accuracy"],
                   "scratch": fresh["test_accuracy"],
                   "prototypes": moved["prototypes/test_accuracy"]}
            rows.append(row)
            print(f"N={n} seed {seed}: transfer {row['transfer']:.4f}, scratch "
                  f"{row['scratch']:.4f}, prototypes {row['prototypes']:.4f}", flush=True)
    return rows


def adam_training(epochs: int, batch: int, rate: float) -> TrainConfig:
    """Quiet training with Adam at ``rate``, ``batch`` examples a step."""
    return TrainConfig(epochs=epochs, global_batch_size=batch, verbose=0,
                       optimizer=lambda: keras.optimizers.Adam(rate))


def run_in(work: Path, name: str, model: Callable[..., keras.Model], stages: list[Stage],
           seed: int, splits: Splits, train: TrainConfig,
           preprocess: Preprocessing | None = None) -> experiment.RunResult:
    """One quiet run of ``stages`` on ``splits`` with its store and run directories in
    ``work`` (no MLflow model)."""
    configs = Configs(
        train=train,
        tracking=TrackingConfig(tracking_uri=f"sqlite:///{work / 'mlruns.db'}",
                                artifact_root=str(work / "mlartifacts")),
        export=ExportConfig(mlflow_model=False),
        preprocess=preprocess if preprocess is not None else Preprocessing())
    return experiment.run_experiment(lambda: splits, model, name=name, seed=seed,
                                     work_dir=str(work / "lmt_work"), stages=stages,
                                     configs=configs, options=RunOptions(echo=lambda _: None))


def train_teacher(work: Path, model: Callable[..., keras.Model], splits: Splits,
                  train: TrainConfig, preprocess: Preprocessing | None = None
                  ) -> tuple[float, str]:
    """The teacher trained (seed 0) and exported: its test accuracy and its SavedModel."""
    start = time.perf_counter()
    teacher = run_in(work, "teacher", model, [Train(), Export()], 0, splits, train,
                     preprocess)
    accuracy = teacher.test_metrics["accuracy"]
    print(f"teacher: test accuracy {accuracy:.4f} ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return accuracy, str(teacher.run_dir / "export" / "saved_model")


def scratch_and_distilled(work: Path, student: Callable[..., keras.Model], distill: Distill,
                          seed: int, splits: Splits, train: TrainConfig,
                          preprocess: Preprocessing | None = None, name: str = "") -> dict:
    """The student trained twice from the same seed (initial weights, data order): on the
    labels alone, and by ``distill``; their test accuracies, printed."""
    runs = f"{name}-" if name else ""
    scratch = run_in(work, f"{runs}scratch{seed}", student, [Train()], seed, splits, train,
                     preprocess)
    distilled = run_in(work, f"{runs}distilled{seed}", student, [distill], seed, splits, train,
                       preprocess)
    row = {"seed": seed, "scratch": scratch.test_metrics["accuracy"],
           "distilled": distilled.test_metrics["accuracy"]}
    print(f"{name + ' ' if name else ''}seed {seed}: scratch {row['scratch']:.4f}, distilled "
          f"{row['distilled']:.4f}", flush=True)
    return row


def machine() -> dict[str, Any]:
    """What a result was measured on."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "tensorflow": tf.__version__, "lmt_tf": lmt_tf.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU"))}


def write_result(name: str, result: dict[str, Any], indent: int) -> None:
    """Writes ``result`` as benchmarks/results/<name> and says so."""
    out = RESULTS / name
    out.write_text(json.dumps(result, indent=indent) + "\n")
    print(f"wrote {out}")
