"""The sweep's driver: the Optuna study in ``lmt_sweeps.db`` (SQLite, in the working
directory beside the default MLflow store), the sweep's parent MLflow run, and the trials,
each an ``lmt run`` process nested under that run. The same command again resumes the
sweep: finished trials are kept, failed and killed ones run again. Optionally, Optuna's
median pruner stops bad trials on a per-epoch validation metric.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.process import EXIT_PRUNED, PARENT_RUN_ENV, TRIAL_ENV, lmt_command
from lmt_tf.runtime.processes import ProcessGroup, Task
from lmt_tf.sweep.space import Dimension
from lmt_tf.sweep.table import TrialTable
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.tracking.read import child_run
from lmt_tf.tracking.run import TrackedRun

STUDY_FILE = "lmt_sweeps.db"
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
        """The same command names the same study (and so resumes it)."""
        spec = json.dumps([list(self.gin_args), [d.__dict__ for d in self.dimensions],
                           self.trials, self.sampler, self.metric, self.direction, self.prune],
                          sort_keys=True, default=str)
        return f"{self.experiment}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"

    def grid_points(self) -> list[dict[str, str]]:
        """Every point of a grid, as ``{key: gin text}``."""
        return [dict(zip([d.key for d in self.dimensions], values, strict=True))
                for values in itertools.product(*(d.values for d in self.dimensions))]


def trial_command(sweep: Sweep, bindings: Sequence[str], number: int) -> list[str]:
    """Trial ``number``'s process: ``lmt run`` of the sweep's gin arguments with the
    trial's ``bindings``, its run named ``<study>-trial-N``."""
    return lmt_command("run", *sweep.gin_args,
                       *[arg for b in bindings for arg in ("--gin_param", b)],
                       "--run-name", f"{sweep.study_name}-trial-{number}")


def run_sweep(sweep: Sweep, echo: Callable[[str], None] = print) -> int:
    """Runs (or resumes) ``sweep``; returns 0 if every trial finished (or was pruned).

    The parent run ends FINISHED, FAILED if a trial failed, KILLED on Ctrl-C/SIGTERM.

    Raises:
      LmtError: if the tracking store cannot be used.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.RandomSampler(seed=0) if sweep.grid or sweep.sampler == "random"
               else optuna.samplers.TPESampler(seed=0))
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if sweep.prune \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=_storage(), study_name=sweep.study_name,
                                sampler=sampler, pruner=pruner, direction=sweep.direction,
                                load_if_exists=True)
    # The parent run: made in the experiment as `lmt run` makes it (its artifacts where
    # TrackingConfig.artifact_root says), or re-opened when the sweep resumes.
    parent = TrackedRun(sweep.tracking, sweep.experiment)
    parent_id = study.user_attrs.get("parent_run_id")
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
        pending = _plan(study, sweep)
        for params in pending.enqueue:
            study.enqueue_trial(params, skip_if_exists=False)
        echo(f"lmt sweep: {pending.done} trial(s) done, {pending.count} to run"
             + (f" ({len(pending.enqueue)} again after failing)" if pending.rerun else ""))
        table = TrialTable(sweep.study_name, sweep.metric, sweep.quiet, echo)
        failures: list[str] = []
        _optimize(study, sweep, pending.count, parent, table, failures)
        best = _best(study)
        if best is not None:
            parent.log_metrics({f"best_{sweep.metric}": best.value}, step=0)
            parent.set_tags({**{f"lmt.sweep.best.{k}": v for k, v in best.params.items()},
                             "lmt.sweep.best_run": best.user_attrs.get("run_id", "")})
        if failures:
            parent.end("FAILED")
    table.close(best)
    if failures:
        echo(f"lmt sweep: {len(failures)} trial(s) failed (run the same command again to "
             f"retry them): " + "; ".join(failures))
    return 0 if not failures else 1


def _storage() -> str:
    return f"sqlite:///{Path(STUDY_FILE).resolve()}"


def _optimize(study: Any, sweep: Sweep, count: int, parent: TrackedRun, table: TrialTable,
              failures: list[str]) -> None:
    """Runs ``count`` trials, ``sweep.parallel`` at a time. Trials are asked for, started
    and told in this thread only (Optuna's own threads can hand one enqueued trial to two
    workers on SQLite); each trial's process is waited for in a pool thread."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import optuna
    from optuna.trial import TrialState

    running: dict[Any, Any] = {}
    group = ProcessGroup(table.echo, table.echo)
    with ThreadPoolExecutor(sweep.parallel) as pool:
        try:
            while count or running:
                while count and len(running) < sweep.parallel:
                    trial = study.ask()
                    bindings = [f"{d.key} = {d.suggest(trial)}" for d in sweep.dimensions]
                    started = _start_trial(sweep, trial, bindings, parent.run_id, group)
                    running[pool.submit(_finish_trial, sweep, trial, bindings, started,
                                        parent, table, failures)] = trial
                    count -= 1
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    trial = running.pop(future)
                    try:
                        study.tell(trial, future.result())
                    except optuna.TrialPruned:
                        study.tell(trial, state=TrialState.PRUNED)
                    except LmtError:
                        study.tell(trial, state=TrialState.FAIL)
        except BaseException:
            group.stop()  # Ctrl-C: no trial goes on running
            for trial in running.values():  # the next run of the command retries them
                study.tell(trial, state=TrialState.FAIL)
            raise


@dataclass
class _Started:
    process: subprocess.Popen
    log: Path
    at: float  # time.monotonic() when it started


def _start_trial(sweep: Sweep, trial: Any, bindings: list[str], parent_id: str,
                 group: ProcessGroup) -> _Started:
    log_dir = Path(LOG_DIR) / sweep.study_name
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"trial-{trial.number}.log"
    environment = {PARENT_RUN_ENV: parent_id}
    if sweep.prune:
        environment[TRIAL_ENV] = json.dumps({
            "storage": _storage(), "study": sweep.study_name,
            "trial_id": trial._trial_id, "metric": sweep.metric})  # noqa: SLF001
    process = group.start(Task("trial", trial.number),
                          trial_command(sweep, bindings, trial.number), environment, log=log)
    return _Started(process, log, time.monotonic())


def _finish_trial(sweep: Sweep, trial: Any, bindings: list[str], started: _Started,
                  parent: TrackedRun, table: TrialTable, failures: list[str]) -> float:
    """Waits for the trial's process; returns its run's ``sweep.metric``.

    Raises:
      optuna.TrialPruned: if the pruner stopped it.
      LmtError: if it failed, or its run logged no such metric.
    """
    import optuna

    code = started.process.wait()
    seconds = time.monotonic() - started.at
    child = child_run(parent.uri, parent.run_id,
                      f"{sweep.study_name}-trial-{trial.number}")
    if child is not None:
        trial.set_user_attr("run_id", child.info.run_id)
    if code == EXIT_PRUNED:
        table.add(trial.number, bindings, None, "pruned", seconds)
        raise optuna.TrialPruned()
    value = child.data.metrics.get(sweep.metric) if child is not None and code == 0 else None
    if value is None:
        # The error's own line: gin appends "In call to configurable ..." lines after it.
        lines = [line for line in started.log.read_text().strip().splitlines()
                 if line.strip() and not line.strip().startswith("In call to configurable")]
        tail = lines[-1:] or ["no output"]
        reason = (f"exit status {code}: {tail[0]}" if code else
                  f"the run logged no metric {sweep.metric!r}")
        failures.append(f"trial {trial.number} ({', '.join(bindings)}): {reason} "
                        f"({started.log})")
        table.add(trial.number, bindings, None, "failed", seconds)
        raise LmtError(reason)
    table.add(trial.number, bindings, value, "finished", seconds)
    return float(value)


@dataclass
class _Pending:
    count: int  # trials to run now
    done: int  # finished (or pruned) already
    enqueue: list[dict[str, str]]  # fixed params of trials to run
    rerun: bool


def _plan(study: Any, sweep: Sweep) -> _Pending:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # A trial RUNNING in the study is one whose sweep was killed: run it again.
    stale = [t for t in trials if t.state == TrialState.RUNNING]
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
    have = [dict(t.params) for t in finished]
    if sweep.grid:
        todo = [p for p in sweep.grid_points() if p not in have]
        rerun = any(dict(t.params) in todo for t in [*failed, *stale])
        return _Pending(len(todo), len(finished), todo, rerun)
    again = [dict(t.params) for t in [*failed, *stale] if t.params]
    again = [p for i, p in enumerate(again) if p not in have and p not in again[:i]]
    count = max(sweep.trials - len(finished), 0)
    return _Pending(count, len(finished), again[:count], bool(again))


def _best(study: Any) -> Any:
    from optuna.trial import TrialState

    try:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return study.best_trial if complete else None
    except ValueError:
        return None
