"""The model-transform chain: wraps in order, strips in reverse, collects callbacks."""

from __future__ import annotations

import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim import model_transforms
from lmt_tf.optim.model_transforms import ModelTransform, inference_model
from lmt_tf.optim.train_step import CustomTrainStep, MicroBatchTrainStep, step_transforms
from lmt_tf.runtime.strategy import default_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer


class _Tag(ModelTransform):
    """Wraps a model in a one-layer Sequential that records the order of wrapping."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def wrap(self, model: keras.Model) -> keras.Model:
        self.log.append(f"wrap {self.name}")
        wrapped = keras.Sequential([model], name=f"{model.name}_{self.name}")
        return wrapped

    def callbacks(self, wrapped: keras.Model) -> list[keras.callbacks.Callback]:
        return [keras.callbacks.Callback()]

    def strip(self, wrapped: keras.Model) -> keras.Model:
        self.log.append(f"strip {self.name}")
        return wrapped.layers[0]


def test_a_chain_wraps_in_order_and_strips_in_reverse() -> None:
    log: list[str] = []
    model = build_mlp((8, 8), 10)
    wrapped = model_transforms.apply(model, [_Tag("a", log), _Tag("b", log)])
    assert wrapped.name == "mlp_a_b"
    assert len(model_transforms.transform_callbacks(wrapped)) == 2
    assert inference_model(wrapped) is model
    assert log == ["wrap a", "wrap b", "strip b", "strip a"]


def test_a_model_without_transforms_is_its_own_inference_model() -> None:
    model = build_mlp((8, 8), 10)
    assert inference_model(model) is model
    assert model_transforms.transform_callbacks(model) == []
    assert model_transforms.apply(model, []) is model


def test_the_trainer_builds_its_wrappers_through_transforms() -> None:
    config = TrainConfig(micro_batches=2, unfreeze_epochs={"dense_0": 1})
    (transform,) = step_transforms(config.techniques(), config)
    assert isinstance(transform, CustomTrainStep)
    built = Trainer(config, default_strategy()).build_model(build_mlp, load_digits())
    assert isinstance(built, MicroBatchTrainStep) and inference_model(built).name == "mlp"
    assert len(model_transforms.transform_callbacks(built)) == 1  # the unfreezing schedule
    assert step_transforms(TrainConfig().techniques(), TrainConfig()) == []
