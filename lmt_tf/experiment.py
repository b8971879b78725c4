"""The experiment root: ``run_experiment`` sets up strategy, data and model, opens the
run's session and runs the experiment's stages (train, export, ...) in order over one
run context. It is a plain function of its config objects; gin wraps it at the edge
(``config.run_experiment``), so nothing here reads gin's state."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import configured_call
from lmt_tf.compression import report
from lmt_tf.data.pipeline import BatchPlan
from lmt_tf.data.preprocessing import FittedPreprocessing
from lmt_tf.data.splits import Splits
from lmt_tf.errors import ConfigError
from lmt_tf.invocation import Configs, RunOptions
from lmt_tf.rundir import check_name, find_run_dir
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import StrategyInfo, default_strategy, describe, role_of
from lmt_tf.session import config_path, log_setup, open_session
from lmt_tf.stages import RunContext, Stage, default_stages
from lmt_tf.tracking.credentials import redact_credentials
from lmt_tf.tracking.store import run_links
from lmt_tf.training.model_transforms import inference_model
from lmt_tf.training.sidecar import evaluate_checkpoints, wait_for_run_dir
from lmt_tf.training.trainer import Trainer

__all__ = ["Configs", "RunOptions", "RunResult", "run_experiment"]

# An evaluator accepts a chief's run directory made this long before it started, and
# waits this long for the chief's next checkpoint.
EVALUATOR_SLACK = 600  # seconds
EVALUATOR_TIMEOUT = 3600  # seconds


@dataclass
class RunResult:
    """What a finished run produced."""

    run_id: str | None  # None on tasks other than the chief
    experiment_id: str | None
    run_dir: Path | None
    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)


def run_experiment(
    data: Callable[[], Splits],
    model: Callable[..., keras.Model],
    *,
    name: str | None = None,
    strategy: Callable[[], tf.distribute.Strategy] = default_strategy,
    seed: int = 0,
    work_dir: str = "lmt_work",
    stages: Sequence[Stage] | None = None,
    configs: Configs | None = None,
    options: RunOptions | None = None,
) -> RunResult | None:
    """Runs one experiment's stages (by default: train, then export), all logged to one
    MLflow run.

    Args:
      data: returns the data set's splits, e.g. ``load_mnist``.
      model: builds the Keras model from ``input_shape`` and ``num_classes``.
      name: experiment name; None takes the stem of the first gin file.
      strategy: builds the distribution strategy, e.g. ``mirrored_strategy``.
      seed: seeds weights, data order and hold-outs.
      work_dir: root of run directories (checkpoints, exports, resume state).
      stages: what the run does, in order; None: ``default_stages()``.
      configs: training, tracking, export and input settings.
      options: how this invocation runs (resume, dry run, extra callbacks, output).

    Returns:
      The run's result, or None for a dry run or a side-car evaluator.

    Raises:
      ConfigError, DataError, LmtError: for bad configuration or input (one line each).
    """
    options = options or RunOptions()
    configs = configs or Configs()
    stages = _checked(stages)
    echo = options.echo
    # The strategy first: splitting the CPU into logical devices must precede any op.
    strat = strategy()
    info = describe(strat)
    name = check_name(name or (Path(options.config_files[0]).stem if options.config_files
                               else "experiment"), "run_experiment.name")
    set_seed(seed)
    if configs.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    splits = configured_call(data, "run_experiment.data")
    if not isinstance(splits, Splits):
        raise ConfigError(f"run_experiment.data must return Splits, got "
                          f"{type(splits).__name__}")
    splits.validate()
    # Fitted on the training split only; its layers go in front of every model built.
    preprocessing = configs.preprocess.fit(splits)
    model = preprocessing.wrap(model)
    trainer = Trainer(configs.train, strat, configs.input)
    plan = trainer.plan(splits.train)
    echo(f"lmt: {info.name}, {info.replicas} replica(s); global batch "
         f"{plan.global_batch_size} = {plan.per_replica_batch_size} per replica; "
         f"{plan.steps_per_epoch} steps per epoch")
    sizes = splits.sizes()
    echo(f"lmt: data {splits.name}: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    if preprocessing.steps:
        echo(f"lmt: preprocessing in the model: {preprocessing.describe()}")
    if options.dry_run:
        built = inference_model(trainer.build_model(model, splits))
        echo(f"lmt: model {built.name}: {built.count_params():,} parameters")
        echo(f"lmt: stages: {', '.join(stage.describe() for stage in stages)}")
        echo(f"lmt: would train {configs.train.epochs} epoch(s) in {work_dir}/{name}; "
             f"resolved config:\n{redact_credentials(options.config_text)}")
        return None

    if options.flower is not None and options.flower.client is not None:
        _serve_flower_client(stages, splits, model, seed, configs, options)
        return None
    role = role_of(strat)
    if role.task_type == "evaluator":
        _evaluate_beside(trainer, trainer.build_model(model, splits), splits, work_dir, name,
                         options, echo)
        return None
    with open_session(role, configs.tracking, work_dir, name, configs.train.epochs,
                      options) as session:
        trainable = trainer.build_model(model, splits)  # the model in its training wrappers
        context = RunContext(
            strategy=strat, info=info, role=role, splits=splits, plan=plan, trainer=trainer,
            model_fn=model, seed=seed, configs=configs, options=options, run=session.run,
            run_dir=session.run_dir, own=session.own, trainable=trainable,
            model=inference_model(trainable), preprocessing=preprocessing,
            compressing=any(stage.compresses for stage in stages))
        log_setup(session, options, info, role,
                  _derived(info, plan, splits, context.model, preprocessing),
                  context.model.variables, splits)
        if preprocessing.steps:
            session.run.log_text(preprocessing.as_json(), "preprocessing/fitted.json")
        for stage in stages:
            stage.check(context)
        for stage in stages:
            stage.run(context)
        if context.report:
            table = report.as_markdown(context.report)
            session.run.log_text(report.as_json(context.report), "compression/report.json")
            session.run.log_text(table, "compression/report.md")
            echo("lmt: compression report\n" + table.rstrip())
        session.run.log_text(options.operative_config(),
                             config_path(session.own, "operative_config.gin"))
        # Every setting that was used, defaults included, so that any two runs compare
        # on any of them in the UI (params already logged keep their values).
        session.run.log_params(options.operative_params())
        if role.is_chief:
            session.own.update_state(finished=True)
    run = session.run
    if not role.is_chief:
        return RunResult(None, None, None, context.model, context.history,
                         context.test_metrics)
    run_url, table_url = run_links(run.uri, run.experiment_id, run.run_id)
    hint = "" if run.uri.startswith("http") else " (start the UI with `lmt ui`)"
    echo(f"lmt: run {run.run_id} FINISHED{hint}\n  run:  {run_url}\n  runs: {table_url}")
    return RunResult(run.run_id, run.experiment_id, session.own.path, context.model,
                     context.history, context.test_metrics)


def _checked(stages: Sequence[Stage] | None) -> tuple[Stage, ...]:
    """The stages to run; each a stage object, each name once.

    Raises:
      ConfigError: for something that is not a stage (``@train`` instead of
        ``@train()`` in gin), or a stage named twice.
    """
    if stages is None:
        return default_stages()
    checked = tuple(stages)
    for stage in checked:
        if not isinstance(stage, Stage):
            hint = " (call it in gin: @name())" if isinstance(stage, type) or callable(stage) \
                else ""
            raise ConfigError(f"run_experiment.stages must list stages such as @train(), "
                              f"got {stage!r}{hint}")
    names = [stage.name for stage in checked]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"run_experiment.stages names {', '.join(twice)} more than once")
    if not checked:
        raise ConfigError("run_experiment.stages is empty")
    return checked


def _serve_flower_client(stages: Sequence[Stage], splits: Splits, model: Callable[..., Any],
                         seed: int, configs: Configs, options: RunOptions) -> None:
    """A Flower client process (``lmt federate``): the experiment's federate stage serves
    one client; nothing is logged to MLflow (the server logs the run)."""
    from lmt_tf.stages.federate import Federate

    federate = [stage for stage in stages if isinstance(stage, Federate)]
    if not federate:
        raise ConfigError("a Flower client needs an experiment with a federate stage "
                          "(include 'gin/federated/fedavg.gin')")
    federate[0].serve_client(splits, model, seed, configs.train, options.flower, options.echo)


def _derived(info: StrategyInfo, plan: BatchPlan, splits: Splits, model: keras.Model,
             preprocessing: FittedPreprocessing) -> dict[str, Any]:
    """Params that follow from the configuration: ``derived.*``."""
    return {
        "derived.replicas": info.replicas,
        "derived.global_batch_size": plan.global_batch_size,
        "derived.per_replica_batch_size": plan.per_replica_batch_size,
        "derived.steps_per_epoch": plan.steps_per_epoch,
        "derived.parameters": model.count_params(),
        "derived.dataset": splits.name,
        "derived.preprocessing": preprocessing.describe(),
        "derived.model_input_features": int(np.prod(preprocessing.output_shape)),
        **{f"derived.{k}_examples": v for k, v in splits.sizes().items()},
    }


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
