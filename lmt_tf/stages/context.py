"""What the stages of one run share: the run context that carries the model from stage
to stage, and the ``Stage`` base."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.pipeline import BatchPlan
from lmt_tf.data.preprocessing import FittedPreprocessing
from lmt_tf.data.splits import Splits
from lmt_tf.invocation import Configs, RunOptions
from lmt_tf.rundir import RunDir
from lmt_tf.runtime.roles import Role
from lmt_tf.runtime.strategy import StrategyInfo
from lmt_tf.tracking.run import NullRun, TrackedRun
from lmt_tf.training.trainer import Trainer


@dataclass
class RunContext:
    """One run as its stages see it. ``run_experiment`` sets it up; each stage reads what
    it needs and leaves its result (the model, metrics) for the stages after it."""

    strategy: tf.distribute.Strategy
    info: StrategyInfo
    role: Role
    splits: Splits
    plan: BatchPlan
    trainer: Trainer
    model_fn: Callable[..., keras.Model]  # with the preprocessing layers in front
    seed: int
    configs: Configs
    options: RunOptions
    run: TrackedRun | NullRun
    run_dir: RunDir | None  # the run restored from; None for a fresh task that is not chief
    own: RunDir  # where this task writes checkpoints and exports
    trainable: keras.Model | None = None  # the model inside its training wrappers
    model: keras.Model | None = None  # the current model, as it is exported
    history: dict[str, list[float]] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    compressing: bool = False  # a stage compresses the model (Stage.compresses): report it
    report: list[Any] = field(default_factory=list)  # compression.report.Row per output
    preprocessing: FittedPreprocessing | None = None  # fitted on the training split
    _test_arrays: tuple[Any, Any] | None = None

    @property
    def echo(self) -> Callable[[str], None]:
        return self.options.echo

    def with_preprocessing(self, model_fn: Callable[..., keras.Model]
                           ) -> Callable[..., keras.Model]:
        """Another model builder (a student, a new head) behind this run's preprocessing."""
        return self.preprocessing.wrap(model_fn) if self.preprocessing else model_fn

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier attempt of this run (``--resume``)."""
        state = (self.run_dir or self.own).read_state() if self.options.resume else {}
        return stage in state.get("stages_done", [])

    def mark_done(self, stage: str) -> None:
        """Records that ``stage`` finished, so a resume goes on after it."""
        if self.role.is_chief:
            done = self.own.read_state().get("stages_done", [])
            self.own.update_state(stages_done=[*done, stage] if stage not in done else done)

    def test_arrays(self) -> tuple[Any, Any]:
        """The test split as model-ready inputs and labels (what the pipeline feeds)."""
        if self._test_arrays is None:
            self._test_arrays = model_ready(self.splits.test)
        return self._test_arrays

    def add_row(self, stage: str, model: keras.Model, test_metrics: dict[str, float]) -> None:
        """Adds ``model``, the output of ``stage``, to the compression report (chief only;
        classification only: the report compares accuracies)."""
        if self.compressing and self.role.is_chief and "accuracy" in test_metrics:
            from lmt_tf.compression.report import keras_row

            self.report.append(keras_row(stage, model, test_metrics["accuracy"],
                                         self.test_arrays()[0]))

    def stage_dir(self, stage: str) -> RunDir:
        """The part of this task's run directory that belongs to ``stage``."""
        path = self.own.path / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return RunDir(path)


class Stage:
    """One step of an experiment: ``train``, ``export``, and the compression stages.

    ``run`` reads the context (the model of the stages before it) and leaves its own
    result in it. It logs metrics under ``<name>/`` and artifacts under ``<name>/``
    (``train`` keeps the plain names of a training run), and must be resumable: when
    ``context.done(name)`` it only restores what the stages after it need.
    """

    name = "stage"
    # Whether it compresses the model: a run with such a stage logs a compression report.
    compresses = False

    def run(self, context: RunContext) -> None:
        raise NotImplementedError

    def check(self, context: RunContext) -> None:
        """Raises ConfigError if the stage cannot run here (its strategy, its model);
        called for every stage before the first one runs, so nothing trains in vain."""

    def describe(self) -> str:
        """One line for the dry run."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


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
