"""The sweep's Optuna study: its file (``lmt_sweeps.db``, SQLite, in the working directory
beside the default MLflow store), what is left to run in it, reconciled with the store (a
trial whose run FINISHED while its sweep was being killed counts as done), and whether
the same sweep is running elsewhere."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmt_tf.errors import LmtError
from lmt_tf.tracking.read import child_run

if TYPE_CHECKING:
    from lmt_tf.sweep.driver import Sweep


STUDY_FILE = "lmt_sweeps.db"


def storage() -> str:
    return f"sqlite:///{Path(STUDY_FILE).resolve()}"


def open_study(sweep: Sweep) -> Any:
    """The sweep's Optuna study in ``STUDY_FILE``, made if new.

    Raises:
      LmtError: naming the file, if it cannot be read or written.
    """
    import optuna

    sampler = (optuna.samplers.RandomSampler(seed=0) if sweep.grid or sweep.sampler == "random"
               else optuna.samplers.TPESampler(seed=0))
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if sweep.prune \
        else optuna.pruners.NopPruner()
    file = Path(STUDY_FILE).resolve()
    try:
        return optuna.create_study(storage=storage(), study_name=sweep.study_name,
                                   sampler=sampler, pruner=pruner, direction=sweep.direction,
                                   load_if_exists=True)
    except Exception as e:  # sqlalchemy's, sqlite's and Optuna's own errors
        text = str(getattr(e, "orig", None) or e).strip()
        reason = (text.splitlines() or [type(e).__name__])[0]
        writable = os.access(file.parent, os.W_OK) and \
            (not file.exists() or os.access(file, os.W_OK))
        if file.exists() and not file.is_file():
            raise LmtError(f"the sweep study file {file} is not a file; move it away") from e
        if not writable or "readonly" in reason or "unable to open" in reason:
            raise LmtError(f"cannot write the sweep study file {file} ({reason}); lmt sweep "
                           f"keeps its study in the working directory: run it from a "
                           f"directory you can write to") from e
        raise LmtError(f"the sweep study file {file} cannot be used ({reason}); move it "
                       f"away to start afresh (the sweeps it holds are then forgotten)"
                       ) from e


def check_not_running(uri: str, parent_id: str) -> None:
    """Refuses to run a sweep whose parent run, or a trial run under it, is RUNNING and
    owned by a process that is alive: the same command running elsewhere (two drivers
    would hand out and retry each other's trials).

    Raises:
      LmtError: naming the run and its owner.
    """
    from lmt_tf.liveness import OWNER_HOST, OWNER_PID, owner_gone
    from lmt_tf.tracking.read import store_client

    client = store_client(uri)
    try:
        parent = client.get_run(parent_id)
        runs = [parent, *client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                          f"attributes.status = 'RUNNING'")]
    except Exception:  # the parent is gone from the store: its re-opening says so
        return
    for run in runs:
        tags = run.data.tags
        if run.info.status == "RUNNING" and OWNER_PID in tags and owner_gone(tags) is None:
            raise LmtError(f"this sweep is running already: its run {run.info.run_name} "
                           f"({run.info.run_id}) is owned by process {tags[OWNER_PID]} on "
                           f"{tags.get(OWNER_HOST, '?')}; wait for it to end, or stop it")


@dataclass
class Pending:
    count: int  # trials to run now
    done: int  # finished (or pruned) already
    enqueue: list[dict[str, str]]  # fixed params of trials to run
    rerun: bool


def plan(study: Any, sweep: Sweep, uri: str, parent_id: str | None) -> Pending:
    """What is left to run. A trial RUNNING in the study is one whose sweep was killed:
    it counts as done if its run FINISHED with the metric (the sweep was killed before
    it could say so), else it runs again."""
    import optuna
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        value = finished_value(sweep, uri, parent_id, trial.number)
        if value is None:
            study.tell(trial.number, state=TrialState.FAIL)
        else:
            optuna.trial.Trial(study, trial._trial_id).set_user_attr(  # noqa: SLF001
                "run_id", value[0])
            study.tell(trial.number, value[1])
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    have = [dict(t.params) for t in finished]
    if sweep.grid:
        todo = [p for p in sweep.grid_points() if p not in have]
        rerun = any(dict(t.params) in todo for t in failed)
        return Pending(len(todo), len(finished), todo, rerun)
    again = [dict(t.params) for t in failed if t.params]
    again = [p for i, p in enumerate(again) if p not in have and p not in again[:i]]
    count = max(sweep.trials - len(finished), 0)
    return Pending(count, len(finished), again[:count], bool(again))


def finished_value(sweep: Sweep, uri: str, parent_id: str | None, number: int
                    ) -> tuple[str, float] | None:
    """The run id and ``sweep.metric`` of trial ``number``'s run if it FINISHED with it
    (and a finite value), else None."""
    if parent_id is None:
        return None
    try:
        run = child_run(uri, parent_id, sweep.trial_name(number))
    except Exception:  # the store's own errors: the trial runs again
        return None
    value = run.data.metrics.get(sweep.metric) if run is not None else None
    if run is None or run.info.status != "FINISHED" or value is None or \
            not math.isfinite(value):
        return None
    return run.info.run_id, float(value)


def best_trial(study: Any) -> Any:
    from optuna.trial import TrialState

    try:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return study.best_trial if complete else None
    except ValueError:
        return None
