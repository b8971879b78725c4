"""The one gin root: ``run_experiment`` wires data, model, strategy, trainer, tracking and
export, and owns the MLflow run from its start to its final status."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin
import tensorflow as tf
import tf_keras as keras

from lmt_tf import config
from lmt_tf.checks import configured_call
from lmt_tf.data.pipeline import InputConfig, to_model_input
from lmt_tf.data.splits import Splits
from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.optim.train_step import inference_model
from lmt_tf.rundir import RunDir, check_name, find_run_dir, new_run_dir
from lmt_tf.runtime.cluster import Role
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import (
    StrategyInfo,
    default_strategy,
    describe,
    role_of,
    variable_placement,
)
from lmt_tf.tracking import (
    NullRun,
    TrackedRun,
    TrackingConfig,
    host_tags,
    redact_credentials,
    run_links,
)
from lmt_tf.training.callbacks import (
    DivergenceGuard,
    EpochCheckpoint,
    EpochMetrics,
    StepDivergenceGuard,
    StepMetrics,
    Throughput,
    TrainingDiverged,
)
from lmt_tf.training.export import ExportConfig, export_saved_model, load_saved_model
from lmt_tf.training.preemption import PREEMPTED_DIR, PreemptionCheckpoint, StartAt
from lmt_tf.training.preemption import supported as preemption_supported
from lmt_tf.training.sidecar import evaluate_checkpoints, wait_for_run_dir
from lmt_tf.training.trainer import TrainConfig, Trainer, latest_checkpoint

# An evaluator accepts a chief's run directory made this long before it started, and
# waits this long for the chief's next checkpoint.
EVALUATOR_SLACK = 600  # seconds
EVALUATOR_TIMEOUT = 3600  # seconds
# Set by `lmt launch`: a file where the chief names the MLflow run it made.
JOB_FILE_ENV = "LMT_JOB_FILE"


@dataclass
class RunOptions:
    """How one invocation runs an experiment; set by the CLI or a test, not by gin."""

    config_files: Sequence[str] = ()  # the gin files as given, logged as artifacts
    bindings: Sequence[str] = ()  # the --gin_param bindings as given
    resume: bool = False  # continue the latest run of this experiment (or run_name)
    run_name: str | None = None  # the run directory's name; None: experiment + time
    allow_changes: bool = False  # let a resume change bindings (recorded beside the config)
    dry_run: bool = False  # describe what would run, train nothing
    callbacks: Sequence[keras.callbacks.Callback] = ()  # extra Keras callbacks
    echo: Callable[[str], None] = print  # progress output


@dataclass
class RunResult:
    """What a finished run produced."""

    run_id: str | None  # None on tasks other than the chief
    experiment_id: str | None
    run_dir: Path | None
    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)


@gin.configurable(denylist=["options"])
def run_experiment(
    name: str | None = None,
    data: Callable[[], Splits] = gin.REQUIRED,
    model: Callable[..., keras.Model] = gin.REQUIRED,
    strategy: Callable[[], tf.distribute.Strategy] = default_strategy,
    seed: int = 0,
    work_dir: str = "lmt_work",
    options: RunOptions | None = None,
) -> RunResult | None:
    """Runs one experiment: train, validate, test, export, all logged to MLflow.

    Args:
      name: experiment name; None takes the stem of the first gin file.
      data: returns the data set's splits, e.g. ``@load_mnist``.
      model: builds the Keras model from ``input_shape`` and ``num_classes``.
      strategy: builds the distribution strategy, e.g. ``@mirrored_strategy``.
      seed: seeds weights, data order and hold-outs.
      work_dir: root of run directories (checkpoints, exports, resume state).
      options: how this invocation runs (resume, dry run, extra callbacks).

    Returns:
      The run's result, or None for a dry run.
    """
    options = options or RunOptions()
    echo = options.echo
    # The strategy first: splitting the CPU into logical devices must precede any op.
    strat = strategy()
    info = describe(strat)
    name = check_name(name or (Path(options.config_files[0]).stem if options.config_files
                               else "experiment"), "run_experiment.name")
    train_config: TrainConfig = config.configured(TrainConfig)
    tracking_config: TrackingConfig = config.configured(TrackingConfig)
    export_config: ExportConfig = config.configured(ExportConfig)
    set_seed(seed)
    if train_config.deterministic:
        tf.config.experimental.enable_op_determinism()

    splits = configured_call(data, "run_experiment.data")
    if not isinstance(splits, Splits):
        raise ConfigError(f"run_experiment.data must return Splits, got "
                          f"{type(splits).__name__}")
    splits.validate()
    trainer = Trainer(train_config, strat, config.configured(InputConfig))
    plan = trainer.plan(splits.train)
    echo(f"lmt: {info.name}, {info.replicas} replica(s); global batch "
         f"{plan.global_batch_size} = {plan.per_replica_batch_size} per replica; "
         f"{plan.steps_per_epoch} steps per epoch")
    sizes = splits.sizes()
    echo(f"lmt: data {splits.name}: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    if options.dry_run:
        built = inference_model(trainer.build_model(model, splits))
        echo(f"lmt: model {built.name}: {built.count_params():,} parameters")
        echo(f"lmt: would train {train_config.epochs} epoch(s) in {work_dir}/{name}; "
             f"resolved config:\n{redact_credentials(gin.config_str())}")
        return None

    role = role_of(strat)
    if role.task_type == "evaluator":
        _evaluate_beside(trainer, trainer.build_model(model, splits), splits, work_dir, name,
                         options, echo)
        return None
    with _opened_run(role, tracking_config, work_dir, name, options, echo) as (run, run_dir,
                                                                             own):
        built = trainer.build_model(model, splits)  # what trains: perhaps a wrapper
        user_model = inference_model(built)  # the model that is logged and exported
        _log_setup(run, own, options, info, role, plan, splits, user_model)
        start = (trainer.restore(built, run_dir.checkpoints, plan.steps_per_epoch)
                 if options.resume and run_dir else StartAt())
        if start != StartAt():
            echo(f"lmt: resuming {run_dir.path} at epoch {start.epoch + 1}, step "
                 f"{start.step + 1}")

        def saved(done: int) -> None:
            own.update_state(epochs=done)
            own.mark_latest()  # a run with a checkpoint is one --resume can continue

        def saved_on_preemption(step: int) -> None:
            own.update_state(preempted_at_step=step)
            own.mark_latest()

        per_step = preemption_supported(strat)  # i.e. batch-level callbacks allowed
        guard = (StepDivergenceGuard if per_step else DivergenceGuard)(plan.steps_per_epoch)
        callbacks = [guard,  # before the checkpoint
                     Throughput(run.log_metrics, plan.examples_per_epoch),
                     EpochMetrics(run.log_metrics),
                     EpochCheckpoint(trainer.checkpoint_manager(built, own.checkpoints),
                                     saved if role.is_chief else None)]
        if tracking_config.log_every_n_steps:
            callbacks.append(StepMetrics(run.log_metrics, tracking_config.log_every_n_steps,
                                         plan.steps_per_epoch))
        preemption = contextlib.nullcontext()
        if per_step:
            preemption = PreemptionCheckpoint(
                strat, trainer.checkpoint_manager(built, own.checkpoints / PREEMPTED_DIR, 1),
                plan.steps_per_epoch, saved_on_preemption if role.is_chief else None)
            callbacks.append(preemption)
        with preemption:
            result = _fit(trainer, built, splits, seed, start, [*callbacks, *options.callbacks],
                          own, plan.steps_per_epoch, run, echo)
        test = trainer.evaluate(built, splits.test)
        run.log_metrics({f"test_{k}": v for k, v in test.items()}, step=train_config.epochs)
        echo("lmt: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        _export(run, own, user_model, splits, export_config, echo)
        run.log_text(gin.operative_config_str(), _config_path(own, "operative_config.gin"))
        if role.is_chief:
            own.update_state(finished=True)
    if not role.is_chief:
        return RunResult(None, None, None, user_model, result.history, test)
    run_url, table_url = run_links(run.uri, run.experiment_id, run.run_id)
    hint = "" if run.uri.startswith("http") else " (start the UI with `lmt ui`)"
    echo(f"lmt: run {run.run_id} FINISHED{hint}\n  run:  {run_url}\n  runs: {table_url}")
    return RunResult(run.run_id, run.experiment_id, run_dir.path, user_model, result.history,
                     test)


def _fit(trainer: Trainer, model: keras.Model, splits: Splits, seed: int, start: StartAt,
         callbacks: list[keras.callbacks.Callback], own: RunDir, steps_per_epoch: int,
         run: TrackedRun | NullRun, echo: Callable[[str], None]) -> Any:
    """``trainer.fit``; with ``TrainConfig.divergence_retries``, a diverged fit rolls back
    to the last checkpoint (the weights before training if there is none yet) with a
    lower learning rate and continues, each rollback logged as an event of the run."""
    retries = trainer.config.divergence_retries
    if retries and latest_checkpoint(own.checkpoints)[0] is None:
        trainer.checkpoint_manager(model, own.checkpoints).save(checkpoint_number=0)
    for rollback in range(retries + 1):
        try:
            return trainer.fit(model, splits, seed, start, callbacks)
        except TrainingDiverged as e:
            if rollback == retries:
                raise
            start = trainer.restore(model, own.checkpoints, steps_per_epoch)
            before, after = trainer.lower_learning_rate(model)
            event = (f"step {e.step} (epoch {e.epoch}): loss {e.value}; rolled back to epoch "
                     f"{start.epoch + 1}, step {start.step + 1}; learning rate {before:g} -> "
                     f"{after:g}")
            run.set_tags({f"lmt.rollback.{rollback + 1}": event})
            run.log_metrics({"divergence_rollbacks": rollback + 1}, step=e.step)
            echo(f"lmt: training diverged at {event} ({rollback + 1}/{retries})")
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _opened_run(role: Role, tracking_config: TrackingConfig, work_dir: str, name: str,
                options: RunOptions, echo: Callable[[str], None]
                ) -> Iterator[tuple[TrackedRun | NullRun, RunDir | None, RunDir]]:
    """This task's MLflow run, the run directory to restore from (None for a fresh
    non-chief task), and the directory it writes checkpoints and exports to. On leaving,
    the run ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED, whatever fails after it
    started: nothing between its start and its end can leave it RUNNING.

    The chief creates (or, resuming, re-opens) the MLflow run and writes the real run
    directory. Other tasks log nothing; they restore from the chief's checkpoints (a
    shared file system) and write their own (collective) saves to a scratch directory
    that is removed afterwards.
    """
    if options.run_name is not None:
        check_name(options.run_name, "--run-name")
    if not role.is_chief:
        restore_from = _resumed_dir(work_dir, name, options) if options.resume else None
        with tempfile.TemporaryDirectory(prefix=f"lmt-{role.task_type}{role.task_id}-") as own:
            yield NullRun(), restore_from, RunDir(Path(own))
        return
    run_dir = _resumed_dir(work_dir, name, options) if options.resume else None
    if run_dir is None:
        run_dir = new_run_dir(work_dir, name, options.run_name)
    state = run_dir.read_state()
    previous = state.get("run_id") if options.resume else None
    changes = _check_resume(state, options) if previous else {}
    run = TrackedRun(tracking_config, name)
    run.start(run_dir.name, run_id=previous, echo=echo)
    with run.active():
        run_dir.update_state(run_id=run.run_id, experiment_id=run.experiment_id,
                             tracking_uri=run.shown_uri, finished=False)
        if not previous:
            run_dir.update_state(params=_params())
        else:
            _record_changes(run, run_dir, changes)
        _report_to_launcher(run, run_dir)
        echo(f"lmt: MLflow run {run.run_id} ({'resumed' if previous else 'new'}) "
             f"in {run.shown_uri}")
        yield run, run_dir, run_dir


def _resumed_dir(work_dir: str, name: str, options: RunOptions) -> RunDir | None:
    """The run to continue. A named run (as ``lmt launch`` names its job's run) that
    never got as far as making its directory is started afresh under that name."""
    if options.run_name is not None and not (Path(work_dir) / name / options.run_name).is_dir():
        return None
    return find_run_dir(work_dir, name, options.run_name)


def _check_resume(state: dict[str, Any], options: RunOptions) -> dict[str, tuple[str, str]]:
    """What the bindings of this resume change against the run's, as
    ``{param: (before, now)}``.

    Raises:
      ConfigError: if they change anything and ``options.allow_changes`` is off, or the
        run already finished every epoch it was bound to train.
    """
    before, now = state.get("params", {}), _params()
    changes = {k: (before.get(k, "(unset)"), now.get(k, "(unset)"))
               for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}
    if changes and not options.allow_changes:
        listed = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items())
        raise ConfigError(f"--resume with changed bindings ({listed}); resume with the "
                          f"original ones, or add --allow-changes to record and use these")
    epochs = config.configured(TrainConfig).epochs
    if state.get("finished") and state.get("epochs", 0) >= epochs:
        raise LmtError(f"nothing to resume: run {state.get('run_id')} finished all {epochs} "
                       f"epoch(s); start a new run (or resume with more TrainConfig.epochs "
                       f"and --allow-changes)")
    return changes


def _record_changes(run: TrackedRun, run_dir: RunDir, changes: dict[str, tuple[str, str]]
                    ) -> None:
    """A resume with changed bindings: the original config artifacts stay as they were;
    this resume's changes and resolved config go beside them, numbered."""
    resumes = run_dir.read_state().get("resumes", 0) + 1
    run_dir.update_state(resumes=resumes)
    if not changes:
        return
    run.log_text("".join(f"{k}: {a} -> {b}\n" for k, (a, b) in changes.items()),
                 f"config/resume-{resumes}/changes.txt")
    run.set_tags({"lmt.resumed_with_changes": resumes})
    run_dir.update_state(params=_params())


def _params() -> dict[str, str]:
    """The bindings as a run's state records them: without passwords."""
    return {k: redact_credentials(v) for k, v in config.bound_params().items()}


def _report_to_launcher(run: TrackedRun, run_dir: RunDir) -> None:
    """Under ``lmt launch``, tells the launcher which run this job made, so that it can
    end the run if the job is stopped before the run can end itself."""
    target = os.environ.get(JOB_FILE_ENV)
    if target:
        with contextlib.suppress(OSError):
            Path(target).write_text(json.dumps({"run_id": run.run_id, "run_name": run_dir.name,
                                                "tracking_uri": run.uri}))


def _config_path(run_dir: RunDir, file: str) -> str:
    """Where a config artifact goes: ``config/`` for a run's first start; a resume
    records its own beside it."""
    resumes = run_dir.read_state().get("resumes", 0)
    return f"config/resume-{resumes}/{file}" if resumes else f"config/{file}"


def _evaluate_beside(trainer: Trainer, built: keras.Model, splits: Splits, work_dir: str,
                     name: str, options: RunOptions, echo: Callable[[str], None]) -> None:
    """The evaluator task: validate every checkpoint of the chief's run as it appears."""
    started = time.time()

    def chiefs_run_dir() -> Path | None:
        if options.run_name is not None:  # named by the launcher: that run's directory
            path = Path(work_dir) / name / options.run_name
            return path / "checkpoints" if path.is_dir() else None
        # Else the latest run, which (unless resuming) got its checkpoint after this
        # task started.
        marker = Path(work_dir) / name / "LATEST"
        if not marker.is_file() or (not options.resume
                                    and marker.stat().st_mtime < started - EVALUATOR_SLACK):
            return None
        return find_run_dir(work_dir, name).checkpoints

    directory = wait_for_run_dir(chiefs_run_dir, timeout=EVALUATOR_TIMEOUT)
    echo(f"lmt: evaluator watching {directory}")
    evaluate_checkpoints(trainer.evaluate, built, splits.validation, directory,
                         trainer.config.epochs, echo, timeout=EVALUATOR_TIMEOUT)


def _log_setup(run: TrackedRun | NullRun, own: RunDir, options: RunOptions,
               info: StrategyInfo, role: Role, plan: Any, splits: Splits,
               model: keras.Model) -> None:
    """Params, tags and the config as given and as resolved, before training. A resumed
    run keeps its first params and config artifacts; a resume's go beside them."""
    derived = {
        "derived.replicas": info.replicas,
        "derived.global_batch_size": plan.global_batch_size,
        "derived.per_replica_batch_size": plan.per_replica_batch_size,
        "derived.steps_per_epoch": plan.steps_per_epoch,
        "derived.parameters": model.count_params(),
        "derived.dataset": splits.name,
        **{f"derived.{k}_examples": v for k, v in splits.sizes().items()},
    }
    run.log_params({**config.bound_params(), **derived})
    run.set_tags({**host_tags(), **role.tags(), "lmt.strategy": info.name,
                  "lmt.replicas": info.replicas,
                  "mlflow.source.name": " ".join(options.config_files) or "run_experiment"})
    for file in options.config_files:
        run.log_text(Path(file).read_text(), _config_path(own, f"given/{Path(file).name}"))
    if options.bindings:
        run.log_text("\n".join(options.bindings) + "\n", _config_path(own, "given/bindings.gin"))
    run.log_text(gin.config_str(), _config_path(own, "config.gin"))
    run.log_text(json.dumps(variable_placement(model.variables), indent=2) + "\n",
                 "placement.json")


def _export(run: TrackedRun | NullRun, run_dir: RunDir, model: keras.Model, splits: Splits,
            export_config: ExportConfig, echo: Callable[[str], None]) -> None:
    """Every task saves (saving may need all workers); only the chief logs. The MLflow
    model is logged from the SavedModel re-loaded outside any strategy, which also
    checks that the export loads."""
    if not (export_config.saved_model or export_config.mlflow_model):
        return
    target = run_dir.export / "saved_model"
    size = export_saved_model(model, target)
    if not run.logs:
        return
    if export_config.saved_model:
        run.log_artifacts(target, "saved_model")
        run.log_metrics({"export.saved_model_bytes": size}, step=0)
        echo(f"lmt: SavedModel {target} ({size / 1e6:.1f} MB)")
    if export_config.mlflow_model:
        example = to_model_input(tf.constant(splits.test.sample(4))).numpy()
        echo(f"lmt: MLflow model {run.log_keras_model(load_saved_model(target), example)}")
