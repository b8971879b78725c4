"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student learns from the
labels and from a teacher's softened outputs,

    alpha * CE(y, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)),

on logits. The T^2 factor keeps the soft term's gradients on the scale of the hard
term's as T grows (the paper, section 2). lmt's models end in a Dense softmax layer;
their logits are read before the softmax (``logit_function``), since the small
probabilities that carry the teacher's knowledge do not survive float32 and clipping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf
import tf_keras as keras

from lmt_tf.optim.train_step import MicroBatchTrainStep
from lmt_tf.optim.transforms import Transform
from lmt_tf.training.model_transforms import ModelTransform

Logits = Callable[..., tf.Tensor]


def logit_function(model: keras.Model) -> Logits:
    """``f(x, training)``: the logits of a classifier that ends in a Dense softmax layer
    (its kernel and bias applied to what feeds it), or else the log of its clipped
    probabilities."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax:
        body = keras.Model(model.inputs, last.input)

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


class Distiller(MicroBatchTrainStep):
    """Trains ``inner`` (the student) on its compiled loss weighted by ``alpha`` plus the
    soft term against ``teacher``, with micro-batching and gradient transforms as
    ``MicroBatchTrainStep`` does them. The teacher is frozen."""

    def __init__(self, student: keras.Model, teacher: keras.Model, alpha: float,
                 temperature: float, micro_batches: int = 1,
                 transforms: Sequence[Transform] = (), **kwargs):
        super().__init__(student, micro_batches, transforms, **kwargs)
        self.teacher = teacher
        self.teacher.trainable = False
        self.alpha, self.temperature = alpha, temperature
        self._student_logits = logit_function(student)
        self._teacher_logits = logit_function(teacher)
        self._forwarded: tuple[tf.Tensor, tf.Tensor] | None = None  # (probabilities, logits)

    def _forward(self, x):
        # The student's logits of this training step's forward pass, for the soft term:
        # compute_loss runs right after, in the same traced step.
        logits = self._student_logits(x, training=True)
        probabilities = tf.nn.softmax(logits)
        self._forwarded = (probabilities, logits)
        return probabilities

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        # The compiled loss averages over the global batch (each replica's share); the
        # soft term is averaged the same way so that the replicas' gradients sum right.
        hard = super().compute_loss(x, y, y_pred, sample_weight)
        if self._forwarded is None or y_pred is not self._forwarded[0]:
            return hard  # evaluating: the loss on the labels, comparable across runs
        soft = soft_term(self._teacher_logits(x, training=False), self._forwarded[1],
                         self.temperature)
        return self.alpha * hard + (1 - self.alpha) * tf.nn.compute_average_loss(soft)


class Distillation(ModelTransform):
    """The transform behind the ``distill`` stage: wraps the student in a ``Distiller``."""

    def __init__(self, teacher: keras.Model, alpha: float, temperature: float,
                 micro_batches: int = 1, transforms: Sequence[Transform] = ()):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.micro_batches, self.transforms = micro_batches, tuple(transforms)

    def wrap(self, model: keras.Model) -> keras.Model:
        return Distiller(model, self.teacher, self.alpha, self.temperature,
                         self.micro_batches, self.transforms)

    def strip(self, wrapped: keras.Model) -> keras.Model:
        return wrapped.inner
