"""Learning-rate schedules sized to the run: ``WarmupCosineDecay`` warms up and decays
over the run's optimizer steps (epochs x steps per epoch, which only the trainer knows),
peaking at the optimizer's own learning rate; ``ScaledSchedule`` is any schedule times a
factor that a divergence rollback lowers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, Range, check, check_types
from lmt_tf.errors import ConfigError

SETTING = "TrainConfig.learning_rate_schedule"


@dataclass
class WarmupCosineDecay:
    """A linear warmup from ``initial_fraction`` of the peak to the peak, then a cosine
    decay (Loshchilov and Hutter, 2017) to ``final_fraction`` of it at the run's last
    step. The peak is the optimizer's learning rate as configured
    (``keras.optimizers.AdamW.learning_rate``); the warmup is a fraction of the run's
    optimizer steps or a number of them. Built on Keras' ``CosineDecay``."""

    warmup_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0  # of the run's steps
    warmup_steps: Annotated[int, Range(ge=0)] = 0  # optimizer steps, instead of a fraction
    initial_fraction: Annotated[float, Range(ge=0, le=1)] = 0.0  # of the peak, at step 0
    final_fraction: Annotated[float, Range(ge=0, le=1)] = 0.0  # of the peak, at the end

    def __post_init__(self) -> None:
        check_types(self)
        check(not (self.warmup_fraction and self.warmup_steps),
              "WarmupCosineDecay.warmup_fraction",
              f"and warmup_steps are two ways to say one thing; set one, got "
              f"{self.warmup_fraction:g} and {self.warmup_steps}")

    def warmup(self, total_steps: int) -> int:
        """The warmup's optimizer steps in a run of ``total_steps``."""
        return self.warmup_steps or round(self.warmup_fraction * total_steps)

    def build(self, peak: float, total_steps: int) -> keras.optimizers.schedules.CosineDecay:
        """The schedule of a run of ``total_steps`` optimizer steps peaking at ``peak``.

        Raises:
          ConfigError: if the warmup leaves no step to decay over.
        """
        warmup = self.warmup(total_steps)
        if warmup >= total_steps:
            raise ConfigError(f"{SETTING}: a warmup of {warmup} optimizer steps leaves none "
                              f"to decay over; the run has {total_steps} (TrainConfig.epochs "
                              f"x steps per epoch)")
        if not warmup:  # Keras warms up to warmup_target only if it is set
            return keras.optimizers.schedules.CosineDecay(
                peak, total_steps, alpha=self.final_fraction, name="WarmupCosineDecay")
        return keras.optimizers.schedules.CosineDecay(
            self.initial_fraction * peak, total_steps - warmup, alpha=self.final_fraction,
            warmup_target=peak, warmup_steps=warmup, name="WarmupCosineDecay")


class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule, tf.Module):
    """``schedule`` times ``scale``, a variable: the schedule a divergence rollback
    lowers. As a ``tf.Module`` the optimizer tracks it, so checkpoints hold the scale (a
    resumed run keeps a lowered schedule, as it keeps a lowered constant rate)."""

    def __init__(self, schedule: keras.optimizers.schedules.LearningRateSchedule):
        tf.Module.__init__(self, name="scaled_schedule")
        self.schedule = schedule
        self.scale = tf.Variable(1.0, trainable=False, name="learning_rate_scale")

    def __call__(self, step: Any) -> tf.Tensor:
        rate = tf.convert_to_tensor(self.schedule(step))
        return rate * tf.cast(self.scale, rate.dtype)

    def get_config(self) -> dict[str, Any]:
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "scale": float(self.scale.numpy())}
