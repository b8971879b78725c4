"""One task's session of a run: its run directory and MLflow run opened (or re-opened on
``--resume``, with the bindings checked), its setup recorded, and its end status set
whatever ends it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmt_tf.data.splits import Splits
from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.invocation import RunOptions
from lmt_tf.process import JOB_FILE_ENV
from lmt_tf.rundir import RunDir, check_name, find_run_dir, new_run_dir
from lmt_tf.runtime.roles import Role
from lmt_tf.runtime.strategy import StrategyInfo, variable_placement
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.tracking.credentials import redact_credentials
from lmt_tf.tracking.run import NullRun, Run, TrackedRun, host_tags


@dataclass
class Session:
    """This task's MLflow run (a ``NullRun`` on tasks other than the chief), the run
    directory it writes checkpoints and exports to, and the one a resume restores from
    (the chief's run; None for a fresh task that is not chief)."""

    run: Run
    own: RunDir
    source: RunDir | None


@contextlib.contextmanager
def open_session(role: Role, tracking: TrackingConfig, work_dir: str, name: str,
                 epochs: int, options: RunOptions) -> Iterator[Session]:
    """Opens this task's session; on leaving, the run ends FINISHED, KILLED (Ctrl-C,
    SIGTERM) or FAILED, whatever fails after it started: nothing between its start and
    its end can leave it RUNNING.

    The chief creates (or, resuming, re-opens) the MLflow run and writes the real run
    directory. Other tasks log nothing; they restore from the chief's checkpoints (a
    shared file system) and write their own (collective) saves to a scratch directory
    that is removed afterwards.

    Raises:
      ConfigError: resuming with changed bindings without ``options.allow_changes``.
      LmtError: nothing to resume, or the store or run directory cannot be used.
    """
    if options.run_name is not None:
        check_name(options.run_name, "--run-name")
    if not role.is_chief:
        restore_from = _resumed_dir(work_dir, name, options) if options.resume else None
        with tempfile.TemporaryDirectory(prefix=f"lmt-{role.task_type}{role.task_id}-") as own:
            yield Session(NullRun(), RunDir(Path(own)), restore_from)
        return
    run_dir = _resumed_dir(work_dir, name, options) if options.resume else None
    fresh = run_dir is None
    if fresh:
        run_dir = new_run_dir(work_dir, name, options.run_name)
    try:
        with run_dir.owned():
            state = run_dir.read_state()
            previous = state.get("run_id") if options.resume else None
            changes = _check_resume(state, options, epochs) if previous else {}
            run = TrackedRun(tracking, name)
            run.start(run_dir.name, run_id=previous, echo=options.echo)
            fresh = False  # the run exists: its directory stays, whatever comes
            with run.active():
                run_dir.update_state(run_id=run.run_id, experiment_id=run.experiment_id,
                                     tracking_uri=run.shown_uri, finished=False)
                if not previous:
                    run_dir.update_state(params=_params(options))
                else:
                    _record_changes(run, run_dir, changes, options)
                _report_to_launcher(run, run_dir)
                options.echo(f"lmt: MLflow run {run.run_id} "
                             f"({'resumed' if previous else 'new'}) in {run.shown_uri}")
                yield Session(run, run_dir, run_dir)
    finally:
        if fresh:  # made for a run that never started: nothing to keep or resume
            shutil.rmtree(run_dir.path, ignore_errors=True)


def _resumed_dir(work_dir: str, name: str, options: RunOptions) -> RunDir | None:
    """The run to continue. A named run (as ``lmt launch`` names its job's run) that
    never got as far as making its directory is started afresh under that name."""
    if options.run_name is not None and not (Path(work_dir) / name / options.run_name).is_dir():
        return None
    return find_run_dir(work_dir, name, options.run_name)


def _check_resume(state: Mapping[str, Any], options: RunOptions, epochs: int
                  ) -> dict[str, tuple[str, str]]:
    """What the bindings of this resume change against the run's, as
    ``{param: (before, now)}``.

    Raises:
      ConfigError: if they change anything and ``options.allow_changes`` is off.
      LmtError: if the run already finished every epoch it is bound to train.
    """
    before, now = state.get("params", {}), _params(options)
    changes = {k: (before.get(k, "(unset)"), now.get(k, "(unset)"))
               for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}
    if changes and not options.allow_changes:
        listed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items())
        raise ConfigError(f"--resume with changed bindings ({listed}); resume with the "
                          f"original ones, or add --allow-changes to record and use these")
    if state.get("finished") and state.get("epochs", 0) >= epochs:
        raise LmtError(f"nothing to resume: run {state.get('run_id')} finished all {epochs} "
                       f"epoch(s); start a new run (or resume with more TrainConfig.epochs "
                       f"and --allow-changes)")
    return changes


def _record_changes(run: TrackedRun, run_dir: RunDir, changes: Mapping[str, tuple[str, str]],
                    options: RunOptions) -> None:
    """A resume: the original config artifacts stay as they were; this resume's changes
    and resolved config go beside them, numbered."""
    resumes = run_dir.read_state().get("resumes", 0) + 1
    run_dir.update_state(resumes=resumes)
    if not changes:
        return
    run.log_text("".join(f"{k}: {a} -> {b}\n" for k, (a, b) in changes.items()),
                 f"config/resume-{resumes}/changes.txt")
    run.set_tags({"lmt.resumed_with_changes": resumes})
    run_dir.update_state(params=_params(options))


def _params(options: RunOptions) -> dict[str, str]:
    """The bindings as a run's state records them: without passwords."""
    return {k: redact_credentials(v) for k, v in options.params.items()}


def _report_to_launcher(run: TrackedRun, run_dir: RunDir) -> None:
    """Under ``lmt launch``, tells the launcher which run this job made, so that it can
    end the run if the job is stopped before the run can end itself."""
    target = os.environ.get(JOB_FILE_ENV)
    if target:
        with contextlib.suppress(OSError):
            Path(target).write_text(json.dumps({"run_id": run.run_id, "run_name": run_dir.name,
                                                "tracking_uri": run.uri}))


def config_path(run_dir: RunDir, file: str) -> str:
    """Where a config artifact goes: ``config/`` for a run's first start; a resume
    records its own beside it."""
    resumes = run_dir.read_state().get("resumes", 0)
    return f"config/resume-{resumes}/{file}" if resumes else f"config/{file}"


def log_setup(session: Session, options: RunOptions, info: StrategyInfo, role: Role,
              derived: Mapping[str, Any], variables: list[Any], splits: Splits,
              optimizers: Sequence[Any] = ()) -> None:
    """Params, tags, the data set and the config as given and as resolved, before the
    first stage; where the model's ``variables`` and the ``optimizers``' slots live
    (``placement.json``, slots named ``<optimizer>/<slot>``). A resumed run keeps its
    first params and config artifacts; a resume's go beside them."""
    run, own = session.run, session.own
    run.log_params({**options.params, **derived})
    if not options.resume:
        run.log_dataset(splits.name, splits.digest(), splits.source, splits.sizes())
        if splits.reference:  # what the data's own optimum scores: data/bayes_test_auc
            run.log_metrics({f"data/{k}": v for k, v in splits.reference.items()}, step=0)
    run.set_tags({**host_tags(), **role.tags(), "lmt.strategy": info.name,
                  "lmt.replicas": info.replicas,
                  "mlflow.source.name": " ".join(options.config_files) or "run_experiment"})
    for file in options.config_files:
        run.log_text(Path(file).read_text(), config_path(own, f"given/{Path(file).name}"))
    if options.bindings:
        run.log_text("\n".join(options.bindings) + "\n", config_path(own, "given/bindings.gin"))
    if options.config_text:
        run.log_text(options.config_text, config_path(own, "config.gin"))
    placement = variable_placement(variables)
    for optimizer in optimizers:
        placement.update({f"{optimizer.name}/{name}": devices for name, devices
                          in variable_placement(list(optimizer.variables)).items()})
    run.log_text(json.dumps(placement, indent=2) + "\n", "placement.json")
