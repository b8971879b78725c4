"""TrainConfig: the basic settings plus every registered technique's, found by the trainer
and by fine-tuning without either naming a technique."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.sparse import SparseAdagrad
from lmt_tf.optim.technique import LossTerm, StepSpec, Technique
from lmt_tf.optim.transforms import ClipByGlobalNorm
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.training.train_config import TECHNIQUES, TrainConfig, TrainSettings, with_techniques
from lmt_tf.training.trainer import Trainer

# A value that asks for each registered technique (the test fails for a new technique
# until it is listed here).
ASKING = {"micro_batches": 2, "gradient_transforms": (ClipByGlobalNorm(1.0),),
          "update_multipliers": {"dense_0": 0.5}, "unfreeze_epochs": {"dense_0": 1},
          "layer_decay": 0.8, "decoupled_blocks": ("dense_0",), "local_steps": 4, "sync_steps": 2,
          "embedding_optimizer": SparseAdagrad}


def test_train_config_is_the_basic_settings_and_every_technique_s() -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    basic = [f.name for f in dataclasses.fields(TrainSettings)]
    owned = [f.name for t in TECHNIQUES for f in dataclasses.fields(t)]
    assert names == basic + owned and len(set(names)) == len(names)
    assert sorted(owned) == sorted(ASKING)
    for technique in TECHNIQUES:  # each off by default, and on when its setting asks
        assert TrainConfig().techniques() == []
        field = dataclasses.fields(technique)[0].name
        (made,) = [t for t in TrainConfig(**{field: ASKING[field]}).techniques(every=True)
                   if isinstance(t, technique)]
        assert made.active(), technique


def test_fine_tuning_turns_every_technique_off_but_those_it_keeps() -> None:
    config = TrainConfig(**{k: v for k, v in ASKING.items()
                            if k not in ("decoupled_blocks", "embedding_optimizer")})
    assert len(config.techniques()) == 4
    plain = config.without_techniques(epochs=3)
    assert plain.techniques() == [] and plain.epochs == 3
    kept = config.without_techniques(lambda t: t.kept_for_students)
    assert [type(t).__name__ for t in kept.techniques()] == ["Accumulation",
                                                            "GradientTransforms"]


def test_a_technique_that_replaces_the_step_combines_with_no_other() -> None:
    with pytest.raises(ConfigError, match="TrainConfig.decoupled_blocks cannot be combined "
                                          "with micro_batches, .* or embedding_optimizer"):
        TrainConfig(decoupled_blocks=("dense_0",), local_steps=2)


class _Penalty(LossTerm):
    def __init__(self, weight: float):
        self.weight = weight

    def bind(self, inner: keras.Model) -> None:
        self.kernels = [v for v in inner.trainable_variables if "kernel" in v.name]

    def __call__(self, loss, x, y, y_pred):
        return loss + self.weight * tf.add_n([tf.reduce_sum(tf.square(k))
                                              for k in self.kernels])


@dataclass
class WeightPenalty(Technique):
    """A technique written here, in one place: an L2 penalty on every kernel."""

    weight_penalty: float = 0.0

    def shape(self, step: StepSpec) -> None:
        step.loss_terms.append(_Penalty(self.weight_penalty))


def _kernel_norm(config: TrainConfig) -> float:
    set_seed(0)
    trainer = Trainer(config, default_strategy())
    model = trainer.build_model(lambda **k: build_mlp(hidden_units=(16,), **k), load_digits())
    trainer.fit(model, load_digits(), seed=0)
    return float(sum(np.sum(np.square(w)) for w in model.get_weights() if w.ndim == 2))


def test_a_new_technique_is_added_in_one_place() -> None:
    Config = with_techniques(TrainSettings, [*TECHNIQUES, WeightPenalty])  # noqa: N806
    settings = dict(epochs=2, global_batch_size=64, verbose=0,
                    optimizer=lambda: keras.optimizers.Adam(0.01))
    penalised = _kernel_norm(Config(weight_penalty=0.01, **settings))
    plain = _kernel_norm(Config(**settings))
    assert penalised < 0.8 * plain  # the trainer trained with it, never naming it
    assert Config(weight_penalty=0.01).without_techniques().techniques() == []
