"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student learns from the
labels and from a teacher's softened outputs,

    alpha * CE(y, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)),

on logits. The T^2 factor keeps the soft term's gradients on the scale of the hard
term's as T grows (the paper, section 2). lmt's models end in a Dense softmax layer;
their logits are read before the softmax (``logit_function``), since the small
probabilities that carry the teacher's knowledge do not survive float32 and clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.optim.technique import LossTerm, StepSpec, Technique

Logits = Callable[..., tf.Tensor]


def logit_function(model: keras.Model) -> Logits:
    """``f(x, training)``: the logits of a classifier that ends in a Dense softmax layer
    (its kernel and bias applied to what feeds it), or else the log of its clipped
    probabilities."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax:
        # What feeds it in this model's graph: a layer shared with the models it was
        # cloned from (a pruned model, stripped) has a node in each.
        (features,) = [last.get_input_at(i) for i in range(len(last.inbound_nodes))
                       if last.get_output_at(i) is model.outputs[0]]
        body = keras.Model(model.inputs, features)

        def logits(x: tf.Tensor, training: bool = False) -> tf.Tensor:
            z = tf.matmul(tf.cast(body(x, training=training), last.kernel.dtype), last.kernel)
            return z + last.bias if last.use_bias else z

        return logits

    def from_probabilities(x: tf.Tensor, training: bool = False) -> tf.Tensor:
        probabilities = tf.cast(model(x, training=training), tf.float32)
        return tf.math.log(tf.maximum(probabilities, 1e-30))

    return from_probabilities


def soft_term(teacher_logits: tf.Tensor, student_logits: tf.Tensor,
              temperature: float) -> tf.Tensor:
    """Per example: T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    log_t = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature)
    log_s = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
    return temperature ** 2 * tf.reduce_sum(tf.exp(log_t) * (log_t - log_s), axis=-1)


def distillation_loss(y: tf.Tensor, student_logits: tf.Tensor, teacher_logits: tf.Tensor,
                      alpha: float, temperature: float) -> tf.Tensor:
    """The mean over the batch of alpha * CE(y, student) + (1 - alpha) * soft term."""
    hard = keras.losses.sparse_categorical_crossentropy(y, student_logits, from_logits=True)
    soft = soft_term(teacher_logits, student_logits, temperature)
    return tf.reduce_mean(alpha * hard + (1 - alpha) * soft)


class SoftTargets(LossTerm):
    """The student's loss: alpha times its compiled loss (on the labels) plus 1 - alpha
    times the soft term against a frozen ``teacher``. It replaces the student's forward
    pass, to keep the logits the soft term needs."""

    replaces_forward = True

    def __init__(self, teacher: keras.Model, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.teacher.trainable = False
        self._teacher_logits = logit_function(teacher)
        self._student_logits: Logits | None = None
        self._forwarded: tuple[tf.Tensor, tf.Tensor] | None = None  # (probabilities, logits)

    def bind(self, inner: keras.Model) -> None:
        self._student_logits = logit_function(inner)

    def forward(self, x: Any) -> tf.Tensor:
        # The student's logits of this training step's forward pass, for the soft term:
        # the loss is computed right after, in the same traced step.
        logits = self._student_logits(x, training=True)
        probabilities = tf.nn.softmax(logits)
        self._forwarded = (probabilities, logits)
        return probabilities

    def __call__(self, loss: tf.Tensor, x: Any, y: Any, y_pred: tf.Tensor) -> tf.Tensor:
        if self._forwarded is None or y_pred is not self._forwarded[0]:
            return loss
        soft = soft_term(self._teacher_logits(x, training=False), self._forwarded[1],
                         self.temperature)
        return self.alpha * loss + (1 - self.alpha) * tf.nn.compute_average_loss(soft)


@dataclass
class Distillation(Technique):
    """The technique behind the ``distill`` stage: the student trains on ``SoftTargets``
    against ``teacher`` (with the experiment's accumulation and clipping, if any)."""

    teacher: keras.Model | None = None
    alpha: float = 0.1
    temperature: float = 4.0

    setting = "distill"

    def active(self) -> bool:
        return self.teacher is not None

    def shape(self, step: StepSpec) -> None:
        step.loss_terms.append(SoftTargets(self.teacher, self.alpha, self.temperature))
