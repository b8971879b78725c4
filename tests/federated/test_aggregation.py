"""Aggregation's pieces on their own: clipping bounds every update, DP noise has the
configured scale and is seeded, and a copy of the weights on the wire is its raw bytes."""

from __future__ import annotations

import numpy as np
import pytest

from lmt_tf.federated.aggregation import (
    ClientResult,
    aggregate,
    clip_update,
    global_norm,
    wire_bytes,
)
from lmt_tf.federated.config import FederatedConfig

RNG = np.random.default_rng(0)


def test_every_clipped_update_is_within_the_clip() -> None:
    for scale in (0.01, 1.0, 100.0):
        delta = [RNG.normal(size=(5, 5)) * scale, RNG.normal(size=5) * scale]
        clipped = clip_update(delta, 0.5)
        assert global_norm(clipped) <= 0.5 + 1e-9
        if global_norm(delta) <= 0.5:  # short updates are left alone
            assert all(np.array_equal(a, b) for a, b in zip(clipped, delta, strict=True))


def test_global_norm_and_clipping_by_hand() -> None:
    delta = [np.array([3.0]), np.array([[4.0, 0.0]])]  # one vector (3, 4, 0): norm 5
    assert global_norm(delta) == 5.0
    clipped = clip_update(delta, 2.5)  # halved
    np.testing.assert_allclose(clipped[0], [1.5])
    np.testing.assert_allclose(clipped[1], [[2.0, 0.0]])


def test_dp_noise_has_the_configured_scale_and_is_seeded() -> None:
    config = FederatedConfig(client_fraction=0.5, dp_clip_norm=1.0, dp_noise_multiplier=2.0)
    zeros = [np.zeros((200, 200), np.float32)]
    results = [ClientResult(0, zeros, 1, 0.0)]
    delta, _ = aggregate(config, zeros, results, clients=10, seed=0, round_=1)
    # noise std z * S = 2 on the sum, divided by C * K = 5
    assert np.std(delta[0]) == pytest.approx(2.0 / 5, rel=0.02)
    again, _ = aggregate(config, zeros, results, clients=10, seed=0, round_=1)
    np.testing.assert_array_equal(delta[0], again[0])


def test_wire_bytes_are_the_raw_arrays() -> None:
    weights = [np.zeros((3, 4), np.float32), np.zeros(4, np.float32), np.zeros(2, np.float64)]
    assert wire_bytes(weights) == 12 * 4 + 4 * 4 + 2 * 8  # 80
