"""The sweep's driver: the sweep's parent MLflow run and its trials, each an ``lmt run``
process nested under that run, in a slot of the host's devices (``devices.plan_trials``),
asked for and told to the Optuna study (``study``). The same command again resumes the
sweep: finished trials are kept (also one whose run FINISHED as its sweep was killed),
failed and killed ones run again. Before the first trial the experiment passes a dry run
(``preflight``). Optionally, Optuna's median pruner stops bad trials on a per-epoch
validation metric.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.process import EXIT_PRUNED, PARENT_RUN_ENV, TRIAL_ENV, lmt_command
from lmt_tf.rundir import check_name, safe_name
from lmt_tf.runtime.devices import DevicePlan, plan_trials, visible_gpus
from lmt_tf.runtime.processes import ProcessGroup, Task
from lmt_tf.sweep.preflight import dry_run
from lmt_tf.sweep.space import Dimension
from lmt_tf.sweep.study import (
    STUDY_FILE,
    best_trial,
    check_not_running,
    open_study,
    plan,
    storage,
)
from lmt_tf.sweep.table import TrialTable
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.tracking.read import child_run
from lmt_tf.tracking.run import TrackedRun

# At most this much of the experiment's name goes into the study's: with the hash and
# "-trial-N", every trial's run name stays within rundir.check_name's 128 characters.
_EXPERIMENT_IN_NAMES = 100
LOG_DIR = "lmt_sweeps"  # a trial's output: lmt_sweeps/<study>/trial-N.log
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")


@dataclass
class Sweep:
    """What ``lmt sweep`` runs."""

    gin_args: Sequence[str]  # the gin file, then --gin_file/--gin_param arguments
    experiment: str  # the MLflow experiment (the gin file's stem unless bound)
    dimensions: Sequence[Dimension]
    trials: int = 0  # search: trials in all; grid: its size
    sampler: str = "tpe"
    metric: str = "val_accuracy"  # the child run's final metric to optimise
    direction: str = "maximize"
    parallel: int = 1
    prune: bool = False  # median pruner on `metric` per epoch
    # Where the parent run goes (the trials' runs go where their own config says).
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    quiet: bool = False
    gpus_per_trial: int | None = None  # None: the visible GPUs split over the slots
    share_gpus: bool = False  # let more parallel trials than GPUs share them
    grid: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        kinds = {d.kind == "grid" for d in self.dimensions}
        if not self.dimensions:
            raise ConfigError("lmt sweep needs at least one --grid or --search")
        if len(kinds) > 1:
            raise ConfigError("use either --grid or --search in one sweep, not both")
        self.grid = kinds == {True}
        keys = [d.key for d in self.dimensions]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"a binding is swept twice: {keys}")
        if self.grid and self.trials:
            raise ConfigError("--trials is for --search; a grid runs each of its points")
        if not self.grid and self.trials < 1:
            raise ConfigError("--search needs --trials N (N >= 1)")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"--direction must be one of {DIRECTIONS}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {SAMPLERS}")
        if self.parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {self.parallel}")

    @property
    def study_name(self) -> str:
        """The same command names the same study (and so resumes it). It names the
        trials' runs and log directory, so it is one directory name whatever the
        experiment's name (an MLflow name may hold ``/`` or ``..``), short enough for
        every trial's run name."""
        spec = json.dumps([list(self.gin_args), [d.__dict__ for d in self.dimensions],
                           self.trials, self.sampler, self.metric, self.direction, self.prune],
                          sort_keys=True, default=str)
        return (f"{safe_name(self.experiment, _EXPERIMENT_IN_NAMES)}-"
                f"{hashlib.sha256(spec.encode()).hexdigest()[:10]}")

    def trial_name(self, number: int) -> str:
        """Trial ``number``'s run name (and run directory): ``<study>-trial-N``."""
        return check_name(f"{self.study_name}-trial-{number}", "a sweep trial's run name")

    def devices(self) -> DevicePlan:
        """Each trial slot's GPUs (see ``devices.plan_trials``); a trial runs in the slot
        that is free.

        Raises:
          ConfigError: for more parallel trials than GPUs without a sharing choice.
        """
        return plan_trials(visible_gpus(), self.parallel, self.gpus_per_trial,
                           self.share_gpus)

    def log_file(self, number: int) -> Path:
        """Where trial ``number``'s output goes: ``lmt_sweeps/<study>/trial-N.log``."""
        return Path(LOG_DIR) / self.study_name / f"trial-{number}.log"

    def grid_points(self) -> list[dict[str, str]]:
        """Every point of a grid, as ``{key: gin text}``."""
        return [dict(zip([d.key for d in self.dimensions], values, strict=True))
                for values in itertools.product(*(d.values for d in self.dimensions))]


def trial_command(sweep: Sweep, bindings: Sequence[str], number: int) -> list[str]:
    """Trial ``number``'s process: ``lmt run`` of the sweep's gin arguments with the
    trial's ``bindings``, its run named ``<study>-trial-N``."""
    return lmt_command("run", *sweep.gin_args,
                       *[arg for b in bindings for arg in ("--gin_param", b)],
                       "--run-name", sweep.trial_name(number))


def run_sweep(sweep: Sweep, echo: Callable[[str], None] = print,
              echo_error: Callable[[str], None] | None = None) -> int:
    """Runs (or resumes) ``sweep``; returns 0 if every trial finished (or was pruned),
    else 1, having said which trials failed on ``echo_error`` in one line.

    Before any trial starts: the study file is opened, a sweep of the same study still
    running elsewhere is refused, the study is reconciled with the store (a trial whose
    run FINISHED while its sweep was being killed counts as done), and the experiment
    passes a dry run with the first trial's bindings. The parent run ends FINISHED;
    FAILED (its ``lmt.error`` saying which trials failed) if a trial failed; KILLED on
    Ctrl-C/SIGTERM.

    Raises:
      LmtError: if the study file or the tracking store cannot be used, the sweep is
        running already, or the dry run fails.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    echo_error = echo_error or echo
    devices = sweep.devices()
    study = open_study(sweep)
    # The parent run: made in the experiment as `lmt run` makes it (its artifacts where
    # TrackingConfig.artifact_root says), or re-opened when the sweep resumes.
    parent = TrackedRun(sweep.tracking, sweep.experiment)
    parent_id = study.user_attrs.get("parent_run_id")
    if parent_id is not None:
        check_not_running(parent.uri, parent_id)
    pending = plan(study, sweep, parent.uri, parent_id)
    if pending.count:
        first = pending.enqueue[0] if pending.enqueue else \
            {d.key: d.every_value()[0] for d in sweep.dimensions}
        dry_run(trial_command(sweep, [f"{k} = {v}" for k, v in first.items()], 0),
                "the first trial's bindings (" + ", ".join(f"{k} = {v}" for k, v in
                                                            first.items()) + ")")
    parent.start(f"sweep-{sweep.study_name}", run_id=parent_id,
                 tags={"lmt.sweep.study": sweep.study_name})
    with parent.active():
        if parent_id is None:
            study.set_user_attr("parent_run_id", parent.run_id)
            parent.log_params({
                "sweep.space": json.dumps(
                    {d.key: list(d.values) if d.values else f"{d.kind}({d.low:g},{d.high:g})"
                     for d in sweep.dimensions}),
                "sweep.metric": sweep.metric, "sweep.direction": sweep.direction,
                "sweep.sampler": "grid" if sweep.grid else sweep.sampler,
                "sweep.prune": sweep.prune})
            echo(f"lmt sweep: study {sweep.study_name} in {STUDY_FILE}; parent run "
                 f"{parent.run_id}")
        else:
            echo(f"lmt sweep: resuming study {sweep.study_name}; parent run {parent_id}")
        for params in pending.enqueue:
            study.enqueue_trial(params, skip_if_exists=False)
        echo(f"lmt sweep: {pending.done} trial(s) done, {pending.count} to run"
             + (f" ({len(pending.enqueue)} again after failing)" if pending.rerun else ""))
        echo(f"lmt sweep: devices: {devices.describe()}")
        table = TrialTable(sweep.study_name, sweep.metric, sweep.quiet, echo)
        failures: list[str] = []
        _optimize(study, sweep, pending.count, parent, table, failures, devices)
        best = best_trial(study)
        if best is not None:
            parent.log_metrics({f"best_{sweep.metric}": best.value}, step=0)
            parent.set_tags({**{f"lmt.sweep.best.{k}": v for k, v in best.params.items()},
                             "lmt.sweep.best_run": best.user_attrs.get("run_id", "")})
        summary = (f"{len(failures)} trial(s) failed (run the same command again to retry "
                   f"them): " + "; ".join(failures)) if failures else ""
        if failures:
            parent.end("FAILED", LmtError(summary))
    table.close(best)
    if failures:
        echo_error(f"lmt: error: {summary}")
    return 0 if not failures else 1


def _optimize(study: Any, sweep: Sweep, count: int, parent: TrackedRun, table: TrialTable,
              failures: list[str], devices: DevicePlan) -> None:
    """Runs ``count`` trials, ``sweep.parallel`` at a time, each in a free slot of
    ``devices``. Trials are asked for, started and told in this thread only (Optuna's own
    threads can hand one enqueued trial to two workers on SQLite); each trial's process
    is waited for in a pool thread. A trial that finished without the metric stops the
    sweep: every other would end the same."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from optuna.trial import TrialState

    running: dict[Any, Any] = {}
    slots: dict[Any, int] = {}  # a running trial's future -> its device slot
    group = ProcessGroup(table.echo, table.echo)
    with ThreadPoolExecutor(sweep.parallel) as pool:
        try:
            while count or running:
                while count and len(running) < sweep.parallel:
                    trial = study.ask()
                    bindings = [f"{d.key} = {d.suggest(trial)}" for d in sweep.dimensions]
                    slot = min(set(range(sweep.parallel)) - set(slots.values()))
                    started = _start_trial(sweep, trial, bindings, parent.run_id, group,
                                           devices.task(f"trial:{slot}").environment())
                    future = pool.submit(_finish_trial, sweep, trial, bindings, started,
                                         parent, table, failures)
                    running[future], slots[future] = trial, slot
                    count -= 1
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    slots.pop(future)
                    if _tell(study, running.pop(future), future) == _NO_METRIC:
                        count = 0
        except BaseException:
            group.stop()  # Ctrl-C: no trial goes on running
            for future, trial in running.items():  # the next run retries those not done
                with contextlib.suppress(Exception):
                    if future.done():
                        _tell(study, trial, future)
                        continue
                with contextlib.suppress(Exception):
                    study.tell(trial, state=TrialState.FAIL)
            raise


_NO_METRIC = "no metric"


def _tell(study: Any, trial: Any, future: Any) -> str:
    """Tells the study how ``trial`` ended (its ``future``'s result); returns its state
    (``_NO_METRIC`` for a run that finished without the sweep's metric)."""
    import optuna
    from optuna.trial import TrialState

    try:
        study.tell(trial, future.result())
        return "finished"
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    except _TrialFailed as e:
        study.tell(trial, state=TrialState.FAIL)
        return e.kind


class _TrialFailed(LmtError):
    def __init__(self, reason: str, kind: str = "failed"):
        super().__init__(reason)
        self.kind = kind


@dataclass
class _Started:
    process: subprocess.Popen
    log: Path
    at: float  # time.monotonic() when it started


def _start_trial(sweep: Sweep, trial: Any, bindings: list[str], parent_id: str,
                 group: ProcessGroup, devices: dict[str, str]) -> _Started:
    log = sweep.log_file(trial.number)
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {PARENT_RUN_ENV: parent_id, **devices}
    if sweep.prune:
        environment[TRIAL_ENV] = json.dumps({
            "storage": storage(), "study": sweep.study_name,
            "trial_id": trial._trial_id, "metric": sweep.metric})  # noqa: SLF001
    process = group.start(Task("trial", trial.number),
                          trial_command(sweep, bindings, trial.number), environment, log=log)
    return _Started(process, log, time.monotonic())


def _finish_trial(sweep: Sweep, trial: Any, bindings: list[str], started: _Started,
                  parent: TrackedRun, table: TrialTable, failures: list[str]) -> float:
    """Waits for the trial's process; returns its run's ``sweep.metric``.

    Raises:
      optuna.TrialPruned: if the pruner stopped it.
      _TrialFailed: if it failed, or its run logged no such metric.
    """
    import optuna

    code = started.process.wait()
    seconds = time.monotonic() - started.at
    child, unreadable = None, ""
    try:
        child = child_run(parent.uri, parent.run_id, sweep.trial_name(trial.number))
    except Exception as e:  # the store's own errors
        unreadable = f"its run cannot be read from the store ({type(e).__name__})"
    if child is not None:
        trial.set_user_attr("run_id", child.info.run_id)
    if code == EXIT_PRUNED:
        table.add(trial.number, bindings, None, "pruned", seconds)
        raise optuna.TrialPruned()
    value = child.data.metrics.get(sweep.metric) if child is not None and code == 0 else None
    if value is None or not math.isfinite(value):
        kind = "failed"
        if code:
            # The error's own line: gin appends "In call to configurable ..." after it.
            lines = [line for line in _read(started.log).strip().splitlines() if line.strip()
                     and not line.strip().startswith("In call to configurable")]
            reason = f"exit status {code}: {(lines[-1:] or ['no output'])[0]}"
        elif unreadable or child is None:
            reason = unreadable or "it made no run"
        elif value is None:
            kind = _NO_METRIC
            reason = (f"the run logged no metric {sweep.metric!r} (it logged "
                      f"{', '.join(sorted(child.data.metrics)) or 'none'})")
        else:
            reason = f"the run's {sweep.metric} is {value}"
        failures.append(f"trial {trial.number} ({', '.join(bindings)}): {reason} "
                        f"({started.log})")
        table.add(trial.number, bindings, None, "failed", seconds)
        raise _TrialFailed(reason, kind)
    table.add(trial.number, bindings, value, "finished", seconds)
    return float(value)


def _read(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except OSError:
        return ""


