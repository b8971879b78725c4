"""The seam through which a training technique changes training, written in one place:
its settings (dataclass fields) and what it does to the train step, the model's
variables and ``fit``'s callbacks. The trainer and the fine-tuning stages see only
this interface, never a technique by name.

Techniques configured in ``TrainConfig`` are listed in ``training.config.TECHNIQUES``
(each field becomes a ``TrainConfig`` field of the same name and default); a technique
that a stage brings (distillation's soft targets, FedProx's proximal term) is handed to
the trainer by that stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import tensorflow as tf
import tf_keras as keras

from lmt_tf.optim.model_transforms import ModelTransform


class LossTerm:
    """What a technique adds to the loss of the train step: FedProx's proximal term,
    distillation's soft targets. At most one term of a step may also replace its forward
    pass (``forward``)."""

    replaces_forward = False

    def bind(self, inner: keras.Model) -> None:
        """Called once with the trained model, in the strategy's scope (variables)."""

    def forward(self, x: Any) -> tf.Tensor:
        """The trained model's predictions on ``x`` (only if ``replaces_forward``)."""
        raise NotImplementedError

    def __call__(self, loss: tf.Tensor, x: Any, y: Any, y_pred: tf.Tensor) -> tf.Tensor:
        """The training loss with this term added (the loss averaged over the global
        batch, as the compiled loss is)."""
        raise NotImplementedError


@dataclass
class StepSpec:
    """What one training step does, assembled from the active techniques (see
    ``train_step.MicroBatchTrainStep``, which runs it)."""

    micro_batches: int = 1  # gradient accumulation: micro-batches per step
    # Gradient transforms (optim.transforms), applied after aggregation, in order.
    transforms: list[Callable[..., Any]] = field(default_factory=list)
    multipliers: dict[str, float] = field(default_factory=dict)  # block -> update factor
    unfreeze_epochs: dict[str, int] = field(default_factory=dict)  # block -> first epoch
    layer_decay: float = 1.0  # update factor per transformer block below the head
    loss_terms: list[LossTerm] = field(default_factory=list)
    # Makes the optimizer of the embedding tables (optim.sparse), None: one optimizer.
    embedding_optimizer: Callable[..., Any] | None = None

    @classmethod
    def of(cls, techniques: Sequence[Technique]) -> StepSpec:
        """The step that ``techniques`` shape, in order."""
        spec = cls()
        for technique in techniques:
            technique.shape(spec)
        return spec


@dataclass
class Technique:
    """A training technique. A subclass's dataclass fields are its settings, each off by
    default; ``active`` says whether they ask for anything. The trainer calls, for every
    active technique: ``check`` (before anything is built), ``check_batch`` (with the
    batch plan), ``variables`` (around creating the model's and the optimizer's
    variables), ``shape`` (to assemble the train step) or, for a technique that replaces
    the train step, ``wrapper``, and ``callbacks`` (for ``fit``).
    """

    # Where its settings are bound, for error messages ("TrainConfig.micro_batches").
    setting: ClassVar[str] = "TrainConfig"
    # Replaces the train step with one of its own (and so combines with no technique
    # that shapes the step).
    replaces_step: ClassVar[bool] = False
    # The optimizer's update waits for every gradient (a global norm): XLA-compiling
    # the update pays even on one replica.
    waits_for_all_gradients: ClassVar[bool] = False
    # The clipping factors may be multiplied inside the optimizer's update (see
    # ``train_step.UpdateFactors``); not where replicas apply their own gradients.
    allows_fused_update: ClassVar[bool] = True
    # A stage that trains a fresh model (a distilled student) keeps it: it shapes only
    # the arithmetic of one step, not the configured model's layers or the schedule.
    kept_for_students: ClassVar[bool] = False

    def active(self) -> bool:
        """Whether its settings ask for anything (all at their defaults: no)."""
        return any(getattr(self, name) != value for name, value in self.off().items())

    @classmethod
    def off(cls) -> dict[str, Any]:
        """Its settings at their defaults, which ask for nothing."""
        return {f.name: _default(f) for f in dataclasses.fields(cls)}

    def validate(self, config: Any) -> None:
        """Raises ConfigError for a setting out of range or a combination the technique
        cannot run with (``config``: the whole TrainConfig)."""

    def check(self, strategy: tf.distribute.Strategy) -> None:
        """Raises ConfigError if the technique cannot run under ``strategy``."""

    def check_batch(self, per_replica_batch_size: int) -> None:
        """Raises ConfigError if the technique cannot split this per-replica batch."""

    @contextlib.contextmanager
    def variables(self) -> Iterator[None]:
        """Around the creation of the model's and the optimizer's variables."""
        yield

    def shape(self, step: StepSpec) -> None:
        """Adds what the technique does to one training step."""

    def wrapper(self, config: Any) -> ModelTransform:
        """The transform to a train step of its own (``replaces_step`` only), given the
        whole TrainConfig (its loss)."""
        raise NotImplementedError

    def callbacks(self, step: keras.Model) -> list[keras.callbacks.Callback]:
        """Callbacks that training with the train ``step`` (the model in its training
        wrapper) needs."""
        return []

    def setting_names(self) -> str:
        """Its settings as they are bound, for messages: ``TrainConfig.local_steps``."""
        return ", ".join(f"{self.setting}.{f.name}" for f in dataclasses.fields(self))


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def active(techniques: Sequence[Technique]) -> list[Technique]:
    """The techniques whose settings ask for something."""
    return [t for t in techniques if t.active()]


@contextlib.contextmanager
def variables(techniques: Sequence[Technique]) -> Iterator[None]:
    """Every technique's ``variables`` context, nested in order."""
    with contextlib.ExitStack() as stack:
        for technique in techniques:
            stack.enter_context(technique.variables())
        yield
