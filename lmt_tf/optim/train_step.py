"""``MicroBatchTrainStep``: a Keras model wrapping the user's model whose train step runs
what the active training techniques assembled (a ``technique.StepSpec``):

    gradients = self._micro_batch_gradients(x, y, w)   # accumulation: k micro-batches
    gradients = aggregate(gradients)                   # once, over all replicas
    gradients = transform_lazily(transforms, ...)      # the clipping chain, after that
    apply_gradients(gradients); rescale_updates(...)   # layer-wise update factors

(1) splits each per-replica batch into k micro-batches and sums their gradients in a
loop, so activations of only one micro-batch are alive at a time; (2) aggregates the
gradient over all replicas once; (3) applies the configured gradient transforms to that
aggregated gradient (the semantics of one large batch); (4) updates once, each block's
update scaled by its factor when layer-wise multipliers, unfreezing or layer-wise rate
decay are configured.
Loss terms (FedProx's, distillation's) add to the loss of each micro-batch.

With an embedding optimizer (``optim.sparse``), the gradients of the embedding tables
stay ``tf.IndexedSlices`` (the looked-up rows) through every one of these steps — summed
over micro-batches by concatenating rows, aggregated as rows, clipped by their rows'
norms — and that optimizer updates only those rows; every other gradient is dense and
goes to the step's own optimizer.

k micro-batches of size b give the update of one batch of k*b (without BatchNorm), and
learning-rate schedules see one optimizer step per k micro-batches. ``Accumulation``,
the technique behind ``TrainConfig.micro_batches``, lives here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check, configured_call
from lmt_tf.errors import ConfigError
from lmt_tf.optim import sparse
from lmt_tf.optim.layerwise import BlockSchedule, rescale_updates
from lmt_tf.optim.model_transforms import ModelTransform
from lmt_tf.optim.technique import StepSpec, Technique
from lmt_tf.optim.transforms import Rescaling, transform_lazily


class TrainingOnlyMetrics(keras.Model):
    """A model with metrics that mean something only while training (gradient norm,
    auxiliary losses). They are left out of ``metrics`` while evaluating, so evaluation
    logs name exactly the model's metrics: Keras then reports the metrics aggregated
    over all workers instead of a sum of per-worker step results."""

    _training_only: tuple[str, ...] = ()
    _evaluating = False

    @property
    def metrics(self):
        metrics = super().metrics
        if self._evaluating:
            return [m for m in metrics if m.name not in self._training_only]
        return metrics

    def evaluate(self, *args, **kwargs):
        # fit() validates through evaluate() too.
        self._evaluating = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._evaluating = False


class MicroBatchTrainStep(TrainingOnlyMetrics):
    """Trains ``inner`` with what ``spec`` asks for: micro-batching, post-aggregation
    gradient transforms, block update factors, loss terms.

    Predictions, evaluation and export use ``inner`` unchanged.
    """

    def __init__(self, inner: keras.Model, spec: StepSpec | None = None, **kwargs):
        super().__init__(name=f"{inner.name}_train_step", **kwargs)
        spec = spec or StepSpec()
        self.inner = inner
        self.micro_batches = spec.micro_batches
        self.transforms = list(spec.transforms)
        self.schedule = (BlockSchedule(inner, spec.multipliers, spec.unfreeze_epochs,
                                       spec.layer_decay)
                         if spec.multipliers or spec.unfreeze_epochs or spec.layer_decay != 1
                         else None)
        self.loss_terms = list(spec.loss_terms)
        forwarding = [term for term in self.loss_terms if term.replaces_forward]
        if len(forwarding) > 1:
            raise ConfigError("two training techniques each replace the forward pass "
                              f"({', '.join(type(t).__name__ for t in forwarding)})")
        self._forwarding = forwarding[0] if forwarding else None
        # Set by LocalSGD: each replica applies its own gradient, unaggregated.
        self.local_updates = False
        self.update_factors: UpdateFactors | None = None  # see fuse_rescaling
        # The embedding tables' own optimizer, and the ids of the variables it updates.
        self.embedding_optimizer = None
        self._sparse: frozenset[int] = frozenset()
        if spec.embedding_optimizer is not None:
            self._bind_embedding_optimizer(spec.embedding_optimizer)
        for transform in self.transforms:
            if hasattr(transform, "bind"):
                transform.bind(inner)
        for term in self.loss_terms:
            term.bind(inner)
        self.gradient_norm = keras.metrics.Mean(name="gradient_norm")
        self._training_only = ("gradient_norm",)

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def _bind_embedding_optimizer(self, make: Any) -> None:
        """Makes the embedding tables' optimizer (in the strategy's scope, as the step is
        built) and learns which variables it updates.

        Raises:
          ConfigError: for an optimizer that is not row-sparse, a model without
            embedding tables, or a block update factor on a table.
        """
        tables = sparse.embedding_variables(self.inner)
        check(bool(tables), sparse.SETTING,
              f"is set, but model {self.inner.name!r} has no keras.layers.Embedding layer")
        optimizer = configured_call(make, sparse.SETTING)
        sparse.check_row_sparse(optimizer)
        # Its update is a gather and scatters of a few rows, nothing for XLA to fuse; and
        # under parameter servers XLA cannot reach the tables on other tasks.
        optimizer.jit_compile = False
        self.embedding_optimizer = optimizer
        self._sparse = frozenset(id(v) for v in tables)
        if self.schedule is not None:
            scaled = [v.name for v, _ in self.schedule.scaled(tables)]
            check(not scaled, sparse.SETTING,
                  f"cannot be combined with block update factors on embedding tables "
                  f"({', '.join(scaled)}): rescaling an update copies the whole table each "
                  f"step; leave the embedding layers out of TrainConfig.update_multipliers, "
                  f"unfreeze_epochs and layer_decay")

    def _is_sparse(self, variable: tf.Variable) -> bool:
        """Whether the embedding optimizer updates ``variable`` (its gradient stays sparse)."""
        return id(variable) in self._sparse

    def build_optimizers(self) -> None:
        """Creates every optimizer's slots, each for the variables it updates (in the
        strategy's scope, so that they sit beside their variables)."""
        variables = self.inner.trainable_variables
        self.optimizer.build([v for v in variables if not self._is_sparse(v)])
        if self.embedding_optimizer is not None:
            self.embedding_optimizer.build([v for v in variables if self._is_sparse(v)])

    @property
    def optimizers(self) -> list[keras.optimizers.Optimizer]:
        """The step's optimizer, and the embedding tables' if any."""
        return [self.optimizer, *([self.embedding_optimizer] if self.embedding_optimizer
                                   else [])]

    def _loss_and_gradients(self, x, y, sample_weight, variables):
        with tf.GradientTape() as tape:
            tape.watch(variables)  # replica-local weights are not trainable to TensorFlow
            y_pred = self._forward(x)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            scaled = loss / self.micro_batches
            if self.local_updates:
                # The loss is averaged over the global batch so that replicas' gradients
                # sum to the mean; a local step follows its own replica's mean gradient.
                scaled *= tf.distribute.get_strategy().num_replicas_in_sync
            if isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer):
                scaled = self.optimizer.get_scaled_loss(scaled)
        gradients = tape.gradient(scaled, variables)
        if isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer):
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return [self._sparse_gradient(g, v) if self._is_sparse(v)
                else tf.convert_to_tensor(g) if g is not None else tf.zeros_like(v)
                for g, v in zip(gradients, variables, strict=True)]

    @staticmethod
    def _sparse_gradient(gradient: Any, variable: tf.Variable) -> tf.IndexedSlices:
        """An embedding table's gradient as rows (int64 indices): none if it was not
        looked up, never the dense table."""
        shape = tf.constant(variable.shape.as_list(), tf.int64)
        if gradient is None:
            return tf.IndexedSlices(tf.zeros([0, *variable.shape[1:]], variable.dtype),
                                    tf.zeros([0], tf.int64), shape)
        if not isinstance(gradient, tf.IndexedSlices):
            raise ConfigError(f"{sparse.SETTING}: the gradient of {variable.name} is dense "
                              f"(a layer other than the lookup reads the whole table)")
        return tf.IndexedSlices(gradient.values, tf.cast(gradient.indices, tf.int64), shape)

    def _forward(self, x):
        """The trained model's predictions on ``x`` (a loss term may replace the pass)."""
        if self._forwarding is not None:
            return self._forwarding.forward(x)
        return self.inner(x, training=True)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        # The compiled loss averages over the global batch (each replica's share); the
        # loss terms add theirs averaged the same way, so replicas' gradients sum right.
        loss = super().compute_loss(x, y, y_pred, sample_weight)
        if self._evaluating:  # the loss on the labels, comparable across runs
            return loss
        for term in self.loss_terms:
            loss = term(loss, x, y, y_pred)
        return loss

    def _micro_batch_gradients(self, x, y, sample_weight, variables):
        k = self.micro_batches
        if k == 1:
            return self._loss_and_gradients(x, y, sample_weight, variables)

        def split(t):
            return None if t is None else tf.reshape(
                t, tf.concat([[k, tf.shape(t)[0] // k], tf.shape(t)[1:]], axis=0))

        xs, ys, ws = tf.nest.map_structure(split, x), split(y), split(sample_weight)

        def body(i, accumulated):
            part = tf.nest.map_structure(lambda t: t[i], xs)
            weight = None if ws is None else ws[i]
            grads = self._loss_and_gradients(part, ys[i], weight, variables)
            # A table's rows are concatenated: the rows of the k micro-batches together
            # are those of the one big batch (their duplicates summed by the update).
            return i + 1, [(tf.concat([a[0], g.values], 0), tf.concat([a[1], g.indices], 0))
                           if isinstance(g, tf.IndexedSlices) else a + g
                           for a, g in zip(accumulated, grads, strict=True)]

        start = [(tf.zeros([0, *v.shape[1:]], v.dtype), tf.zeros([0], tf.int64))
                 if self._is_sparse(v) else tf.zeros_like(v) for v in variables]
        invariants = [(tf.TensorShape([None, *v.shape[1:]]), tf.TensorShape([None]))
                      if self._is_sparse(v) else v.shape for v in variables]
        # A while loop (not an unrolled one) runs micro-batches one after another, so
        # activations of only one are alive at a time.
        _, summed = tf.while_loop(lambda i, _: i < k, body, [tf.constant(0), start],
                                  shape_invariants=[tf.TensorShape([]), invariants],
                                  parallel_iterations=1)
        return [tf.IndexedSlices(s[0], s[1], tf.constant(v.shape.as_list(), tf.int64))
                if self._is_sparse(v) else s for s, v in zip(summed, variables, strict=True)]

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.inner.trainable_variables
        gradients = self._micro_batch_gradients(x, y, sample_weight, variables)
        if not self.local_updates:  # local steps apply each replica's own gradient
            optimizer = getattr(self.optimizer, "inner_optimizer", self.optimizer)
            aggregated = optimizer.aggregate_gradients(list(zip(gradients, variables,
                                                                strict=True)))
            gradients = [g for g, _ in aggregated]
        transformed, norm = transform_lazily(self.transforms, gradients, variables)
        if self.update_factors is not None:  # the optimizer's update multiplies them
            self.update_factors.assign(variables, transformed.factors)
            # ... but not the embedding optimizer's: a table's rows are rescaled here.
            gradients = [transformed.gradient(i) if self._is_sparse(v) else transformed.raw[i]
                         for i, v in enumerate(variables)]
        else:
            gradients = transformed.gradients()
        finite = tf.math.is_finite(norm)
        self.gradient_norm.update_state(tf.where(finite, norm, 0.0),
                                        sample_weight=tf.cast(finite, tf.float32))
        scaled = ([(v, tf.identity(v), factor) for v, factor in self.schedule.scaled(variables)]
                  if self.schedule else [])
        pairs = list(zip(gradients, variables, strict=True))
        self.optimizer.apply_gradients([(g, v) for g, v in pairs if not self._is_sparse(v)],
                                       skip_gradients_aggregation=True)
        if self.embedding_optimizer is not None:
            self.embedding_optimizer.apply_gradients(
                [(g, v) for g, v in pairs if self._is_sparse(v)],
                skip_gradients_aggregation=True)
        if scaled:
            rescale_updates(scaled)
        return {m.name: m.result() for m in self.metrics}

    def fuse_rescaling(self) -> None:
        """Lets the optimizer's update multiply the clipping factors into the gradients
        (see ``UpdateFactors``); call in the strategy's scope, after compile, when the
        update is XLA-compiled, and not under local SGD (its local steps, which start
        after the build, would need factors per replica). Nothing to fuse unless the
        last transform is a rescaling. Not for an optimizer that clips by itself (it
        would clip the unscaled gradients), nor under loss scaling: its optimizer skips
        a step whose gradients are not finite, so it must see the factors (a non-finite
        global norm makes them NaN)."""
        optimizer = self.optimizer
        if (self.update_factors is None and self.transforms
                and isinstance(self.transforms[-1], Rescaling)
                and not isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)
                and not any(getattr(optimizer, clip, None)
                            for clip in ("clipnorm", "clipvalue", "global_clipnorm"))):
            self.update_factors = UpdateFactors(optimizer, self.inner.trainable_variables)


class UpdateFactors:
    """The gradient transforms' rescalings applied where the optimizer's update reads the
    gradient, instead of as one more pass over every gradient before it. Each trainable
    variable gets a small factor variable (one value per output unit); the train step
    assigns the step's factors, and the optimizer's ``_update_step`` multiplies them into
    the raw gradient. Under an XLA-compiled update the multiply fuses into the update's
    own kernels, which takes a write and a read of every gradient off the end of the
    step, where global-norm clipping already waits for the last gradient (0.7 ms of the
    quickstart CNN's 36 ms step on 2 CPU cores, in a profile).

    The factors go through variables, not as tensors, because Keras caches its compiled
    per-variable update, which must not capture a tensor of one trace of the train step.
    Not tracked by the model: checkpoints hold nothing of them.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, variables: Sequence[tf.Variable]):
        if getattr(optimizer, "_lmt_update_factors", None) is not None:
            raise RuntimeError(f"optimizer {optimizer.name} already multiplies the clipping "
                               "factors of another model; build one optimizer per model")
        optimizer._lmt_update_factors = self
        self._optimizer = optimizer
        self._factors: dict[int, tf.Variable] = {}
        for variable in variables:
            shape = variable.shape
            per_unit = [1] * (shape.rank - 1) + [shape[-1]] if shape.rank >= 2 else shape
            # Every replica computes the same factors from the same aggregated gradient.
            self._factors[optimizer._var_key(variable)] = tf.Variable(
                tf.ones(per_unit, variable.dtype), trainable=False,
                name=f"gradient_factor_{len(self._factors)}",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        update_step = optimizer._update_step

        def scaled_update_step(gradient: tf.Tensor, variable: tf.Variable) -> Any:
            factor = self._factors.get(optimizer._var_key(variable))
            if factor is not None:
                gradient = gradient * tf.cast(factor, gradient.dtype)
            return update_step(gradient, variable)

        optimizer._update_step = scaled_update_step

    @property
    def variables(self) -> list[tf.Variable]:
        """The factor variables, one per trainable variable."""
        return list(self._factors.values())

    def assign(self, variables: Sequence[tf.Variable],
               factors: Sequence[tf.Tensor | None]) -> None:
        """This step's factor of each variable's gradient (None: 1)."""
        for variable, factor in zip(variables, factors, strict=True):
            slot = self._factors[self._optimizer._var_key(variable)]
            value = tf.ones(slot.shape, slot.dtype) if factor is None \
                else tf.broadcast_to(tf.cast(factor, slot.dtype), slot.shape)
            slot.assign(value)


class CustomTrainStep(ModelTransform):
    """The transform behind the techniques that shape the train step: wraps the model
    in a ``MicroBatchTrainStep`` running what they shape, with their callbacks."""

    def __init__(self, techniques: Sequence[Technique]):
        self.techniques = tuple(techniques)

    def wrap(self, model: keras.Model) -> keras.Model:
        return MicroBatchTrainStep(model, StepSpec.of(self.techniques))

    def callbacks(self, wrapped: keras.Model) -> list[keras.callbacks.Callback]:
        return [c for technique in self.techniques for c in technique.callbacks(wrapped)]

    def strip(self, wrapped: keras.Model) -> keras.Model:
        return wrapped.inner


def step_transforms(techniques: Sequence[Technique], config: Any) -> list[ModelTransform]:
    """The model transform that trains with ``techniques`` (the active ones, all
    validated against TrainConfig ``config``): the train step of the one that replaces
    it, or one ``MicroBatchTrainStep`` doing what the others shape; none without any."""
    replacing = [t for t in techniques if t.replaces_step]
    if replacing:
        return [replacing[0].wrapper(config)]
    return [CustomTrainStep(techniques)] if techniques else []


@dataclass
class Accumulation(Technique):
    """Gradient accumulation: each optimizer step sums the gradients of k micro-batches
    of the per-replica batch, one after another (the update of one k times larger
    batch, with the activations of one micro-batch)."""

    micro_batches: int = 1  # k: gradient accumulation over k micro-batches per step

    kept_for_students = True

    def validate(self, config: Any) -> None:
        check(self.micro_batches >= 1, "TrainConfig.micro_batches",
              f"must be >= 1, got {self.micro_batches}")

    def check_batch(self, per_replica_batch_size: int) -> None:
        check(per_replica_batch_size % self.micro_batches == 0, "TrainConfig.micro_batches",
              f"{self.micro_batches} must divide the per-replica batch of "
              f"{per_replica_batch_size}")

    def shape(self, step: StepSpec) -> None:
        step.micro_batches = self.micro_batches
