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
from lmt_tf.training.trainer import latest_checkpoint

POLL_SECONDS = 1.0


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
