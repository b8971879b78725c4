"""The ``prune`` stage: fine-tune the current model while TF-MOT prunes its kernels to a
target sparsity; the stripped model (zeros in its kernels) goes on to the next stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmt_tf.checks import check
from lmt_tf.compression.pruning import (
    SCHEDULES,
    Pruning,
    PruningSchedule,
    gzip_bytes,
    kernel_sparsity,
)
from lmt_tf.rundir import RunDir
from lmt_tf.stages.context import RunContext, Stage, prefixed
from lmt_tf.training import model_transforms
from lmt_tf.training.callbacks import (
    DivergenceGuard,
    EpochCheckpoint,
    EpochMetrics,
    StepDivergenceGuard,
)
from lmt_tf.training.preemption import StartAt
from lmt_tf.training.preemption import supported as per_step_supported
from lmt_tf.training.trainer import Trainer

FINAL_WEIGHTS = "final_weights.npz"


class Prune(Stage):
    """Magnitude pruning (TF-MOT ``prune_low_magnitude``) while fine-tuning for ``epochs``
    with the experiment's optimizer, loss and batch size.

    Args:
      final_sparsity: fraction of each pruned kernel that is zero at the end.
      epochs: fine-tuning epochs.
      schedule: ``polynomial`` (from ``initial_sparsity`` up, cubic) or ``constant``.
      initial_sparsity: polynomial schedule's start.
      frequency: steps between mask updates; None: about 20 updates over the stage.
      layers: names of the layers to prune; empty: every prunable layer.
      m_by_n: e.g. (2, 4): at most 2 non-zero weights in every 4 consecutive input
        weights (structured sparsity; replaces the schedule: 50% from the start).
    """

    name = "prune"

    def __init__(self, final_sparsity: float = 0.8, epochs: int = 2,
                 schedule: str = "polynomial", initial_sparsity: float = 0.0,
                 frequency: int | None = None, layers: Sequence[str] = (),
                 m_by_n: Sequence[int] | None = None):
        check(0 < final_sparsity < 1, "prune.final_sparsity",
              f"must be in (0, 1), got {final_sparsity!r}")
        check(0 <= initial_sparsity <= final_sparsity, "prune.initial_sparsity",
              f"must be in [0, final_sparsity], got {initial_sparsity!r}")
        check(isinstance(epochs, int) and epochs >= 1, "prune.epochs",
              f"must be an integer >= 1, got {epochs!r}")
        check(schedule in SCHEDULES, "prune.schedule",
              f"must be one of {SCHEDULES}, got {schedule!r}")
        check(frequency is None or (isinstance(frequency, int) and frequency >= 1),
              "prune.frequency", f"must be None or an integer >= 1, got {frequency!r}")
        check(m_by_n is None or (len(m_by_n) == 2 and 0 < m_by_n[0] < m_by_n[1]),
              "prune.m_by_n", f"must be (m, n) with 0 < m < n, e.g. (2, 4), got {m_by_n!r}")
        self.final_sparsity, self.epochs, self.schedule = final_sparsity, epochs, schedule
        self.initial_sparsity, self.frequency = initial_sparsity, frequency
        self.layers = tuple(layers)
        self.m_by_n = tuple(m_by_n) if m_by_n else None

    def describe(self) -> str:
        target = (f"{self.m_by_n[0]}:{self.m_by_n[1]}" if self.m_by_n
                  else f"{self.final_sparsity:.0%} sparsity")
        return f"prune (to {target} over {self.epochs} epoch(s))"

    def run(self, context: RunContext) -> None:
        source = RunDir((context.run_dir or context.own).path / "stages" / self.name)
        if context.done(self.name):
            with np.load(source.path / FINAL_WEIGHTS) as saved:
                context.model.set_weights([saved[f"arr_{i}"] for i in range(len(saved))])
            context.echo("lmt: prune: done in an earlier attempt; restored its model")
            return
        own, run, plan = context.stage_dir(self.name), context.run, context.plan
        trainer = Trainer(_fine_tuning(context, self.epochs), context.strategy,
                          context.configs.input)
        dense_bytes = gzip_bytes(context.model.get_weights())
        steps = self.epochs * plan.steps_per_epoch
        transform = Pruning(PruningSchedule(self.final_sparsity, steps, self.schedule,
                                            self.initial_sparsity, self.frequency),
                            self.layers, self.m_by_n)
        pruned = trainer.build_model(lambda **_: context.model, context.splits, [transform])
        start = (trainer.restore(pruned, source.checkpoints, plan.steps_per_epoch)
                 if context.options.resume else StartAt())

        def log(metrics: dict, step: int) -> None:
            run.log_metrics(prefixed(metrics, self.name), step)

        guard = (StepDivergenceGuard if per_step_supported(context.strategy)
                 else DivergenceGuard)(plan.steps_per_epoch)
        callbacks = [guard, EpochMetrics(log),
                     EpochCheckpoint(trainer.checkpoint_manager(pruned, own.checkpoints))]
        context.echo(f"lmt: prune: {self.describe()}, layers {', '.join(transform.pruned)}")
        trainer.fit(pruned, context.splits, context.seed, start, callbacks)
        test = trainer.evaluate(pruned, context.splits.test)
        stripped = model_transforms.inference_model(pruned)
        sparsity = kernel_sparsity(stripped, transform.pruned)
        sizes = {name: stripped.get_layer(name).kernel.shape.num_elements()
                 for name in transform.pruned}
        overall = sum(sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
        log({f"test_{k}": v for k, v in test.items()}, self.epochs)
        pruned_bytes = gzip_bytes(stripped.get_weights())
        log({"sparsity": overall, **{f"sparsity/{n}": v for n, v in sparsity.items()},
             "dense_weights_gzip_bytes": dense_bytes, "weights_gzip_bytes": pruned_bytes,
             "gzip_ratio": dense_bytes / pruned_bytes}, self.epochs)
        context.echo("lmt: prune: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items())
                     + f"; sparsity {overall:.1%} of the pruned kernels; weights "
                     f"{dense_bytes / 1e6:.2f} -> {pruned_bytes / 1e6:.2f} MB gzipped "
                     f"({dense_bytes / pruned_bytes:.1f}x)")
        if context.role.is_chief:
            np.savez(Path(own.path) / FINAL_WEIGHTS, *stripped.get_weights())
        context.model = stripped
        context.mark_done(self.name)


def _fine_tuning(context: RunContext, epochs: int):
    """The experiment's TrainConfig for a fine-tuning stage: its optimizer, loss,
    metrics, batch and precision, for ``epochs``, without the training-time
    techniques that wrap the model in their own train step."""
    return dataclasses.replace(
        context.configs.train, epochs=epochs, steps_per_epoch=context.plan.steps_per_epoch,
        micro_batches=1, gradient_transforms=(), update_multipliers={}, unfreeze_epochs={},
        decoupled_blocks=(), local_steps=None, divergence_retries=0)
