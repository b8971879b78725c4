"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): a student learns from the
labels and from a teacher's softened outputs,

    alpha * CE(y, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T
grows (the paper, section 2). lmt's models end in a softmax, so logits are recovered as
log-probabilities (softmax is unchanged by the constant that separates the two)."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf
import tf_keras as keras

from lmt_tf.optim.train_step import MicroBatchTrainStep
from lmt_tf.optim.transforms import Transform
from lmt_tf.training.model_transforms import ModelTransform

_EPSILON = 1e-7


def soft_term(teacher_probs: tf.Tensor, student_probs: tf.Tensor,
              temperature: float) -> tf.Tensor:
    """Per example: T^2 * KL(softmax(log teacher / T) || softmax(log student / T))."""
    t = tf.nn.softmax(tf.math.log(tf.maximum(teacher_probs, _EPSILON)) / temperature)
    log_s = tf.nn.log_softmax(tf.math.log(tf.maximum(student_probs, _EPSILON)) / temperature)
    kl = tf.reduce_sum(t * (tf.math.log(tf.maximum(t, _EPSILON)) - log_s), axis=-1)
    return temperature ** 2 * kl


def distillation_loss(y: tf.Tensor, student_probs: tf.Tensor, teacher_probs: tf.Tensor,
                      alpha: float, temperature: float) -> tf.Tensor:
    """The mean over the batch of alpha * CE(y, student) + (1 - alpha) * soft term."""
    hard = keras.losses.sparse_categorical_crossentropy(y, student_probs)
    soft = soft_term(teacher_probs, student_probs, temperature)
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

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        # The compiled loss averages over the global batch (each replica's share); the
        # soft term is averaged the same way so that the replicas' gradients sum right.
        hard = super().compute_loss(x, y, y_pred, sample_weight)
        soft = soft_term(self.teacher(x, training=False), y_pred, self.temperature)
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
