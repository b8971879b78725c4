"""``lmt sweep``: a grid or a search over gin bindings on Optuna. Each trial is an
``lmt run`` process whose MLflow run is nested under the sweep's parent run; the Optuna
study lives in ``lmt_sweeps.db`` (SQLite) in the working directory, beside the default
MLflow store, so the same command again resumes the sweep: finished trials are kept,
failed and killed ones run again.

Search spaces, one binding each: ``--grid 'Adam.learning_rate=[1e-3,3e-3]'`` (values in
gin syntax) or ``--search 'Adam.learning_rate=loguniform(1e-4,1e-2)'`` (``uniform``,
``loguniform``, ``int``, ``choice``). Optional pruning of bad trials by Optuna's median
pruner on a per-epoch validation metric.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.process import EXIT_PRUNED, PARENT_RUN_ENV, TRIAL_ENV, lmt_command

STUDY_FILE = "lmt_sweeps.db"
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random")
_RANGE = re.compile(r"^(uniform|loguniform|int|choice)\((.*)\)$")


@dataclass(frozen=True)
class Dimension:
    """One binding's values: a grid's list (gin text), a range or choices."""

    key: str
    kind: str  # grid | uniform | loguniform | int | choice
    values: tuple[str, ...] = ()  # grid and choice: gin text of each value
    low: float = 0.0
    high: float = 0.0

    def example(self) -> str:
        """A value in the range, as gin text (to check the binding parses)."""
        return str(int(self.low)) if self.kind == "int" else repr(self.low)

    def suggest(self, trial: Any) -> str:
        """The trial's value, as gin text."""
        if self.kind in ("grid", "choice"):
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return str(trial.suggest_int(self.key, int(self.low), int(self.high)))
        return repr(trial.suggest_float(self.key, self.low, self.high,
                                        log=self.kind == "loguniform"))


def parse_dimension(text: str, grid: bool) -> Dimension:
    """``KEY=[v1,v2]`` (grid) or ``KEY=kind(args)`` (search).

    Raises:
      ConfigError: naming the flag and what is wrong.
    """
    flag = "--grid" if grid else "--search"
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not re.fullmatch(r"[\w.]+(/[\w.]+)?", key) or not spec:
        example = ("Adam.learning_rate=[1e-3,3e-3]" if grid
                   else "Adam.learning_rate=loguniform(1e-4,1e-2)")
        raise ConfigError(f"{flag} {text!r}: expected KEY=VALUES, e.g. {example}")
    if grid:
        if not (spec.startswith("[") and spec.endswith("]")):
            raise ConfigError(f"--grid {text!r}: the values must be a list, [v1,v2,...]")
        values = tuple(_split(spec[1:-1]))
        if not values or any(not v for v in values):
            raise ConfigError(f"--grid {text!r}: the list has an empty value")
        return Dimension(key, "grid", values)
    match = _RANGE.match(spec)
    if not match:
        raise ConfigError(f"--search {text!r}: expected uniform(a,b), loguniform(a,b), "
                          f"int(a,b) or choice(v1,v2,...)")
    kind, args = match.group(1), tuple(_split(match.group(2)))
    if kind == "choice":
        if len(args) < 2:
            raise ConfigError(f"--search {text!r}: choice needs at least two values")
        return Dimension(key, kind, args)
    try:
        low, high = (float(a) for a in args)
    except ValueError:
        raise ConfigError(f"--search {text!r}: {kind} needs two numbers, low and high") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"--search {text!r}: needs low < high" +
                          (" and low > 0" if kind == "loguniform" else ""))
    return Dimension(key, kind, (), low, high)


def _split(text: str) -> list[str]:
    """Comma-separated values, commas inside brackets, parentheses or quotes kept."""
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    return values if text.strip() else []


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
    tracking_uri: str = ""
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
        return [dict(zip([d.key for d in self.dimensions], values, strict=True))
                for values in itertools.product(*(d.values for d in self.dimensions))]


def run_sweep(sweep: Sweep, echo: Callable[[str], None] = print) -> int:
    """Runs (or resumes) ``sweep``; returns 0 if every trial finished (or was pruned).

    Raises:
      LmtError: if the tracking store cannot be used.
    """
    import mlflow
    import optuna

    from lmt_tf.liveness import owner_tags

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    client = mlflow.MlflowClient(sweep.tracking_uri)
    storage = f"sqlite:///{Path(STUDY_FILE).resolve()}"
    sampler = (optuna.samplers.RandomSampler(seed=0) if sweep.grid or sweep.sampler == "random"
               else optuna.samplers.TPESampler(seed=0))
    pruner = optuna.pruners.MedianPruner(n_warmup_steps=1) if sweep.prune \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=sweep.study_name, sampler=sampler,
                                pruner=pruner, direction=sweep.direction, load_if_exists=True)
    parent_id = study.user_attrs.get("parent_run_id")
    if parent_id is None:
        experiment = client.get_experiment_by_name(sweep.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(sweep.experiment))
        parent = client.create_run(experiment_id, run_name=f"sweep-{sweep.study_name}",
                                   tags={"lmt.sweep.study": sweep.study_name, **owner_tags()})
        parent_id = parent.info.run_id
        study.set_user_attr("parent_run_id", parent_id)
        client.log_param(parent_id, "sweep.space", json.dumps(
            {d.key: list(d.values) if d.values else f"{d.kind}({d.low:g},{d.high:g})"
             for d in sweep.dimensions}))
        settings = {"sweep.metric": sweep.metric, "sweep.direction": sweep.direction,
                    "sweep.sampler": "grid" if sweep.grid else sweep.sampler,
                    "sweep.prune": sweep.prune}
        for name, value in settings.items():
            client.log_param(parent_id, name, value)
        echo(f"lmt sweep: study {sweep.study_name} in {STUDY_FILE}; parent run {parent_id}")
    else:
        client.update_run(parent_id, status="RUNNING")
        for key, value in owner_tags().items():
            client.set_tag(parent_id, key, value)
        echo(f"lmt sweep: resuming study {sweep.study_name}; parent run {parent_id}")
    pending = _plan(study, sweep)
    for params in pending.enqueue:
        study.enqueue_trial(params, skip_if_exists=False)
    echo(f"lmt sweep: {pending.done} trial(s) done, {pending.count} to run"
         + (f" ({len(pending.enqueue)} again after failing)" if pending.rerun else ""))
    table = _Table(sweep, echo)
    failures: list[str] = []
    try:
        _optimize(study, sweep, pending.count, parent_id, client, table, failures)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, status="KILLED")
        raise
    best = _best(study)
    if best is not None:
        client.log_metric(parent_id, f"best_{sweep.metric}", best.value)
        for key, value in best.params.items():
            client.set_tag(parent_id, f"lmt.sweep.best.{key}", value)
        client.set_tag(parent_id, "lmt.sweep.best_run", best.user_attrs.get("run_id", ""))
    client.set_terminated(parent_id, status="FINISHED" if not failures else "FAILED")
    table.close(best)
    if failures:
        echo(f"lmt sweep: {len(failures)} trial(s) failed (run the same command again to "
             f"retry them): " + "; ".join(failures))
    return 0 if not failures else 1


def _optimize(study: Any, sweep: Sweep, count: int, parent_id: str, client: Any,
              table: _Table, failures: list[str]) -> None:
    """Runs ``count`` trials, ``sweep.parallel`` at a time. Trials are asked for and told
    in this thread only (Optuna's own threads can hand one enqueued trial to two workers
    on SQLite); each trial's process is waited for in a pool thread."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import optuna
    from optuna.trial import TrialState

    running: dict[Any, Any] = {}
    processes: list[subprocess.Popen] = []
    with ThreadPoolExecutor(sweep.parallel) as pool:
        try:
            while count or running:
                while count and len(running) < sweep.parallel:
                    trial = study.ask()
                    bindings = [f"{d.key} = {d.suggest(trial)}" for d in sweep.dimensions]
                    running[pool.submit(_run_trial, sweep, trial, bindings, parent_id, client,
                                        table, failures, processes)] = trial
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
            from lmt_tf.runtime.processes import stop_process_groups

            stop_process_groups(list(processes))  # Ctrl-C: no trial goes on running
            for trial in running.values():  # the next run of the command retries them
                study.tell(trial, state=TrialState.FAIL)
            raise


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


def _run_trial(sweep: Sweep, trial: Any, bindings: list[str], parent_id: str, client: Any,
               table: _Table, failures: list[str], processes: list[subprocess.Popen]) -> float:
    import optuna

    log_dir = Path("lmt_sweeps") / sweep.study_name
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"trial-{trial.number}.log"
    run_name = f"trial-{trial.number}"
    command = lmt_command("run", *sweep.gin_args,
                          *[arg for b in bindings for arg in ("--gin_param", b)],
                          "--run-name", f"{sweep.study_name}-{run_name}")
    environment = {**os.environ, PARENT_RUN_ENV: parent_id, "PYTHONUNBUFFERED": "1"}
    if sweep.prune:
        environment[TRIAL_ENV] = json.dumps({
            "storage": f"sqlite:///{Path(STUDY_FILE).resolve()}", "study": sweep.study_name,
            "trial_id": trial._trial_id, "metric": sweep.metric})  # noqa: SLF001
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=environment,
                                   start_new_session=True)
        processes.append(process)
        code = process.wait()
    seconds = time.monotonic() - started
    child = _child_run(client, parent_id, sweep.study_name, run_name)
    if child is not None:
        trial.set_user_attr("run_id", child.info.run_id)
    if code == EXIT_PRUNED:
        table.add(trial.number, bindings, None, "pruned", seconds)
        raise optuna.TrialPruned()
    value = child.data.metrics.get(sweep.metric) if child is not None and code == 0 else None
    if value is None:
        # The error's own line: gin appends "In call to configurable ..." lines after it.
        lines = [line for line in log.read_text().strip().splitlines()
                 if line.strip() and not line.strip().startswith("In call to configurable")]
        tail = lines[-1:] or ["no output"]
        reason = (f"exit status {code}: {tail[0]}" if code else
                  f"the run logged no metric {sweep.metric!r}")
        failures.append(f"trial {trial.number} ({', '.join(bindings)}): {reason} ({log})")
        table.add(trial.number, bindings, None, "failed", seconds)
        raise LmtError(reason)
    table.add(trial.number, bindings, value, "finished", seconds)
    return float(value)


def _child_run(client: Any, parent_id: str, study: str, run_name: str) -> Any:
    parent = client.get_run(parent_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                      f"attributes.run_name = '{study}-{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


class _Table:
    """Finished trials as they come: a live rich table on a terminal, a line each
    otherwise; nothing with --quiet but the summary."""

    def __init__(self, sweep: Sweep, echo: Callable[[str], None]):
        self.sweep, self.echo = sweep, echo
        self.rows: list[tuple] = []
        self.lock = threading.Lock()
        self.live = None
        if not sweep.quiet and sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._render(), refresh_per_second=2)
            self.live.start()

    def _render(self) -> Any:
        from rich.table import Table

        table = Table(title=f"lmt sweep {self.sweep.study_name}")
        for column in ("trial", "bindings", self.sweep.metric, "state", "seconds"):
            table.add_column(column)
        for number, bindings, value, state, seconds in self.rows:
            table.add_row(str(number), ", ".join(bindings),
                          "" if value is None else f"{value:.4f}", state, f"{seconds:.0f}")
        return table

    def add(self, number: int, bindings: list[str], value: float | None, state: str,
            seconds: float) -> None:
        with self.lock:
            self.rows.append((number, bindings, value, state, seconds))
            if self.live is not None:
                self.live.update(self._render())
            elif not self.sweep.quiet:
                shown = "" if value is None else f" {self.sweep.metric} {value:.4f}"
                self.echo(f"lmt sweep: trial {number} {state}{shown} ({', '.join(bindings)}; "
                          f"{seconds:.0f} s)")

    def close(self, best: Any) -> None:
        if self.live is not None:
            self.live.stop()
        if best is not None:
            self.echo(f"lmt sweep: best trial {best.number}: {self.sweep.metric} "
                      f"{best.value:.4f} with " + ", ".join(f"{k} = {v}" for k, v in
                                                          best.params.items()))
