"""How a model is trained: ``TrainConfig``, the basic settings of training and, composed
in, the settings of every technique in ``TECHNIQUES``.

``TECHNIQUES`` is where a training technique is registered: its class (settings and
behaviour, see ``optim.technique``) becomes part of ``TrainConfig`` — each of its fields
a ``TrainConfig`` field of the same name and default, bound in gin as
``TrainConfig.micro_batches = 4`` — and the trainer and fine-tuning find it here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, check, check_types, configured_call
from lmt_tf.errors import ConfigError
from lmt_tf.optim import weight_decay
from lmt_tf.optim.decoupled import DecoupledBlocks
from lmt_tf.optim.layerwise import LayerwiseUpdates
from lmt_tf.optim.local_sgd import LocalSGD
from lmt_tf.optim.schedules import WarmupCosineDecay
from lmt_tf.optim.sparse import EmbeddingOptimizer
from lmt_tf.optim.technique import Technique
from lmt_tf.optim.train_step import Accumulation
from lmt_tf.optim.transforms import GradientTransforms

# The techniques a TrainConfig configures, in the order they shape the train step.
TECHNIQUES: tuple[type[Technique], ...] = (
    Accumulation, GradientTransforms, LayerwiseUpdates, DecoupledBlocks, LocalSGD,
    EmbeddingOptimizer)
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Metric names that model.compile() maps to the loss's own variant.
_COMPILE_METRIC_NAMES = {"accuracy", "acc", "crossentropy", "ce"}


@dataclass
class TrainSettings:
    """The basic settings of training, without any technique's (``TrainConfig`` adds
    those). Batch sizes are global: summed over all replicas."""

    TECHNIQUES: ClassVar[tuple[type[Technique], ...]] = ()  # set by ``with_techniques``

    epochs: int = 1  # passes over the training split
    global_batch_size: int = 128  # examples per optimizer step, all replicas together
    steps_per_epoch: int | None = None  # None: every full global batch of the split once
    optimizer: Callable[..., Any] = keras.optimizers.Adam  # called with no arguments
    # Warmup and decay over the run's optimizer steps (epochs x steps per epoch), peaking
    # at the optimizer's learning rate (@WarmupCosineDecay()); None: the optimizer's own.
    learning_rate_schedule: WarmupCosineDecay | None = None
    # Left out of the optimizer's weight decay (which it must have): 'biases' (weights
    # named bias), 'norms' (normalization layers' scale and shift), 'embeddings'.
    exclude_from_weight_decay: tuple[Annotated[str, OneOf(*weight_decay.KINDS)], ...] = ()
    loss: str = "sparse_categorical_crossentropy"  # a Keras loss name
    metrics: tuple[str, ...] = ("accuracy",)  # Keras metric names
    steps_per_execution: int = 1  # steps per tf.function call (fewer host round trips)
    # XLA-compile the optimizer's update of each variable, fusing its elementwise ops
    # (Adam on the quickstart CNN: 1.3 instead of 3.0 ms on CPU). None (auto): on where
    # the update waits for every gradient (more than one replica in sync, or a technique
    # such as gradient clipping), since there it is on the critical path; off where it
    # overlaps backpropagation and compiling (~0.5 s) would not pay; Keras' choice (on)
    # with a GPU. Never under parameter servers: XLA cannot reach variables on another ps.
    jit_compile_update: bool | None = None
    verbose: int | None = None  # Keras verbosity; None: bar on a terminal, else per epoch
    deterministic: bool = False  # TensorFlow op determinism (slower; bitwise repeatable)
    precision: str = "float32"  # float32 | mixed_float16 (GPU) | mixed_bfloat16
    # On a NaN or infinite loss: roll back to the last checkpoint and continue with the
    # learning rate (or schedule) times divergence_lr_factor, up to this many times (0:
    # fail at once).
    divergence_retries: int = 0
    divergence_lr_factor: float = 0.5  # in (0, 1)

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # gin writes [...] as a list
            if typing.get_origin(hints[f.name]) is tuple and isinstance(getattr(self, f.name),
                                                                        list):
                setattr(self, f.name, tuple(getattr(self, f.name)))
        check_types(self)
        check(self.epochs >= 1, "TrainConfig.epochs", f"must be >= 1, got {self.epochs}")
        check(self.precision in PRECISIONS, "TrainConfig.precision",
              f"must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.divergence_retries >= 0, "TrainConfig.divergence_retries",
              f"must be >= 0, got {self.divergence_retries}")
        check(0 < self.divergence_lr_factor < 1, "TrainConfig.divergence_lr_factor",
              f"must be in (0, 1), got {self.divergence_lr_factor}")
        check(self.steps_per_execution >= 1, "TrainConfig.steps_per_execution",
              f"must be >= 1, got {self.steps_per_execution}")
        configured_call(keras.losses.get, "TrainConfig.loss", self.loss)
        for metric in self.metrics:
            _check_metric(metric)
        techniques = self.techniques()
        for technique in techniques:
            technique.validate(self)
        replacing = [t for t in techniques if t.replaces_step]
        if replacing:  # it trains with its own step: nothing else may shape it
            others = [t for t in self.techniques(every=True) if t is not replacing[0]]
            check(len(techniques) == 1, replacing[0].setting_names(),
                  "cannot be combined with "
                  + _either(f.name for t in others for f in dataclasses.fields(t)))

    def techniques(self, every: bool = False) -> list[Technique]:
        """The techniques these settings ask for (``every``: all, asked for or not), in
        ``TECHNIQUES`` order, each with its settings."""
        made = [cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})
                for cls in self.TECHNIQUES]
        return made if every else [t for t in made if t.active()]

    def without_techniques(self, keep: Callable[[Technique], bool] = lambda _: False,
                           **changes: Any) -> Any:
        """This config with ``changes`` and every technique not kept (``keep``) off: for
        a stage that fine-tunes a trained model."""
        for technique in self.techniques(every=True):
            if not keep(technique):
                changes.update(technique.off())
        return dataclasses.replace(self, **changes)


def _either(names: Sequence[str] | Any) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def with_techniques(base: type, techniques: Sequence[type[Technique]]) -> type:
    """``base`` with every field of each technique added, of the same type and default,
    as the dataclass ``TrainConfig`` (``TECHNIQUES``: the techniques it configures)."""
    fields: list[tuple[str, Any, Any]] = []
    for technique in techniques:
        hints = typing.get_type_hints(technique)
        for f in dataclasses.fields(technique):
            default = (dataclasses.field(default_factory=f.default_factory)
                       if f.default_factory is not dataclasses.MISSING
                       else dataclasses.field(default=f.default))
            fields.append((f.name, hints[f.name], default))
    names = [name for name, _, _ in fields]
    clashes = {n for n in names if names.count(n) > 1} | set(names) & {
        f.name for f in dataclasses.fields(base)}
    if clashes:
        raise TypeError(f"training techniques define settings twice: {sorted(clashes)}")
    listed = "; ".join(f"{t.__name__}: {', '.join(f.name for f in dataclasses.fields(t))}"
                       for t in techniques)
    doc = (f"How a model is trained: the basic settings ({base.__name__}) and those of each "
           f"training technique ({listed}). Batch sizes are global: summed over all replicas.")
    composed = dataclasses.make_dataclass(
        "TrainConfig", fields, bases=(base,),
        namespace={"__doc__": doc, "TECHNIQUES": tuple(techniques)})
    composed.__module__ = __name__
    return composed


TrainConfig = with_techniques(TrainSettings, TECHNIQUES)


def compile_metrics(names: Sequence[str]) -> list[Any]:
    """``TrainConfig.metrics`` as ``model.compile`` takes them: a name that resolves to a
    registered ``keras.metrics.Metric`` class (e.g. ``ClickAUC``) as a new instance of it
    (``keras.metrics.get`` hands the class back, which compile would call as a metric
    function); every other name as it is."""
    made: list[Any] = []
    for name in names:
        found = None if name in _COMPILE_METRIC_NAMES else keras.metrics.get(name)
        made.append(found() if isinstance(found, type)
                    and issubclass(found, keras.metrics.Metric) else name)
    return made


def _check_metric(name: Any) -> None:
    """Raises ConfigError unless ``name`` is a metric that ``model.compile`` resolves
    (``keras.metrics.get`` hands an unknown string back instead of failing)."""
    if not isinstance(name, str) or name in _COMPILE_METRIC_NAMES:
        return
    if callable(configured_call(keras.metrics.get, "TrainConfig.metrics", name)):
        return
    import difflib

    known = sorted(_COMPILE_METRIC_NAMES | {n for n in dir(keras.metrics)
                                            if n.islower() and not n.startswith("_")})
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise ConfigError(f"TrainConfig.metrics: unknown metric {name!r}{hint}")
