"""What the stages of one run share: the experiment as set up in this process
(``Setup``), the run context that carries the model from stage to stage, and the
``Stage`` base, whose ``run`` is the resume protocol written once around a stage's own
``work``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.compression.report import CompressionReport, keras_row
from lmt_tf.data.pipeline import BatchPlan
from lmt_tf.data.preprocessing import FittedPreprocessing
from lmt_tf.data.splits import Splits
from lmt_tf.errors import ConfigError
from lmt_tf.invocation import Configs, RunOptions
from lmt_tf.rundir import RunDir
from lmt_tf.runtime.footprint import Footprint
from lmt_tf.runtime.roles import Role
from lmt_tf.runtime.strategy import StrategyInfo
from lmt_tf.session import Session
from lmt_tf.tracking.run import Run
from lmt_tf.training.callbacks import check_finite_variables
from lmt_tf.training.trainer import Trainer


@dataclass
class Setup:
    """An experiment set up in this process: its strategy (made first), its data and the
    preprocessing fitted on it, the model builder behind that preprocessing, the trainer
    and its batch plan, and the stages to run."""

    name: str  # the experiment's name (its run directories, by default its MLflow one)
    strategy: tf.distribute.Strategy
    info: StrategyInfo
    role: Role
    splits: Splits
    preprocessing: FittedPreprocessing  # fitted on the training split
    model_fn: Callable[..., keras.Model]  # with the preprocessing layers in front
    trainer: Trainer
    plan: BatchPlan
    seed: int
    work_dir: str
    configs: Configs
    stages: Sequence[Stage]
    # Each task's share of the variables and slots, worked out before the model is built
    # (None where the model could not be described without building it).
    footprint: Footprint | None = None


@dataclass
class RunContext:
    """One run as its stages see it: the setup, this invocation's options, this task's
    session (its MLflow run and directories), and the model as the stages leave it."""

    setup: Setup
    options: RunOptions
    session: Session
    trainable: keras.Model | None = None  # the model inside its training wrappers
    model: keras.Model | None = None  # the current model, as it is exported
    history: dict[str, list[float]] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    report: CompressionReport | None = None  # None: no stage of the run compresses
    _test_arrays: tuple[Any, Any] | None = None

    @property
    def echo(self) -> Callable[[str], None]:
        return self.options.echo

    @property
    def run(self) -> Run:
        """This task's MLflow run (a null run on tasks other than the chief)."""
        return self.session.run

    @property
    def strategy(self) -> tf.distribute.Strategy:
        return self.setup.strategy

    @property
    def splits(self) -> Splits:
        return self.setup.splits

    def with_preprocessing(self, model_fn: Callable[..., keras.Model]
                           ) -> Callable[..., keras.Model]:
        """Another model builder (a student, a new head) behind this run's preprocessing."""
        return self.setup.preprocessing.wrap(model_fn)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier attempt of this run (``--resume``)."""
        source = self.session.source or self.session.own
        state = source.read_state() if self.options.resume else {}
        return stage in state.get("stages_done", [])

    def mark_done(self, stage: str) -> None:
        """Records that ``stage`` finished, so a resume goes on after it."""
        if self.setup.role.is_chief:
            done = self.session.own.read_state().get("stages_done", [])
            self.session.own.update_state(
                stages_done=[*done, stage] if stage not in done else done)

    def stage_dir(self, stage: str) -> RunDir:
        """The part of this task's run directory that belongs to ``stage`` (made)."""
        path = self.session.own.path / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return RunDir(path)

    def resumed(self, stage: str | None = None) -> RunDir | None:
        """Where a resume restores ``stage`` from (None: the run's own checkpoints, the
        ``train`` stage's): its directory in the run this one continues; None when this
        run continues none."""
        source = self.session.source
        if not self.options.resume or source is None:
            return None
        return source if stage is None else RunDir(source.path / "stages" / stage)

    def test_arrays(self) -> tuple[Any, Any]:
        """The test split as model-ready inputs and labels (what the pipeline feeds)."""
        if self._test_arrays is None:
            self._test_arrays = model_ready(self.splits.test)
        return self._test_arrays

    def add_row(self, stage: str, model: keras.Model, test_metrics: dict[str, float]) -> None:
        """Adds ``model``, the output of ``stage``, to the compression report (chief only;
        classification only: the report compares accuracies)."""
        if self.report is not None and self.setup.role.is_chief and "accuracy" in test_metrics:
            self.report.add(keras_row(stage, model, test_metrics["accuracy"],
                                      self.test_arrays()[0]))


class Stage:
    """One step of an experiment: ``train``, ``export``, and the compression stages.

    A stage does its own ``work`` on the context (the model of the stages before it) and
    leaves its result in it. It logs metrics under ``<name>/`` and artifacts under
    ``<name>/`` (``train`` keeps the plain names of a training run). ``run`` makes every
    stage resumable the same way: a stage done in an earlier attempt of the run only
    ``restore``s what the stages after it need; and every stage fails the run
    (``TrainingDiverged``) if it leaves a model with NaN or infinite weights.
    """

    name = "stage"
    # Whether it compresses the model: a run with such a stage logs a compression report.
    compresses = False
    # Only the chief runs it (it trains nothing every worker must take part in).
    chief_only = False
    # What it needs of the stages before it and leaves to those after: the order of a
    # run's stages is checked against these before anything runs (``check_order``).
    needs_trained_model = False  # it uses the current model as trained (tflite, export)
    trains = False  # it leaves a trained model (train, federate, distill, fine-tuning)
    federates = False  # it trains by federated rounds: what --flower-server serves
    untrained_remedy = ""  # how it runs with no stage before it that trains, if it can

    def run(self, context: RunContext) -> None:
        """The stage's part of the run: ``work``, or ``restore`` if it was done in an
        earlier attempt; then it is recorded as done."""
        if self.chief_only and not context.setup.role.is_chief:
            return
        done = context.done(self.name)
        if done:
            self.restore(context)
        else:
            self.work(context)
        # Whatever the stage (train, fine-tuning, federate, one to come): a model that
        # diverged ends the run FAILED here, before any later stage exports it.
        if context.model is not None:
            check_finite_variables(context.model.weights,
                                   f"the model the {self.name} stage left")
        if not done:
            context.mark_done(self.name)
        if context.report is not None:
            context.report.stage_done(self.name)

    def work(self, context: RunContext) -> None:
        """What the stage does."""
        raise NotImplementedError

    def restore(self, context: RunContext) -> None:
        """After a resume, what the stages after it need of this stage's work, done in an
        earlier attempt (nothing, unless the stage changed the model)."""

    def check(self, context: RunContext) -> None:
        """Raises ConfigError if the stage cannot run here (its strategy, its model);
        called for every stage before the first one runs, so nothing trains in vain."""

    def describe(self) -> str:
        """One line for the dry run."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_order(stages: Sequence[Stage], federated: bool = False) -> None:
    """Raises ConfigError unless each stage has what it needs of those before it: a
    trained model for one that needs it, a federate stage for a Flower deployment
    (``federated``).

    Raises:
      ConfigError: naming the stage, the order and what to do.
    """
    order = ", ".join(stage.name for stage in stages)
    trained = False
    for stage in stages:
        if stage.needs_trained_model and not trained:
            remedy = f", or {stage.untrained_remedy}" if stage.untrained_remedy else ""
            raise ConfigError(f"run_experiment.stages [{order}]: {stage.name} needs a trained "
                              f"model, and no stage before it trains one (list it after "
                              f"train or federate{remedy})")
        trained = trained or stage.trains
    if federated and not any(stage.federates for stage in stages):
        raise ConfigError(f"a Flower deployment needs a federate stage, and "
                          f"run_experiment.stages [{order}] has none (include "
                          f"'gin/federated/fedavg.gin')")


def model_ready(split: Any, limit: int | None = None) -> tuple[Any, Any]:
    """Model-ready inputs (as the input pipeline makes them) and labels of a split, or of
    its first ``limit`` examples."""
    import numpy as np

    xs, ys = [], []
    count = len(split) if limit is None else min(limit, len(split))
    batch = min(1024, max(count, 1))
    batches = split.eval_dataset(batch)
    for _, (x, y) in zip(range(-(-count // batch)), batches, strict=False):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs)[:count], np.concatenate(ys)[:count]


def prefixed(metrics: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """``metrics`` under ``stage/``."""
    return {f"{stage}/{k}": v for k, v in metrics.items()}
