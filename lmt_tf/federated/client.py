"""A client's local training: one compiled model that every client of every round
reuses. Weights are assigned, never rebuilt, and the local loop is one ``tf.function``
traced once (its inputs have unknown example counts), so a round costs its steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import configured_call
from lmt_tf.data.pipeline import label_array, to_model_input
from lmt_tf.data.splits import Split
from lmt_tf.federated.aggregation import ClientResult
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.sampling import local_batches
from lmt_tf.federated.server_optimizers import Weights
from lmt_tf.optim.technique import LossTerm, StepSpec, Technique, active
from lmt_tf.optim.train_step import MicroBatchTrainStep


class ProximalTerm(LossTerm):
    """FedProx's proximal term mu/2 * ||w - w_global||^2 (Li et al., 2020), added to the
    loss of the trained model; ``anchor`` holds w_global (set by the client each round)."""

    def __init__(self, mu: float):
        self.mu = mu
        self.anchor: list[tf.Variable] = []
        self._variables: list[tf.Variable] = []

    def bind(self, inner: keras.Model) -> None:
        self._variables = list(inner.trainable_variables)
        self.anchor = [tf.Variable(v, trainable=False, name=f"anchor_{i}")
                       for i, v in enumerate(self._variables)]

    def __call__(self, loss: tf.Tensor, x: Any, y: Any, y_pred: tf.Tensor) -> tf.Tensor:
        distance = tf.add_n([tf.reduce_sum(tf.square(v - a))
                             for v, a in zip(self._variables, self.anchor, strict=True)])
        return loss + 0.5 * self.mu * distance


@dataclass
class Proximal(Technique):
    """FedProx's local step: each client's loss adds the proximal term
    (``FederatedConfig.prox_mu``; 0 is FedAvg's plain step)."""

    prox_mu: float = 0.0

    setting = "FederatedConfig"

    def __post_init__(self) -> None:
        self.term = ProximalTerm(self.prox_mu)

    def shape(self, step: StepSpec) -> None:
        step.loss_terms.append(self.term)


class ClientModel:
    """Local training of any client on one compiled model.

    Args:
      model_fn: builds the experiment's model (``input_shape``, ``num_classes``).
      input_shape, num_classes, feature_dtype: of the data (as stored: uint8 images
        are scaled to [0, 1] in the loop, as the input pipeline does).
      config: the federated settings (learning rate, mu, E, B).
      loss, metrics: the experiment's (TrainConfig's) loss and metrics.
    """

    def __init__(self, model_fn: Callable[..., keras.Model], input_shape: Sequence[int],
                 num_classes: int, config: FederatedConfig,
                 loss: str = "sparse_categorical_crossentropy",
                 metrics: Sequence[str] = ("accuracy",), feature_dtype: Any = np.float32):
        self.config = config
        inner = configured_call(model_fn, "run_experiment.model", input_shape=tuple(input_shape),
                                num_classes=num_classes)
        proximal = Proximal(config.prox_mu)
        self.step = MicroBatchTrainStep(inner, StepSpec.of(active([proximal])))
        self._anchor = proximal.term.anchor  # empty when mu is 0
        # Plain SGD, as in McMahan et al.: stateless, so no state leaks between clients.
        optimizer = keras.optimizers.SGD(config.client_learning_rate, jit_compile=False)
        self.step.compile(optimizer=optimizer, loss=loss, metrics=list(metrics))
        # The optimizer's and metrics' variables exist before the loop is traced (else
        # tf.function traces a second time, after the first one created them).
        optimizer.build(inner.trainable_variables)
        example = tf.zeros([1, *input_shape], tf.as_dtype(feature_dtype))
        prediction = inner(to_model_input(example))
        self.step.compiled_metrics.build(prediction, tf.zeros([1], tf.int64))
        self.step.compiled_loss.build(prediction)
        # Keras' mean of the compiled loss (the model's loss without FedProx's term): reset
        # before each local step, it holds that step's loss afterwards.
        self._step_loss = self.step.compiled_loss.metrics[0]
        self.model = inner
        self.weights = inner.weights
        self.traces = 0  # how many times the local loop was traced (1 in a healthy run)
        shapes = [tf.TensorSpec(w.shape, w.dtype) for w in self.weights]
        self._train = tf.function(self._local_training, input_signature=[
            tf.TensorSpec([None, *input_shape], tf.as_dtype(feature_dtype)),
            tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([None, 2], tf.int32), shapes])
        self.feature_dtype = np.dtype(feature_dtype)

    def get_weights(self) -> Weights:
        return [w.numpy() for w in self.weights]

    def set_weights(self, weights: Weights) -> None:
        for variable, value in zip(self.weights, weights, strict=True):
            variable.assign(value)

    def fit(self, weights: Weights, split: Split, seed: int, round_: int,
            client: int) -> ClientResult:
        """Trains a copy of ``weights`` on ``split`` (this client's examples) for the
        round, as ``local_batches`` orders them; returns the new weights and the mean of
        its steps' losses (each a batch's mean; without FedProx's term), whatever this
        model trained before: the same in a simulation and in a Flower client."""
        order, bounds = local_batches(self.config, len(split), seed, round_, client)
        x = np.asarray(split.x, self.feature_dtype)
        new, loss = self._train(x, label_array(split.y).astype(np.int64), order, bounds,
                                [tf.convert_to_tensor(w) for w in weights])
        return ClientResult(client, [w.numpy() for w in new], len(split), float(loss))

    def _local_training(self, x, y, order, bounds, weights):
        self.traces += 1  # Python runs only while tracing
        for variable, value in zip(self.weights, weights, strict=True):
            variable.assign(value)
        if self._anchor:  # FedProx's w_global (none when mu is 0)
            for anchor, variable in zip(self._anchor, self.model.trainable_variables,
                                        strict=True):
                anchor.assign(variable)
        for variable in self.step.optimizer.variables:  # iterations: a fresh local run
            variable.assign(tf.zeros_like(variable))
        for metric in self.step.metrics:
            metric.reset_state()
        steps = tf.shape(bounds)[0]
        total = tf.constant(0.0)  # of this client's per-step losses in this round
        for b in tf.range(steps):
            ids = order[bounds[b, 0]:bounds[b, 1]]
            features = to_model_input(tf.gather(x, ids))
            self._step_loss.reset_state()
            self.step.train_step((features, tf.gather(y, ids)))
            total += self._step_loss.result()
        loss = total / tf.cast(tf.maximum(steps, 1), tf.float32)  # the mean over its steps
        return [tf.identity(v) for v in self.weights], loss

    def evaluate(self, weights: Weights, split: Split, batch_size: int = 1000
                 ) -> dict[str, float]:
        """The metrics of ``weights`` on ``split`` (the compiled loss and metrics)."""
        from lmt_tf.data.pipeline import eval_steps

        self.set_weights(weights)
        return self.step.evaluate(split.eval_dataset(batch_size),
                                  steps=eval_steps(split, batch_size), verbose=0,
                                  return_dict=True)
