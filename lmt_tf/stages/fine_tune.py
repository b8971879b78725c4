"""``FineTune``: the base of stages that fine-tune the current model through a model
transform (prune, qat, cluster) or train a fresh one with a technique of their own
(distill): build the model in the strategy's scope, resume from the stage's own
checkpoints, train with the experiment's optimizer, loss and batch, test, and hand the
stripped model to the next stage."""

from __future__ import annotations

from typing import Any

import tf_keras as keras

from lmt_tf.checks import Annotated, Range, check_arguments
from lmt_tf.compression.report import gzipped_bytes
from lmt_tf.optim import model_transforms
from lmt_tf.optim.model_transforms import ModelTransform
from lmt_tf.optim.technique import Technique
from lmt_tf.stages.context import RunContext, Stage, prefixed
from lmt_tf.training.callbacks import EpochCheckpoint, EpochMetrics, divergence_guard
from lmt_tf.training.preemption import StartAt
from lmt_tf.training.trainer import Trainer

Epochs = Annotated[int, Range(ge=1)]  # a stage's fine-tuning epochs


class FineTune(Stage):
    """Subclasses give ``transform`` (or ``techniques``) and may add to ``report``.
    Metrics go under the stage's name (``prune/test_accuracy``), checkpoints under
    ``stages/<name>/``."""

    epochs = 1
    compresses = True  # prune, cluster, qat, distill: each a row of the report
    needs_trained_model = True  # fine-tuning: distill, which trains a fresh model, may not
    trains = True
    fresh_model = False  # it trains a new model (distill's student), not the current one
    # Log the gzipped weights before and after (``weights_gzip_bytes``, ...): for stages
    # whose zeros or shared values make the model smaller.
    measures_size = False

    def __init__(self, epochs: Epochs):
        check_arguments(self.name, FineTune, locals())
        self.epochs = epochs

    def transform(self, context: RunContext) -> ModelTransform | None:
        """The model transform to fine-tune through (called before the model is built)."""
        return None

    def techniques(self, context: RunContext) -> list[Technique]:
        """The training techniques the stage brings (called before the model is built)."""
        return []

    def keeps(self, technique: Technique) -> bool:
        """Whether the stage trains with a technique of the experiment's TrainConfig (a
        fine-tuning stage trains an already trained model briefly: with none)."""
        return False

    def model_fn(self, context: RunContext) -> Any:
        """What the stage trains: the current model (a distillation: a fresh one)."""
        return lambda **_: context.model

    def report(self, context: RunContext, transform: ModelTransform | None,
               trained: keras.Model, log: Any) -> str:
        """Logs what the stage achieved beyond test metrics; returns it as a phrase."""
        return ""

    def _build(self, context: RunContext
               ) -> tuple[Trainer, ModelTransform | None, keras.Model, StartAt]:
        """The stage's trainer, its transform, the model built through it and where its
        training starts: restored from the stage's checkpoints on a resume."""
        setup = context.setup
        config = setup.configs.train.without_techniques(
            self.keeps, epochs=self.epochs, steps_per_epoch=setup.plan.steps_per_epoch,
            divergence_retries=0)
        trainer = Trainer(config, setup.strategy, setup.configs.input)
        transform = self.transform(context)
        trained = trainer.build_model(self.model_fn(context), setup.splits,
                                      [transform] if transform else [],
                                      self.techniques(context))
        source = context.resumed(self.name)
        start = (trainer.restore(trained, source.checkpoints, setup.plan.steps_per_epoch,
                                 lambda metrics, step: context.run.log_metrics(
                                     prefixed(metrics, self.name), step))
                 if source is not None else StartAt())
        return trainer, transform, trained, start

    def restore(self, context: RunContext) -> None:
        trained = self._build(context)[2]
        context.model = model_transforms.inference_model(trained)
        context.echo(f"lmt: {self.name}: done in an earlier attempt; restored its model")

    def work(self, context: RunContext) -> None:
        steps = context.setup.plan.steps_per_epoch
        # Before the transform: pruning and clustering change these very layers in place.
        before = gzipped_bytes(context.model.get_weights()) if self.measures_size else 0
        trainer, transform, trained, start = self._build(context)

        def log(metrics: dict, step: int) -> None:
            context.run.log_metrics(prefixed(metrics, self.name), step)

        guard = divergence_guard(context.strategy, steps)
        own = context.stage_dir(self.name)
        callbacks = [guard, EpochMetrics(log),
                     EpochCheckpoint(trainer.checkpoint_manager(trained, own.checkpoints),
                                     sink=log)]
        context.echo(f"lmt: {self.describe()}")
        trainer.fit(trained, context.splits, context.setup.seed, start, callbacks)
        test = trainer.evaluate(trained, context.splits.test)
        log({f"test_{k}": v for k, v in test.items()}, self.epochs)
        context.model = model_transforms.inference_model(trained)
        context.test_metrics = test  # of the current model, as RunResult reports them
        context.add_row(self.name, context.model, test)
        achieved = self.report(context, transform, trained, log)
        if self.measures_size:
            after = gzipped_bytes(context.model.get_weights())
            log({"dense_weights_gzip_bytes": before, "weights_gzip_bytes": after,
                 "gzip_ratio": before / after}, self.epochs)
            achieved += (f"; weights {before / 1e6:.2f} -> {after / 1e6:.2f} MB gzipped "
                         f"({before / after:.1f}x)")
        context.echo(f"lmt: {self.name}: test "
                     + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
                     + (f"; {achieved}" if achieved else ""))
