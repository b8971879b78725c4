"""Gradient transforms: each one's defining invariant, and clipping after aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.sources import load_digits
from lmt_tf.errors import ConfigError
from lmt_tf.models.mlp import build_mlp
from lmt_tf.optim.model_transforms import inference_model
from lmt_tf.optim.transforms import (
    AdaptiveGradientClipping,
    ClipByGlobalNorm,
    ClipByNorm,
    ClipByValue,
    apply_transforms,
    unitwise_norm,
)
from lmt_tf.runtime.env import set_seed
from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy
from lmt_tf.training.train_config import TrainConfig
from lmt_tf.training.trainer import Trainer

GRADS = [tf.constant([[3.0, -4.0], [0.5, 0.0]]), tf.constant([12.0, -0.1])]
VARS = [tf.Variable(tf.ones((2, 2))), tf.Variable(tf.ones(2))]


def test_global_norm_clip_reaches_the_limit_and_keeps_direction() -> None:
    clipped = ClipByGlobalNorm(2.0)(GRADS, VARS)
    assert float(tf.linalg.global_norm(clipped)) == pytest.approx(2.0, rel=1e-6)
    ratio = float(tf.linalg.global_norm(GRADS)) / 2.0
    for before, after in zip(GRADS, clipped, strict=True):
        np.testing.assert_allclose(after.numpy() * ratio, before.numpy(), rtol=1e-5)


def test_gradients_under_the_limit_are_unchanged() -> None:
    for transform in (ClipByGlobalNorm(100.0), ClipByNorm(100.0), ClipByValue(100.0)):
        for before, after in zip(GRADS, transform(GRADS, VARS), strict=True):
            np.testing.assert_array_equal(after.numpy(), before.numpy())


def test_per_tensor_norm_and_value_clipping() -> None:
    by_norm = ClipByNorm(1.0)(GRADS, VARS)
    assert [float(tf.norm(g)) for g in by_norm] == pytest.approx([1.0, 1.0], rel=1e-6)
    by_value = ClipByValue(0.5)(GRADS, VARS)
    assert by_value[0].numpy().tolist() == [[0.5, -0.5], [0.5, 0.0]]


def test_agc_matches_a_hand_computation() -> None:
    """Brock et al. (2021): per output unit, clip ||G|| to lambda * max(||W||, eps)."""
    w = np.array([[1.0, 0.0], [2.0, 0.0]], np.float32)  # unit norms: sqrt(5), 0 -> eps
    g = np.array([[0.3, 0.01], [0.4, 0.0]], np.float32)  # unit norms: 0.5, 0.01
    agc = AdaptiveGradientClipping(clip=0.1, eps=1e-3, exclude_final_layer=False)
    (out,) = agc([tf.constant(g)], [tf.Variable(w)])
    expected = g.copy()
    # unit 0: 0.5 > 0.1*sqrt(5)=0.2236 -> scale to 0.2236; unit 1: 0.01 > 0.1*1e-3 -> 1e-4
    expected[:, 0] *= 0.1 * np.sqrt(5.0) / 0.5
    expected[:, 1] *= 0.1 * 1e-3 / 0.01
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    bias = AdaptiveGradientClipping(clip=0.5, exclude_final_layer=False)
    (b,) = bias([tf.constant([1.0, 0.1])], [tf.Variable([1.0, 1.0])])
    np.testing.assert_allclose(b.numpy(), [0.5, 0.1])  # vectors: element-wise


def test_agc_leaves_the_final_layer_alone() -> None:
    model = build_mlp((4,), 3, hidden_units=(5,))
    agc = AdaptiveGradientClipping(clip=1e-6)
    agc.bind(model)
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    out = agc(grads, model.trainable_variables)
    final = {v.name for v in model.get_layer("predictions").trainable_weights}
    for v, before, after in zip(model.trainable_variables, grads, out, strict=True):
        changed = not np.array_equal(before.numpy(), after.numpy())
        assert changed == (v.name not in final), v.name


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (3136, 16), (37, 3)],
                         ids=["conv kernel", "rows in blocks", "prime rows"])
def test_unitwise_norm_is_one_norm_per_output_unit(shape) -> None:
    kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    axes = tuple(range(len(shape) - 1))
    expected = np.sqrt((kernel.astype(np.float64) ** 2).sum(axis=axes, keepdims=True))
    np.testing.assert_allclose(unitwise_norm(tf.constant(kernel)).numpy(), expected, rtol=1e-5)


def test_unitwise_norm_of_a_vector_is_its_absolute_values() -> None:
    np.testing.assert_array_equal(unitwise_norm(tf.constant([-2.0, 3.0])).numpy(), [2.0, 3.0])


CHAINS = {
    "global norm, then AGC": (ClipByGlobalNorm(5.0), AdaptiveGradientClipping(
        clip=0.05, exclude_final_layer=False)),
    "AGC, then per-tensor norm": (AdaptiveGradientClipping(clip=0.2, exclude_final_layer=False),
                                  ClipByNorm(0.5)),
    "norm, value, global norm": (ClipByNorm(3.0), ClipByValue(0.2), ClipByGlobalNorm(0.3)),
}


@pytest.mark.parametrize("chain", CHAINS.values(), ids=CHAINS.keys())
def test_a_chain_equals_its_transforms_one_after_another(chain) -> None:
    """apply_transforms composes rescalings into one multiply; the result must be that
    of applying each transform to the previous one's output."""
    rng = np.random.default_rng(1)
    shapes = [(4, 3, 2, 6), (6,), (30, 8), (8,)]
    variables = [tf.Variable(rng.normal(size=s).astype(np.float32)) for s in shapes]
    gradients = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]
    expected = gradients
    for transform in chain:
        expected = transform(expected, variables)
    composed, norm = tf.function(lambda g: apply_transforms(chain, g, variables))(gradients)
    assert float(norm) == pytest.approx(float(tf.linalg.global_norm(gradients)), rel=1e-5)
    for a, b in zip(composed, expected, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    assert any(not np.array_equal(a.numpy(), g.numpy())  # the chain did clip
               for a, g in zip(composed, gradients, strict=True))


def test_a_non_finite_gradient_stays_non_finite() -> None:
    """As tf.clip_by_global_norm: an overflowed gradient (mixed float16) must not turn
    into a finite update; the loss-scaling optimizer skips non-finite steps."""
    clipped = ClipByGlobalNorm(1.0)([tf.constant([np.inf, 1.0])], VARS[1:])
    assert not np.isfinite(clipped[0].numpy()).any()


@pytest.mark.parametrize("make, setting", [
    (lambda: ClipByGlobalNorm(0.0), "ClipByGlobalNorm.limit"),
    (lambda: ClipByNorm(-1.0), "ClipByNorm.limit"),
    (lambda: ClipByValue(0), "ClipByValue.limit"),
    (lambda: AdaptiveGradientClipping(clip=0.0), "AdaptiveGradientClipping.clip"),
])
def test_non_positive_limits_name_the_setting(make, setting: str) -> None:
    with pytest.raises(ConfigError, match=f"{setting} must be > 0"):
        make()


def _clipped_step(strategy) -> tuple[list[np.ndarray], float]:
    splits = load_digits()
    config = TrainConfig(epochs=1, steps_per_epoch=1, global_batch_size=64, verbose=0,
                         optimizer=lambda: keras.optimizers.SGD(1.0),
                         gradient_transforms=(ClipByGlobalNorm(0.05),))
    trainer = Trainer(config, strategy)
    set_seed(5)
    model = trainer.build_model(build_mlp, splits)
    history = trainer.fit(model, splits, seed=2).history
    return inference_model(model).get_weights(), history["gradient_norm"][0]


def test_mirrored_clipping_equals_single_device_clipping_of_the_global_batch() -> None:
    """Clipping applies to the aggregated gradient: two replicas clipping their halves
    would differ from one device clipping the whole batch."""
    single, norm = _clipped_step(default_strategy())
    mirrored, mirrored_norm = _clipped_step(mirrored_strategy(2))
    assert norm > 0.05 and mirrored_norm == pytest.approx(norm, rel=1e-5)  # it did clip
    for a, b in zip(single, mirrored, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    set_seed(5)
    initial = build_mlp((8, 8), 10).get_weights()
    step = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(single, initial, strict=True)))
    assert step == pytest.approx(0.05, rel=1e-4)  # SGD(1.0) moved by the clipped norm


def _chain_steps(strategy, fused: bool) -> list[np.ndarray]:
    splits = load_digits()
    config = TrainConfig(epochs=1, steps_per_epoch=3, global_batch_size=64, verbose=0,
                         optimizer=lambda: keras.optimizers.Adam(0.01),
                         gradient_transforms=(ClipByGlobalNorm(0.5),
                                              AdaptiveGradientClipping(0.01)),
                         jit_compile_update=True)
    trainer = Trainer(config, strategy)
    set_seed(5)
    model = trainer.build_model(build_mlp, splits)
    factors = model.update_factors
    assert factors is not None  # compiled update: the factors go into it
    if not fused:
        model.update_factors = None  # multiplied before the update (its factors stay 1)
    trainer.fit(model, splits, seed=2)
    # The chain clipped: the last step's factors were not all 1.
    assert any(np.any(f.numpy() < 1) for f in factors.variables) == fused
    return inference_model(model).get_weights()


@pytest.mark.parametrize("strategy", [default_strategy, lambda: mirrored_strategy(2)],
                         ids=["default", "mirrored"])
def test_factors_multiplied_inside_the_update_give_the_same_steps(strategy) -> None:
    """Global-norm clipping then AGC (a factor per unit), three Adam steps: the factors
    fused into the compiled update move the weights as multiplying the gradients first."""
    fused, separate = _chain_steps(strategy(), True), _chain_steps(strategy(), False)
    set_seed(5)
    initial = build_mlp((8, 8), 10).get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(fused, initial, strict=True))
    for a, b in zip(fused, separate, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("settings", [
    # Its own clipping must see the transformed gradients.
    {"optimizer": lambda: keras.optimizers.Adam(0.01, global_clipnorm=1.0)},
    # Loss scaling skips a step on non-finite gradients, which must include the factors.
    {"precision": "mixed_float16"},
], ids=["optimizer clips by itself", "loss scaling"])
def test_factors_stay_out_of_an_update_that_must_see_them(settings: dict) -> None:
    config = TrainConfig(global_batch_size=64, verbose=0, jit_compile_update=True,
                         gradient_transforms=(AdaptiveGradientClipping(0.01),), **settings)
    model = Trainer(config, default_strategy()).build_model(build_mlp, load_digits())
    assert model.update_factors is None


def test_factors_stay_out_of_local_sgd_whose_replicas_step_alone() -> None:
    config = TrainConfig(global_batch_size=64, verbose=0, jit_compile_update=True,
                         local_steps=2, gradient_transforms=(ClipByGlobalNorm(0.5),))
    model = Trainer(config, mirrored_strategy(2)).build_model(build_mlp, load_digits())
    assert model.update_factors is None


@pytest.mark.parametrize("chain", [(ClipByGlobalNorm(1.0),), (ClipByNorm(0.5),),
                                   (ClipByValue(0.3), ClipByGlobalNorm(2.0))])
def test_a_sparse_gradient_is_clipped_as_its_dense_form_and_stays_sparse(chain) -> None:
    """An embedding table's gradient (rows, one of them twice) beside a dense one: the
    chain gives the rows of what it gives the dense form, and no dense table."""
    rows = tf.IndexedSlices(tf.constant([[1.0, -2.0], [0.5, 0.5], [0.25, 3.0]]),
                            tf.constant([4, 1, 4], tf.int64), tf.constant([6, 2], tf.int64))
    dense = tf.constant([[3.0, -4.0], [0.5, 0.0]])
    variables = [tf.Variable(tf.ones((6, 2))), tf.Variable(tf.ones((2, 2)))]
    (sparse_out, dense_out), norm = apply_transforms(chain, [rows, dense], variables)
    (expected, expected_dense), expected_norm = apply_transforms(
        chain, [tf.convert_to_tensor(rows), dense], variables)
    assert isinstance(sparse_out, tf.IndexedSlices)
    assert sorted(sparse_out.indices.numpy().tolist()) == [1, 4]  # each row once
    np.testing.assert_allclose(tf.convert_to_tensor(sparse_out).numpy(), expected.numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(dense_out.numpy(), expected_dense.numpy(), rtol=1e-6)
    assert float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
