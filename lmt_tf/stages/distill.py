"""The ``distill`` stage: train a fresh student (the experiment's model) on the labels and
on a teacher's softened outputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tf_keras as keras

from lmt_tf.checks import Annotated, Range, check_arguments, configured_call
from lmt_tf.compression.distillation import Distillation
from lmt_tf.errors import ConfigError
from lmt_tf.optim.technique import Technique
from lmt_tf.stages.context import RunContext
from lmt_tf.stages.fine_tune import Epochs, FineTune
from lmt_tf.tracking.read import load_model


class Distill(FineTune):
    """Knowledge distillation into a student built by ``run_experiment.model``.

    Args:
      teacher: an earlier run's id or name, an MLflow model URI (``runs:/<id>/model``,
        ``models:/m-...``) or a SavedModel directory; None: the current model of this
        experiment (e.g. what its ``train`` stage trained).
      alpha: weight of the hard (label) term; 1 - alpha weighs the soft term.
      temperature: softens both distributions (Hinton et al. used 1 to 20).
      epochs: training epochs of the student.
      student: builds the student (e.g. ``@build_mlp``); None: ``run_experiment.model``.
    """

    name = "distill"

    untrained_remedy = "set distill.teacher"
    fresh_model = True

    def __init__(self, teacher: str | None = None,
                 alpha: Annotated[float, Range(ge=0, le=1)] = 0.1,
                 temperature: Annotated[float, Range(gt=0)] = 4.0, epochs: Epochs = 2,
                 student: Callable[..., keras.Model] | None = None):
        check_arguments(self.name, type(self), locals())
        super().__init__(epochs)
        self.student = student
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    @property
    def needs_trained_model(self) -> bool:
        """Without a teacher of its own, the teacher is the model the stages before made."""
        return self.teacher is None

    def describe(self) -> str:
        source = self.teacher or "this experiment's model"
        return (f"distill (teacher {source}, alpha {self.alpha}, T {self.temperature}, "
                f"{self.epochs} epoch(s))")

    def model_fn(self, context: RunContext) -> Any:
        # A fresh model, behind the run's preprocessing like the teacher.
        student = context.with_preprocessing(self.student) if self.student \
            else context.setup.model_fn

        def build(**kwargs: Any) -> keras.Model:
            return configured_call(student, "distill.student", **kwargs)

        return build

    def techniques(self, context: RunContext) -> list[Technique]:
        if self.teacher is None:
            teacher = context.model
        else:
            with context.strategy.scope():  # its variables mirrored like the student's
                teacher = load_model(self.teacher, context.setup.configs.tracking.tracking_uri)
        classes = teacher.output_shape[-1]
        if classes != context.splits.num_classes:
            raise ConfigError(f"distill.teacher {self.teacher or 'model'} outputs "
                              f"{teacher.output_shape}, but the student predicts "
                              f"{context.splits.num_classes} classes")
        return [Distillation(teacher, self.alpha, self.temperature)]

    def keeps(self, technique: Technique) -> bool:
        # The student is a fresh model: it trains with what shapes one step of the
        # experiment's training (accumulation, clipping), not what names its layers.
        return technique.kept_for_students
