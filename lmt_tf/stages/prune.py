"""The ``prune`` stage: fine-tune the current model while TF-MOT prunes its kernels to a
target sparsity; the stripped model (zeros in its kernels) goes on to the next stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range, check, check_arguments
from lmt_tf.compression.pruning import (
    SCHEDULES,
    Pruning,
    PruningSchedule,
    check_m_by_n,
    kernel_sparsity,
    pruned_layers,
    pruned_size,
    pruning_plan,
)
from lmt_tf.errors import ConfigError
from lmt_tf.stages.context import RunContext
from lmt_tf.stages.fine_tune import Epochs, FineTune
from lmt_tf.training.callbacks import batch_hooks_allowed


class Prune(FineTune):
    """Magnitude pruning (TF-MOT ``prune_low_magnitude``) while fine-tuning for ``epochs``
    with the experiment's optimizer, loss and batch size.

    Args:
      final_sparsity: fraction of each pruned kernel that is zero at the end.
      epochs: fine-tuning epochs.
      schedule: ``polynomial`` (from ``initial_sparsity`` up, cubic) or ``constant``.
      initial_sparsity: polynomial schedule's start.
      frequency: steps between mask updates; None: about 20 updates over the stage.
      layers: names of the layers to prune, or shell-style patterns of names
        (``block*_ffn*``); empty: every layer TF-MOT can prune.
      m_by_n: e.g. (2, 4): at most 2 non-zero weights in every 4 consecutive input
        weights (structured sparsity; replaces the schedule: 50% from the start).
    """

    name = "prune"
    measures_size = True

    def __init__(self, final_sparsity: Annotated[float, Range(gt=0, lt=1)] = 0.8,
                 epochs: Epochs = 2,
                 schedule: Annotated[str, OneOf(*SCHEDULES)] = "polynomial",
                 initial_sparsity: Annotated[float, Range(ge=0, lt=1)] = 0.0,
                 frequency: Annotated[int, Range(ge=1)] | None = None,
                 layers: Sequence[str] = (),
                 m_by_n: tuple[Annotated[int, Range(ge=1)], Annotated[int, Range(ge=1)]]
                 | None = None):
        check_arguments(self.name, type(self), locals())
        super().__init__(epochs)
        check(initial_sparsity <= final_sparsity, "prune.initial_sparsity",
              f"must be in [0, final_sparsity], got {initial_sparsity!r}")
        check(m_by_n is None or m_by_n[0] < m_by_n[1],
              "prune.m_by_n", f"must be (m, n) with 0 < m < n, e.g. (2, 4), got {m_by_n!r}")
        self.final_sparsity, self.schedule = final_sparsity, schedule
        self.initial_sparsity, self.frequency = initial_sparsity, frequency
        self.layers = tuple(layers)
        self.m_by_n = tuple(m_by_n) if m_by_n else None

    def describe(self) -> str:
        target = (f"{self.m_by_n[0]}:{self.m_by_n[1]}" if self.m_by_n
                  else f"{self.final_sparsity:.0%} sparsity")
        return f"prune (to {target} over {self.epochs} epoch(s))"

    def check(self, context: RunContext) -> None:
        if not batch_hooks_allowed(context.strategy):
            raise ConfigError("prune cannot run under ParameterServerStrategy: TF-MOT's "
                              "UpdatePruningStep is a batch-level callback, which Keras "
                              "does not allow there (use multi-worker mirrored)")
        # The layers, named before any training.
        chosen = pruned_layers(context.model, self.layers)
        if self.m_by_n:
            check_m_by_n(context.model, chosen)

    def work(self, context: RunContext) -> None:
        # What is pruned and what stays dense, in one line, printed and logged.
        line = pruning_plan(context.model, pruned_layers(context.model, self.layers))
        context.echo(f"lmt: prune: {line}")
        context.run.log_text(line + "\n", "prune/layers.txt")
        super().work(context)

    def transform(self, context: RunContext) -> Pruning:
        steps = self.epochs * context.setup.plan.steps_per_epoch
        return Pruning(PruningSchedule(self.final_sparsity, steps, self.schedule,
                                       self.initial_sparsity, self.frequency),
                       self.layers, self.m_by_n)

    def report(self, context: RunContext, transform: Any, trained: keras.Model,
               log: Any) -> str:
        stripped = context.model
        sparsity = kernel_sparsity(stripped, transform.pruned)
        sizes = pruned_size(stripped, transform.pruned)
        overall = sum(sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
        log({"sparsity": overall, **{f"sparsity/{n}": v for n, v in sparsity.items()}},
            self.epochs)
        return f"sparsity {overall:.1%} of {', '.join(transform.pruned)}"
