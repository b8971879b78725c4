"""The one gin root: ``run_experiment`` wires data, model, strategy, trainer, tracking and
export, and owns the MLflow run from its start to its final status."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin
import tensorflow as tf
import tf_keras as keras

from lmt_tf import config
from lmt_tf.data.pipeline import InputConfig, to_model_input
from lmt_tf.data.splits import Splits
from lmt_tf.optim.train_step import inference_model
from lmt_tf.rundir import RunDir, latest_run_dir, new_run_dir
from lmt_tf.runtime.cluster import Role
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import (
    StrategyInfo,
    default_strategy,
    describe,
    role_of,
    variable_placement,
)
from lmt_tf.tracking import NullRun, TrackedRun, TrackingConfig, host_tags, run_links
from lmt_tf.training.callbacks import EpochCheckpoint, EpochMetrics, StepMetrics, Throughput
from lmt_tf.training.export import ExportConfig, export_saved_model, load_saved_model
from lmt_tf.training.sidecar import evaluate_checkpoints, wait_for_run_dir
from lmt_tf.training.trainer import TrainConfig, Trainer

# An evaluator accepts a chief's run directory made this long before it started, and
# waits this long for the chief's next checkpoint.
EVALUATOR_SLACK = 600  # seconds
EVALUATOR_TIMEOUT = 3600  # seconds


@dataclass
class RunOptions:
    """How one invocation runs an experiment; set by the CLI or a test, not by gin."""

    config_files: Sequence[str] = ()  # the gin files as given, logged as artifacts
    bindings: Sequence[str] = ()  # the --gin_param bindings as given
    resume: bool = False  # continue the latest run of this experiment
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
    name = name or (Path(options.config_files[0]).stem if options.config_files else "experiment")
    train_config: TrainConfig = config.configured(TrainConfig)
    tracking_config: TrackingConfig = config.configured(TrackingConfig)
    export_config: ExportConfig = config.configured(ExportConfig)
    set_seed(seed)
    if train_config.deterministic:
        tf.config.experimental.enable_op_determinism()

    splits = data()
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
             f"resolved config:\n{gin.config_str()}")
        return None

    role = role_of(strat)
    if role.task_type == "evaluator":
        _evaluate_beside(trainer, trainer.build_model(model, splits), splits, work_dir, name,
                         options, echo)
        return None
    run, run_dir, scratch = _open_run(role, tracking_config, work_dir, name, options, echo)
    with scratch as own_dir, run.active():
        own = RunDir(Path(own_dir))
        built = trainer.build_model(model, splits)  # what trains: perhaps a wrapper
        user_model = inference_model(built)  # the model that is logged and exported
        _log_setup(run, options, info, role, plan, splits, user_model)
        initial_epoch = trainer.restore(built, run_dir.checkpoints) if options.resume else 0
        if options.resume:
            echo(f"lmt: resuming {run_dir.path} after epoch {initial_epoch}")
        saved = (lambda done: own.update_state(epochs=done)) if role.is_chief else None
        callbacks = [Throughput(run.log_metrics, plan.examples_per_epoch),
                     EpochMetrics(run.log_metrics),
                     EpochCheckpoint(trainer.checkpoint_manager(built, own.checkpoints), saved)]
        if tracking_config.log_every_n_steps:
            callbacks.append(StepMetrics(run.log_metrics, tracking_config.log_every_n_steps,
                                         plan.steps_per_epoch))
        result = trainer.fit(built, splits, seed, initial_epoch,
                             [*callbacks, *options.callbacks])
        test = trainer.evaluate(built, splits.test)
        run.log_metrics({f"test_{k}": v for k, v in test.items()}, step=train_config.epochs)
        echo("lmt: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        _export(run, own, user_model, splits, export_config, echo)
        run.log_text(gin.operative_config_str(), "config/operative_config.gin")
    if not role.is_chief:
        return RunResult(None, None, None, user_model, result.history, test)
    run_url, table_url = run_links(run.uri, run.experiment_id, run.run_id)
    hint = "" if run.uri.startswith("http") else " (start the UI with `lmt ui`)"
    echo(f"lmt: run {run.run_id} FINISHED{hint}\n  run:  {run_url}\n  runs: {table_url}")
    return RunResult(run.run_id, run.experiment_id, run_dir.path, user_model, result.history,
                     test)


def _open_run(role: Role, tracking_config: TrackingConfig, work_dir: str, name: str,
              options: RunOptions, echo: Callable[[str], None]
              ) -> tuple[TrackedRun | NullRun, RunDir | None, contextlib.AbstractContextManager]:
    """This task's MLflow run, the run directory to restore from (None for a fresh
    non-chief task), and the directory it writes checkpoints and exports to.

    The chief creates (or, resuming, re-opens) the MLflow run and writes the real run
    directory. Other tasks log nothing; they restore from the chief's checkpoints (a
    shared file system) and write their own (collective) saves to a scratch directory
    that is removed afterwards.
    """
    if not role.is_chief:
        restore_from = latest_run_dir(work_dir, name) if options.resume else None
        scratch = tempfile.TemporaryDirectory(prefix=f"lmt-{role.task_type}{role.task_id}-")
        return NullRun(), restore_from, scratch
    run_dir = latest_run_dir(work_dir, name) if options.resume else new_run_dir(work_dir, name)
    previous = run_dir.read_state().get("run_id") if options.resume else None
    run = TrackedRun(tracking_config, name).start(run_dir.name, run_id=previous)
    run_dir.update_state(run_id=run.run_id, experiment_id=run.experiment_id,
                         tracking_uri=run.uri)
    echo(f"lmt: MLflow run {run.run_id} ({'resumed' if previous else 'new'}) in {run.uri}")
    return run, run_dir, contextlib.nullcontext(run_dir.path)


def _evaluate_beside(trainer: Trainer, built: keras.Model, splits: Splits, work_dir: str,
                     name: str, options: RunOptions, echo: Callable[[str], None]) -> None:
    """The evaluator task: validate every checkpoint of the chief's run as it appears."""
    started = time.time()

    def chiefs_run_dir() -> Path | None:
        # The chief's run is the latest one, made (unless resuming) as this task started.
        marker = Path(work_dir) / name / "LATEST"
        if not marker.is_file() or (not options.resume
                                    and marker.stat().st_mtime < started - EVALUATOR_SLACK):
            return None
        return latest_run_dir(work_dir, name).checkpoints

    directory = wait_for_run_dir(chiefs_run_dir, timeout=EVALUATOR_TIMEOUT)
    echo(f"lmt: evaluator watching {directory}")
    evaluate_checkpoints(trainer.evaluate, built, splits.validation, directory,
                         trainer.config.epochs, echo, timeout=EVALUATOR_TIMEOUT)


def _log_setup(run: TrackedRun | NullRun, options: RunOptions, info: StrategyInfo,
               role: Role, plan: Any, splits: Splits, model: keras.Model) -> None:
    """Params, tags and the config as given and as resolved: logged once, before training."""
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
        run.log_text(Path(file).read_text(), f"config/given/{Path(file).name}")
    if options.bindings:
        run.log_text("\n".join(options.bindings) + "\n", "config/given/bindings.gin")
    run.log_text(gin.config_str(), "config/config.gin")
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
