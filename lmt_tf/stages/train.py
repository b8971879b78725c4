"""The ``train`` stage: fit the model under the experiment's TrainConfig (validating every
epoch, a checkpoint per epoch, and one on preemption), then test it."""

from __future__ import annotations

import contextlib
from typing import Any

import tf_keras as keras

from lmt_tf.stages.context import RunContext, Stage
from lmt_tf.training.callbacks import (
    EpochCheckpoint,
    EpochMetrics,
    StepMetrics,
    Throughput,
    TrainingDiverged,
    batch_hooks_allowed,
    divergence_guard,
    trial_reporter,
)
from lmt_tf.training.preemption import PREEMPTED_DIR, PreemptionCheckpoint, StartAt
from lmt_tf.training.trainer import latest_checkpoint


class Train(Stage):
    """Trains ``context.trainable`` (the model and its training wrappers) from the last
    checkpoint, tests it, and leaves the trained model in the context. Its metrics and
    checkpoints keep the plain names of a training run (``loss``, ``test_accuracy``,
    ``checkpoints/``)."""

    name = "train"
    trains = True

    def restore(self, context: RunContext) -> None:
        start = self._restored(context)
        context.echo(f"lmt: train: done in an earlier attempt; restored epoch {start.epoch}")

    def _restored(self, context: RunContext) -> StartAt:
        """Restores the last checkpoint of the run this one continues, if any."""
        source = context.resumed()
        if source is None:
            return StartAt()
        return context.setup.trainer.restore(context.trainable, source.checkpoints,
                                             context.setup.plan.steps_per_epoch,
                                             context.run.log_metrics)

    def work(self, context: RunContext) -> None:
        setup, own, run = context.setup, context.session.own, context.run
        trainer, plan, model = setup.trainer, setup.plan, context.trainable
        start = self._restored(context)
        if start != StartAt():
            context.echo(f"lmt: resuming {context.session.source.path} at epoch "
                         f"{start.epoch + 1}, step {start.step + 1}")

        def saved(done: int) -> None:
            own.update_state(epochs=done)
            own.mark_latest()  # a run with a checkpoint is one --resume can continue

        def saved_on_preemption(step: int) -> None:
            own.update_state(preempted_at_step=step)
            own.mark_latest()

        chief = setup.role.is_chief
        guard = divergence_guard(setup.strategy, plan.steps_per_epoch)
        callbacks = [guard,  # before the checkpoint: a diverged epoch is never saved
                     Throughput(run.log_metrics, plan.examples_per_epoch),
                     EpochMetrics(run.log_metrics),
                     EpochCheckpoint(trainer.checkpoint_manager(model, own.checkpoints),
                                     saved if chief else None, run.log_metrics)]
        tracking = setup.configs.tracking
        every = tracking.log_every_n_steps
        if every:
            callbacks.append(StepMetrics(run.log_metrics, every, plan.steps_per_epoch))
        reporter = trial_reporter() if chief else None  # a pruned sweep's trial
        if reporter is not None:
            callbacks.append(reporter)
        board = own.path / "tensorboard"
        if tracking.tensorboard:
            # Every worker writes (Keras' callback runs on all); only the chief's count.
            callbacks.append(keras.callbacks.TensorBoard(
                str(board if chief else own.path / "tensorboard-worker"),
                profile_batch=tracking.tensorboard_profile
                if tracking.tensorboard_profile[0] else 0))
        preemption: Any = contextlib.nullcontext()
        if batch_hooks_allowed(setup.strategy):  # the handler runs at each step's end
            preemption = PreemptionCheckpoint(
                setup.strategy,
                trainer.checkpoint_manager(model, own.checkpoints / PREEMPTED_DIR, 1),
                plan.steps_per_epoch, saved_on_preemption if chief else None)
            callbacks.append(preemption)
        with preemption:
            result = _fit(context, start, [*callbacks, *context.options.callbacks])
        if tracking.tensorboard and chief and board.is_dir():
            run.log_artifacts(board, "tensorboard")
        test = trainer.evaluate(model, context.splits.test)
        run.log_metrics({f"test_{k}": v for k, v in test.items()}, step=trainer.config.epochs)
        context.echo("lmt: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
        context.history, context.test_metrics = result.history, test
        context.add_row(self.name, context.model, test)


def _fit(context: RunContext, start: StartAt, callbacks: list[keras.callbacks.Callback]
         ) -> Any:
    """``trainer.fit``; with ``TrainConfig.divergence_retries``, a diverged fit rolls back
    to the last checkpoint (the weights before training if there is none yet) with a
    lower learning rate (a schedule: scaled down) and continues, each rollback logged as
    an event of the run."""
    trainer, model, own = context.setup.trainer, context.trainable, context.session.own
    retries = trainer.config.divergence_retries
    if retries and latest_checkpoint(own.checkpoints)[0] is None:
        trainer.checkpoint_manager(model, own.checkpoints).save(checkpoint_number=0)
    initial = trainer.learning_rate(model) if retries else 0.0
    for rollback in range(retries + 1):
        try:
            return trainer.fit(model, context.splits, context.setup.seed, start, callbacks)
        except TrainingDiverged as e:
            if rollback == retries:
                raise
            start = trainer.restore(model, own.checkpoints, context.setup.plan.steps_per_epoch,
                                    context.run.log_metrics)
            lowered = trainer.lower_learning_rate(model, initial, rollback + 1)
            event = (f"step {e.step} (epoch {e.epoch}): loss {e.value}; rolled back to epoch "
                     f"{start.epoch + 1}, step {start.step + 1}; {lowered}")
            context.run.set_tags({f"lmt.rollback.{rollback + 1}": event})
            context.run.log_metrics({"divergence_rollbacks": rollback + 1}, step=e.step)
            context.echo(f"lmt: training diverged at {event} ({rollback + 1}/{retries})")
    raise AssertionError("unreachable")
