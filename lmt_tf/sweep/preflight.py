"""What a sweep checks before its first trial, so that a mistake every trial would share
is found before any trains: the metric it optimises against the metrics the experiment
logs, and a dry run (``lmt run --dry-run``) of the experiment with one trial's bindings.
"""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Sequence

from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.runtime.processes import child_environment

# Stages that fine-tune with the experiment's loss and metrics, logged under their name
# as the train stage logs them plainly (prune/val_accuracy beside val_accuracy).
_FINE_TUNING = ("prune", "cluster", "qat", "distill")


def logged_metrics(stages: Sequence[str], metrics: Sequence[str]) -> set[str]:
    """The names of the metrics that an experiment with ``stages`` (their names) and
    ``TrainConfig.metrics`` = ``metrics`` surely logs. Not every one it logs: a technique
    or a stage may add others (gradient_norm, evaluate/macro_f1)."""
    base = ["loss", *metrics]
    family = [f"{split}{m}" for split in ("", "val_", "test_") for m in base]
    names: set[str] = set()
    for stage in stages:
        if stage == "train":
            names.update([*family, "examples_per_second"])
        elif stage in _FINE_TUNING:
            names.update(f"{stage}/{m}" for m in family)
        elif stage == "federate":
            names.update(f"federate/{m}" for m in ("train_loss", "test_loss",
                                                   *(f"test_{m}" for m in metrics)))
        elif stage == "evaluate":
            names.update(f"evaluate/{m}" for m in ("accuracy", "macro_precision",
                                                   "macro_recall", "macro_f1", "ece"))
        elif stage == "prototypes":
            names.add("prototypes/test_accuracy")
    return names


def check_metric(metric: str, stages: Sequence[str], metrics: Sequence[str],
                 prune: bool) -> None:
    """Refuses a ``--metric`` the experiment cannot log: a near miss of one it logs (a
    typo), a metric of a stage it does not have, and with ``--prune`` one that is not a
    per-epoch metric of its train stage (the pruner sees only those).

    Args:
      metric: the sweep's ``--metric``.
      stages: the names of the experiment's stages, in order.
      metrics: its ``TrainConfig.metrics``.
      prune: whether the sweep prunes on ``metric``.

    Raises:
      ConfigError: naming the metric and what the experiment logs.
    """
    known = logged_metrics(stages, metrics)
    per_epoch = [f"{split}{m}" for split in ("", "val_") for m in ("loss", *metrics)] \
        if "train" in stages else []
    if prune and (metric not in per_epoch and ("/" in metric or metric.startswith("test_")
                                                or "train" not in stages)):
        raise ConfigError(f"--prune judges trials each epoch on --metric, so it must be a "
                          f"per-epoch metric of the train stage ("
                          f"{', '.join(per_epoch) or 'this experiment has no train stage'}), "
                          f"got {metric!r}")
    if metric in known:
        return
    stage = metric.split("/", 1)[0] if "/" in metric else None
    if stage is not None and stage not in stages and "." not in stage and stage != "step":
        raise ConfigError(f"--metric {metric!r}: the experiment has no stage {stage!r} "
                          f"(its stages: {', '.join(stages)})")
    close = difflib.get_close_matches(metric, sorted(known), n=3, cutoff=0.8)
    if close:
        raise ConfigError(f"--metric {metric!r}: the experiment logs no such metric (did "
                          f"you mean {' or '.join(close)}?)")
    # A validation or test metric is the loss or one of TrainConfig.metrics (a technique
    # may log more while training, but not these); other names are left to the first
    # trial to show (the sweep stops if a finished trial did not log it).
    split = next((p for p in ("val_", "test_") if metric.startswith(p)), "")
    if stage is None and split and "train" in stages and \
            not metric.removeprefix(split).endswith("loss"):
        logged = sorted(m for m in known if m.startswith(split))
        raise ConfigError(f"--metric {metric!r}: the experiment logs no such metric (its "
                          f"{split.rstrip('_')} metrics: {', '.join(logged)})")


def dry_run(command: Sequence[str], what: str) -> None:
    """Runs ``command`` (a trial's ``lmt run``) with ``--dry-run``: the experiment is set
    up with the trial's bindings (data loaded, model built), nothing is trained or
    logged.

    Args:
      command: the trial's command line.
      what: the bindings, for the error message.

    Raises:
      LmtError: with the dry run's own error line, if it fails.
    """
    done = subprocess.run([*command, "--dry-run"], env=child_environment({}),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", check=False)
    if done.returncode == 0:
        return
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines()
             if line.strip() and not line.strip().startswith("In call to configurable")]
    error = lines[-1] if lines else f"exit status {done.returncode}"
    for line in reversed(lines):  # lmt's own one line, where it said one
        if line.startswith("lmt: error: "):
            error = line.removeprefix("lmt: error: ")
            break
    raise LmtError(f"the experiment fails a dry run with {what}, so every trial would: "
                   f"{error}")
