"""Side-car evaluation: a separate task that evaluates each per-epoch checkpoint the chief
writes, so evaluation never slows training (TF_CONFIG task type ``evaluator``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.splits import Split
from lmt_tf.errors import LmtError
from lmt_tf.rundir import LATEST, find_run_dir
from lmt_tf.training.trainer import Trainer, latest_checkpoint

POLL_SECONDS = 1.0
# An evaluator accepts a chief's run directory made this long before it started, and
# waits this long for the chief's next checkpoint.
EVALUATOR_SLACK = 600  # seconds
EVALUATOR_TIMEOUT = 3600  # seconds


def evaluate_beside(trainer: Trainer, model: keras.Model, split: Split, work_dir: str,
                    name: str, run_name: str | None, resume: bool,
                    echo: Callable[[str], None]) -> None:
    """The evaluator task of a cluster: validates ``model`` (built, in its wrappers) at
    every checkpoint of the chief's run of experiment ``name`` as it appears: the run
    named ``run_name`` (as ``lmt launch`` names its job's), else the latest one."""
    started = time.time()

    def chiefs_run_dir() -> Path | None:
        if run_name is not None:  # named by the launcher: that run's directory
            path = Path(work_dir) / name / run_name
            return path / "checkpoints" if path.is_dir() else None
        # Else the latest run, which (unless resuming) got its checkpoint after this
        # task started.
        marker = Path(work_dir) / name / LATEST
        if not marker.is_file() or (not resume
                                    and marker.stat().st_mtime < started - EVALUATOR_SLACK):
            return None
        return find_run_dir(work_dir, name).checkpoints

    directory = wait_for_run_dir(chiefs_run_dir, timeout=EVALUATOR_TIMEOUT)
    echo(f"lmt: evaluator watching {directory}")
    evaluate_checkpoints(trainer.evaluate, model, split, directory, trainer.config.epochs,
                         echo, timeout=EVALUATOR_TIMEOUT)


def evaluate_checkpoints(evaluate: Callable[[keras.Model, Split], dict[str, float]],
                         model: keras.Model, split: Split, directory: Path, epochs: int,
                         echo: Callable[[str], None], timeout: float = 3600.0
                         ) -> dict[int, dict[str, float]]:
    """Evaluates the newest checkpoint in ``directory`` whenever a newer one appears, until
    the checkpoint of epoch ``epochs`` has been evaluated.

    Checkpoints written while an evaluation runs are skipped in favour of the newest.

    Returns:
      Metrics by epoch evaluated.

    Raises:
      LmtError: if no new checkpoint appears for ``timeout`` seconds.
    """
    results: dict[int, dict[str, float]] = {}
    done = 0
    waited_since = time.monotonic()
    while done < epochs:
        latest, epoch = latest_checkpoint(directory)
        if epoch <= done:
            if time.monotonic() - waited_since > timeout:
                raise LmtError(f"evaluator: no checkpoint after epoch {done} in {directory} "
                               f"for {timeout:g} s")
            time.sleep(POLL_SECONDS)
            continue
        try:
            tf.train.Checkpoint(model=model).restore(latest).expect_partial()
        except (tf.errors.NotFoundError, ValueError):
            continue  # removed by the chief's rotation meanwhile: take the next newest
        results[epoch] = evaluate(model, split)
        echo(f"lmt: evaluated epoch {epoch}: "
             + ", ".join(f"val_{k} {v:.4f}" for k, v in results[epoch].items()))
        done, waited_since = epoch, time.monotonic()
    return results


def wait_for_run_dir(find: Callable[[], Path | None], timeout: float) -> Path:
    """Polls ``find`` until it names a run directory (the chief creates it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found is not None:
            return found
        time.sleep(POLL_SECONDS)
    raise LmtError(f"evaluator: the chief created no run directory within {timeout:g} s")
