"""``FineTune``: the base of stages that fine-tune the current model through a model
transform (prune, qat, cluster): build the transformed model in the strategy's scope,
resume from the stage's own checkpoints, train with the experiment's optimizer, loss
and batch, test, and hand the stripped model to the next stage."""

from __future__ import annotations

import dataclasses
from typing import Any

import tf_keras as keras

from lmt_tf.checks import check
from lmt_tf.compression.report import weight_bytes
from lmt_tf.rundir import RunDir
from lmt_tf.stages.context import RunContext, Stage, prefixed
from lmt_tf.training import model_transforms
from lmt_tf.training.callbacks import EpochCheckpoint, EpochMetrics, divergence_guard
from lmt_tf.training.model_transforms import ModelTransform
from lmt_tf.training.preemption import StartAt
from lmt_tf.training.trainer import TrainConfig, Trainer


class FineTune(Stage):
    """Subclasses give ``transform`` and may add to ``report``. Metrics go under the
    stage's name (``prune/test_accuracy``), checkpoints under ``stages/<name>/``."""

    epochs = 1
    compresses = True  # prune, cluster, qat, distill: each a row of the report
    # Log the gzipped weights before and after (``weights_gzip_bytes``, ...): for stages
    # whose zeros or shared values make the model smaller.
    measures_size = False

    def __init__(self, epochs: int):
        check(isinstance(epochs, int) and epochs >= 1, f"{self.name}.epochs",
              f"must be an integer >= 1, got {epochs!r}")
        self.epochs = epochs

    def transform(self, context: RunContext) -> ModelTransform:
        """The transform to fine-tune through (called before the model is built)."""
        raise NotImplementedError

    def model_fn(self, context: RunContext) -> Any:
        """What the stage trains: the current model (a distillation: a fresh one)."""
        return lambda **_: context.model

    def report(self, context: RunContext, transform: ModelTransform, trained: keras.Model,
               log: Any) -> str:
        """Logs what the stage achieved beyond test metrics; returns it as a phrase."""
        return ""

    def run(self, context: RunContext) -> None:
        plan, run = context.plan, context.run
        source = RunDir((context.run_dir or context.own).path / "stages" / self.name)
        trainer = Trainer(fine_tuning(context.configs.train, self.epochs, plan.steps_per_epoch),
                          context.strategy, context.configs.input)
        # Before the transform: pruning and clustering change these very layers in place.
        before = weight_bytes(context.model.get_weights())[1] if self.measures_size else 0
        transform = self.transform(context)
        trained = trainer.build_model(self.model_fn(context), context.splits, [transform])
        start = (trainer.restore(trained, source.checkpoints, plan.steps_per_epoch)
                 if context.options.resume else StartAt())
        if context.done(self.name):
            context.model = model_transforms.inference_model(trained)
            context.echo(f"lmt: {self.name}: done in an earlier attempt; restored its model")
            return

        def log(metrics: dict, step: int) -> None:
            run.log_metrics(prefixed(metrics, self.name), step)

        guard = divergence_guard(context.strategy, plan.steps_per_epoch)
        own = context.stage_dir(self.name)
        callbacks = [guard, EpochMetrics(log),
                     EpochCheckpoint(trainer.checkpoint_manager(trained, own.checkpoints))]
        context.echo(f"lmt: {self.describe()}")
        trainer.fit(trained, context.splits, context.seed, start, callbacks)
        test = trainer.evaluate(trained, context.splits.test)
        log({f"test_{k}": v for k, v in test.items()}, self.epochs)
        context.model = model_transforms.inference_model(trained)
        context.test_metrics = test  # of the current model, as RunResult reports them
        context.add_row(self.name, context.model, test)
        achieved = self.report(context, transform, trained, log)
        if self.measures_size:
            after = weight_bytes(context.model.get_weights())[1]
            log({"dense_weights_gzip_bytes": before, "weights_gzip_bytes": after,
                 "gzip_ratio": before / after}, self.epochs)
            achieved += (f"; weights {before / 1e6:.2f} -> {after / 1e6:.2f} MB gzipped "
                         f"({before / after:.1f}x)")
        context.echo(f"lmt: {self.name}: test "
                     + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
                     + (f"; {achieved}" if achieved else ""))
        context.mark_done(self.name)


def fine_tuning(config: TrainConfig, epochs: int, steps_per_epoch: int) -> TrainConfig:
    """The experiment's TrainConfig for a fine-tuning stage: its optimizer, loss,
    metrics, batch and precision, for ``epochs``, without the training-time techniques
    that wrap the model in a train step of their own."""
    return dataclasses.replace(
        config, epochs=epochs, steps_per_epoch=steps_per_epoch, micro_batches=1,
        gradient_transforms=(), update_multipliers={}, unfreeze_epochs={},
        decoupled_blocks=(), local_steps=None, divergence_retries=0)
