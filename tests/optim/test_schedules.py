"""Warmup and cosine decay sized to the run: steps from epochs x steps per epoch, the
peak from the optimizer's rate, the rate logged per epoch; a rollback scales a schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.schedules import WarmupCosineDecay
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


def cosine(step: int, warmup: int, total: int, peak: float, final: float = 0.0) -> float:
    """The rate at ``step`` by hand: linear from 0 to ``peak`` over ``warmup`` steps,
    then half a cosine to ``final * peak`` at ``total``."""
    if step < warmup:
        return peak * step / warmup
    done = (step - warmup) / (total - warmup)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * done)))


def test_the_schedule_warms_up_then_follows_half_a_cosine() -> None:
    schedule = WarmupCosineDecay(warmup_fraction=0.25, final_fraction=0.1).build(0.2, 12)
    rates = [float(schedule(step)) for step in range(13)]
    expected = [cosine(step, 3, 12, 0.2, 0.1) for step in range(13)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-9)
    assert rates[:4] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])  # warmup, then the peak
    assert rates[12] == pytest.approx(0.02)  # final_fraction of the peak at the run's end
    no_warmup = WarmupCosineDecay(initial_fraction=0.5).build(1.0, 4)
    assert [float(no_warmup(s)) for s in (0, 2, 4)] == pytest.approx([1.0, 0.5, 0.0])
    steps = WarmupCosineDecay(warmup_steps=2, initial_fraction=0.5).build(1.0, 10)
    assert [float(steps(s)) for s in (0, 1, 2)] == pytest.approx([0.5, 0.75, 1.0])


def _trainer(**config) -> Trainer:
    return Trainer(TrainConfig(global_batch_size=64, verbose=0, **config), default_strategy())


def test_a_run_decays_over_epochs_times_steps_and_logs_the_rate_per_epoch() -> None:
    splits = load_digits(validation_fraction=0.0)  # no validation pass to trace
    trainer = _trainer(epochs=3, steps_per_epoch=4, optimizer=lambda: keras.optimizers.SGD(0.2),
                       learning_rate_schedule=WarmupCosineDecay(warmup_fraction=0.25))
    model = trainer.build_model(build_mlp, splits)
    history = trainer.fit(model, splits, seed=0).history
    # 12 optimizer steps, 3 of warmup; each epoch logs the rate of its last step (3, 7, 11).
    assert history["learning_rate"] == pytest.approx(
        [cosine(step, 3, 12, 0.2) for step in (3, 7, 11)], rel=1e-6)
    assert history["learning_rate"][0] == pytest.approx(0.2)  # the optimizer's rate: the peak
    assert trainer.learning_rate(model) == pytest.approx(cosine(11, 3, 12, 0.2), rel=1e-6)
    plain = _trainer(epochs=1, steps_per_epoch=2)
    assert "learning_rate" not in plain.fit(plain.build_model(build_mlp, splits), splits,
                                            seed=0).history  # no schedule: no new metric


@pytest.mark.parametrize(("config", "message"), [
    ({"learning_rate_schedule": WarmupCosineDecay(warmup_steps=8)},
     "TrainConfig.learning_rate_schedule: a warmup of 8 optimizer steps leaves none to decay "
     "over; the run has 8"),
    ({"learning_rate_schedule": WarmupCosineDecay(),
      "optimizer": lambda: keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1.0, 9))},
     "TrainConfig.learning_rate_schedule peaks at the optimizer's learning rate, but Adam "
     "already has a schedule \\(CosineDecay\\); bind a number as "
     "keras.optimizers.Adam.learning_rate"),
])
def test_a_schedule_that_cannot_be_sized_is_one_line(config, message: str) -> None:
    trainer = _trainer(epochs=2, steps_per_epoch=4, **config)
    with pytest.raises(ConfigError, match=message):
        trainer.build_model(build_mlp, load_digits())


def test_two_warmups_are_refused() -> None:
    with pytest.raises(ConfigError, match="WarmupCosineDecay.warmup_fraction and warmup_steps "
                                          "are two ways to say one thing; set one"):
        WarmupCosineDecay(warmup_fraction=0.1, warmup_steps=5)
    with pytest.raises(ConfigError, match=r"WarmupCosineDecay.warmup_fraction must be in \[0, 1\)"):
        WarmupCosineDecay(warmup_fraction=1.0)


def test_a_rollback_scales_the_schedule_and_checkpoints_keep_the_scale(tmp_path) -> None:
    splits = load_digits(validation_fraction=0.0)

    def build() -> tuple[Trainer, keras.Model]:
        trainer = _trainer(epochs=2, steps_per_epoch=4, divergence_retries=2,
                           divergence_lr_factor=0.25,
                           optimizer=lambda: keras.optimizers.SGD(0.2),
                           learning_rate_schedule=WarmupCosineDecay(warmup_fraction=0.25))
        return trainer, trainer.build_model(build_mlp, splits)

    trainer, model = build()
    rate = trainer.learning_rate(model)
    assert trainer.lower_learning_rate(model, rate, 1) == ("learning-rate schedule scaled by "
                                                           "1 -> 0.25")
    assert trainer.lower_learning_rate(model, rate, 2) == ("learning-rate schedule scaled by "
                                                           "0.25 -> 0.0625")
    trainer.checkpoint_manager(model, tmp_path).save(checkpoint_number=0)
    trainer, restored = build()
    start = trainer.restore(restored, tmp_path, 4)
    history = trainer.fit(restored, splits, seed=0, start=start).history
    # The restored run trains along the lowered schedule: 1/16 of the peak 0.2.
    assert history["learning_rate"] == pytest.approx(
        [cosine(step, 2, 8, 0.2) / 16 for step in (3, 7)], rel=1e-6)
