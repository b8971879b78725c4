"""The experiment root: ``prepare`` sets up strategy, data and model in this process;
``run`` opens the run's session and runs the experiment's stages in order over one run
context. Both are plain functions of config objects; gin builds the ``Experiment`` at
the edge (``config.py``), which also picks how an invocation uses the setup (a run, a
dry run, a Flower client, a side-car evaluator)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import configured_call
from lmt_tf.compression.report import CompressionReport
from lmt_tf.data.pipeline import Padding, bucket_lengths, padding
from lmt_tf.data.splits import Split, Splits
from lmt_tf.errors import ConfigError, LmtError
from lmt_tf.invocation import Configs, RunOptions
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.rundir import check_name
from lmt_tf.runtime.devices import unseen_gpus
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.footprint import (
    Footprint,
    by_task,
    check_fits,
    describe_model,
    layout_of,
    on_one_host,
    pieces_of,
    placed_bytes,
    plan,
)
from lmt_tf.runtime.memory import format_size, task_cap
from lmt_tf.runtime.strategy import default_strategy, describe, role_of
from lmt_tf.session import config_path, log_setup, open_session
from lmt_tf.stages import RunContext, Setup, Stage, default_stages
from lmt_tf.stages.context import check_order
from lmt_tf.tracking.credentials import redact_credentials
from lmt_tf.tracking.store import run_links
from lmt_tf.training.trainer import Trainer, optimizers


@dataclass
class Experiment:
    """What an experiment is: the arguments of the plain root (gin's ``run_experiment``)."""

    data: Callable[[], Splits]  # returns the data set's splits, e.g. ``load_mnist``
    model: Callable[..., keras.Model]  # builds the model from input_shape, num_classes
    name: str | None = None  # None: the stem of the first gin file
    strategy: Callable[[], tf.distribute.Strategy] = default_strategy
    seed: int = 0  # seeds weights, data order and hold-outs
    work_dir: str = "lmt_work"  # root of run directories (checkpoints, exports, state)
    stages: Sequence[Stage] | None = None  # what the run does, in order; None: the default
    configs: Configs = field(default_factory=Configs)


@dataclass
class RunResult:
    """What a finished run produced."""

    run_id: str | None  # None on tasks other than the chief
    experiment_id: str | None
    run_dir: Path | None
    model: keras.Model
    history: dict[str, list[float]] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)


def run_experiment(data: Callable[[], Splits], model: Callable[..., keras.Model], *,
                   options: RunOptions | None = None, **settings: Any) -> RunResult:
    """Runs one experiment's stages (by default: train, then export), all logged to one
    MLflow run: ``run(prepare(Experiment(data, model, **settings)))``, for a script.

    Raises:
      ConfigError, DataError, LmtError: for bad configuration or input (one line each).
    """
    options = options or RunOptions()
    return run(prepare(Experiment(data, model, **settings), options), options)


def prepare(experiment: Experiment, options: RunOptions) -> Setup:
    """Sets ``experiment`` up in this process: the stages checked in order (each has
    what it needs of those before it), the strategy (splitting the CPU into logical
    devices must precede any op), the seed, the data (validated), the preprocessing
    fitted on its training split, the trainer and its batch plan.

    Raises:
      ConfigError, DataError: for bad configuration or data.
    """
    stages = _checked(experiment.stages)
    check_order(stages, federated=options.flower is not None)
    configs, echo = experiment.configs, options.echo
    strategy = experiment.strategy()
    info = describe(strategy)
    warning = unseen_gpus(len(tf.config.list_physical_devices("GPU")))
    if warning:
        echo(warning)
    name = check_name(experiment.name or (Path(options.config_files[0]).stem
                                          if options.config_files else "experiment"),
                      "run_experiment.name")
    set_seed(experiment.seed)
    if configs.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    splits = configured_call(experiment.data, "run_experiment.data")
    if not isinstance(splits, Splits):
        raise ConfigError(f"run_experiment.data must return Splits, got "
                          f"{type(splits).__name__}")
    splits.validate()
    # Fitted on the training split only; its layers go in front of every model built.
    preprocessing = configs.preprocess.fit(splits, experiment.model)
    trainer = Trainer(configs.train, strategy, configs.input)
    plan = trainer.plan(splits.train)
    echo(f"lmt: {info.name}, {info.replicas} replica(s) on {', '.join(info.devices)}; "
         f"global batch "
         f"{plan.global_batch_size} = {plan.per_replica_batch_size} per replica; "
         f"{plan.steps_per_epoch} steps per epoch")
    echo(f"lmt: data {splits.name}: "
         + ", ".join(f"{k} {v:,}" for k, v in splits.sizes().items()))
    if splits.reference:  # what the data's own optimum scores (logged as data/*)
        echo("lmt: data reference: " + ", ".join(f"{k} {v:.4f}"
                                                 for k, v in splits.reference.items()))
    if preprocessing.steps or preprocessing.carried:
        echo(f"lmt: preprocessing in the model: {preprocessing.describe()}")
    bucket_lengths(splits.train, configs.input.bucket_by_length)  # refuses non-documents
    padded = _padding(splits, plan, experiment.seed, configs, preprocessing.steps)
    if padded:
        echo(f"lmt: {padded.describe()}")
    model_fn = preprocessing.wrap(experiment.model)
    return Setup(name, strategy, info, role_of(strategy), splits, preprocessing, model_fn,
                 trainer, plan, experiment.seed, experiment.work_dir, configs, stages,
                 _preflight(strategy, model_fn, splits, configs, echo))


def _preflight(strategy: tf.distribute.Strategy, model_fn: Callable[..., keras.Model],
               splits: Splits, configs: Configs, echo: Callable[[str], None]
               ) -> Footprint | None:
    """The pre-flight size check, before any model is built: each task's share of the
    variables and optimizer slots under the strategy (the chief of a cluster works out
    every task's), against the memory a task may use (``lmt launch --task-memory``, else
    this machine's).

    Returns:
      The footprint; None (said in one line) where the model cannot be described in a
      graph, which skips the check.

    Raises:
      ConfigError: in one line, for a task whose share does not fit its cap.
    """
    try:
        description = describe_model(
            lambda: configured_call(model_fn, "run_experiment.model",
                                    input_shape=splits.input_shape,
                                    num_classes=splits.num_classes),
            lambda: configured_call(configs.train.optimizer, "TrainConfig.optimizer"),
            configs.train.precision,
            (lambda: configured_call(configs.train.embedding_optimizer,
                                     "TrainConfig.embedding_optimizer"))
            if configs.train.embedding_optimizer is not None else None)
    except LmtError:
        raise
    except Exception as e:  # noqa: BLE001 (a builder that only works eagerly: no check)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        echo(f"lmt: the model's size could not be worked out before building it "
             f"({type(e).__name__}: {reason}); the pre-flight size check is skipped")
        return None
    footprint = plan(description, layout_of(strategy))
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    cap = task_cap()
    warning = check_fits(footprint, cap, same_host=bool(cluster) and on_one_host(cluster))
    largest = footprint.largest
    echo(f"lmt: memory: {footprint.model.contents()}; the largest share, {largest.task}'s, "
         f"is {format_size(largest.bytes)}, within the {format_size(cap.bytes)} a task may "
         f"use ({cap.source})")
    if warning:
        echo(warning)
    return footprint


def describe_run(setup: Setup, options: RunOptions) -> None:
    """The dry run: what ``run`` would do: the model's parameters and each task's share
    of its variables and slots (worked out without building it), the stages and the
    resolved config; nothing is allocated, trained or logged."""
    echo = options.echo
    if setup.footprint is not None:
        model = setup.footprint.model
        echo(f"lmt: model {model.name}: {model.parameters:,} parameters")
        echo(f"lmt: {setup.footprint.describe()}")
    else:  # a model that cannot be described in a graph is built to be counted
        built = inference_model(setup.trainer.build_model(setup.model_fn, setup.splits))
        echo(f"lmt: model {built.name}: {built.count_params():,} parameters")
    echo(f"lmt: stages: {', '.join(stage.describe() for stage in setup.stages)}")
    echo(f"lmt: would train {setup.configs.train.epochs} epoch(s) in "
         f"{setup.work_dir}/{setup.name}; resolved config:\n"
         f"{redact_credentials(options.config_text)}")


def run(setup: Setup, options: RunOptions) -> RunResult:
    """Opens this task's session (its MLflow run on the chief) and runs the stages over
    one run context: each is checked before the first one runs, then each runs; the run
    ends FINISHED, KILLED or FAILED whatever happens.

    Raises:
      ConfigError, DataError, LmtError: for bad configuration or input (one line each).
    """
    role, configs = setup.role, setup.configs
    with open_session(role, configs.tracking, setup.work_dir, setup.name,
                      configs.train.epochs, options) as session:
        trainable = setup.trainer.build_model(setup.model_fn, setup.splits)
        compressing = [stage.name for stage in setup.stages if stage.compresses]
        context = RunContext(setup, options, session, trainable=trainable,
                             model=inference_model(trainable),
                             report=CompressionReport(session.run, compressing, options.echo)
                             if compressing else None)
        log_setup(session, options, setup.info, role, _derived(setup, context.model),
                  context.model.variables, setup.splits, optimizers(trainable))
        if setup.footprint is not None:
            session.run.log_text(_footprint_record(setup.footprint, context.model,
                                                   trainable), "footprint.json")
        if setup.preprocessing.steps:
            session.run.log_text(setup.preprocessing.as_json(), "preprocessing/fitted.json")
        for stage in setup.stages:
            stage.check(context)
        for stage in setup.stages:
            stage.run(context)
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
    options.echo(f"lmt: run {run.run_id} FINISHED{hint}\n  run:  {run_url}\n"
                 f"  runs: {table_url}")
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


def _padding(splits: Splits, plan: Any, seed: int, configs: Configs,
             steps: list[dict[str, Any]]) -> Padding | None:
    """The padding of the first epoch's batches of documents in memory, with and
    without length bucketing; None for other data (and bags of words, which have no
    padding)."""
    if not (steps and "sequence_length" in steps[0] and isinstance(splits.train, Split)):
        return None
    return padding(splits.train, plan, seed, configs.input.bucket_by_length,
                   steps[0]["sequence_length"])


def _derived(setup: Setup, model: keras.Model) -> dict[str, Any]:
    """Params that follow from the configuration: ``derived.*``."""
    plan, splits, preprocessing = setup.plan, setup.splits, setup.preprocessing
    padded = _padding(splits, plan, setup.seed, setup.configs, preprocessing.steps)
    return {
        "derived.replicas": setup.info.replicas,
        "derived.devices": ", ".join(setup.info.devices),
        "derived.global_batch_size": plan.global_batch_size,
        "derived.per_replica_batch_size": plan.per_replica_batch_size,
        "derived.steps_per_epoch": plan.steps_per_epoch,
        # From the graph-built description where there is one (as the dry run counts).
        "derived.parameters": (setup.footprint.model.parameters if setup.footprint
                               else model.count_params()),
        "derived.dataset": splits.name,
        "derived.preprocessing": preprocessing.describe(),
        "derived.model_input_features": int(np.prod(preprocessing.output_shape)),
        **{f"derived.{k}_examples": v for k, v in splits.sizes().items()},
        **(padded.params() if padded else {}),  # documents: the share of padding
    }


def _footprint_record(footprint: Footprint, model: keras.Model, trainable: keras.Model
                      ) -> str:
    """``footprint.json``: each task's predicted share (and the model's totals) beside the
    bytes the built variables and slots really hold on each task, and the model's
    weights' predicted pieces beside the real ones (name, task, bytes), in its order."""
    optimizer = getattr(trainable, "optimizer", None)
    built = [*trainable.weights, *(optimizer.variables() if optimizer is not None else [])]
    described, predicted = footprint.model, dict(footprint.placement)
    return json.dumps({
        "layout": footprint.layout.describe(),
        "parameters": described.parameters,
        "variable_bytes": described.variable_bytes,
        "slot_bytes": described.slot_bytes,
        "optimizer": described.optimizer,
        "unknown_slots": described.unknown_slots,
        "predicted": footprint.per_task(),
        "predicted_initialising": {t.name: t.bytes + t.initialising for t in footprint.tasks},
        "built": by_task(placed_bytes(built)),
        # Piece by piece (a partitioned weight's shards are listed one by one by Keras).
        "pieces": {"predicted": [[name, *piece] for name in described.weights
                                 for piece in predicted[name]],
                   "built": [[weight.name, *piece] for weight in model.weights
                             for piece in pieces_of(weight)]},
    }, indent=2) + "\n"
