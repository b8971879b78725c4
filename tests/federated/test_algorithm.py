"""The server's arithmetic: the example-weighted mean, the server optimizers' special
cases, DP clipping, noise and the privacy spent, client sampling, local batches, and
bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.federated.algorithm import (
    ClientResult,
    FedAdam,
    FedAvg,
    FedAvgM,
    FederatedConfig,
    aggregate,
    clip_update,
    global_norm,
    local_batches,
    privacy_spent,
    sample_clients,
)
from lmt_tf.federated.partition import Partition
from lmt_tf.federated.rounds import Federation

RNG = np.random.default_rng(0)
GLOBAL = [RNG.normal(size=(3, 4)).astype(np.float32), RNG.normal(size=4).astype(np.float32)]


def _results(counts=(10, 30, 60)) -> list[ClientResult]:
    return [ClientResult(k, [(w + RNG.normal(size=w.shape)).astype(np.float32)
                             for w in GLOBAL], n, 0.0) for k, n in enumerate(counts)]


def _federation(config: FederatedConfig, clients: int = 10) -> Federation:
    parts = Partition(tuple(np.array([k]) for k in range(clients)))
    return Federation(config, parts, None, seed=0)


def _server_round(config: FederatedConfig, results, clients: int = 10):
    federation = _federation(config, clients)
    state, record = federation.close_round(federation.initial_state(GLOBAL), results, 1,
                                           started=0.0, evaluate=lambda _: {})
    return state.weights, record.facts


def test_fedavg_takes_the_example_weighted_mean_of_client_weights() -> None:
    results = _results()
    weights, _ = _server_round(FederatedConfig(), results)
    for i, w in enumerate(weights):
        by_hand = (10 * results[0].weights[i] + 30 * results[1].weights[i]
                   + 60 * results[2].weights[i]) / 100
        np.testing.assert_allclose(w, by_hand, rtol=1e-6, atol=1e-6)
        assert w.dtype == np.float32


def test_fedavgm_without_momentum_at_rate_one_is_fedavg() -> None:
    results = _results()
    plain, _ = _server_round(FederatedConfig(), results)
    momentum, _ = _server_round(FederatedConfig(server_optimizer=FedAvgM(1.0, 0.0)), results)
    for a, b in zip(plain, momentum, strict=True):
        np.testing.assert_array_equal(a, b)


def test_server_momentum_accumulates_and_fedadam_follows_the_paper() -> None:
    delta = [np.ones((2,)), np.full((1,), -2.0)]
    weights = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    m = FedAvgM(learning_rate=0.5, momentum=0.9)
    state = m.initial_state(weights)
    weights, state = m.apply(weights, delta, state)
    weights, state = m.apply(weights, delta, state)
    # m1 = d, m2 = 0.9 d + d; w = 0.5 (m1 + m2) = 0.5 * 2.9 d
    np.testing.assert_allclose(weights[0], [1.45, 1.45], rtol=1e-6)
    adam = FedAdam(learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    new, _ = adam.apply([np.zeros(2, np.float32)], [np.ones(2)], adam.initial_state(
        [np.zeros(2, np.float32)]))
    m1, v1 = 0.1, 1e-6 * 0.99 + 0.01  # (1 - b1) d and b2 tau^2 + (1 - b2) d^2
    np.testing.assert_allclose(new[0], 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-5)


def test_every_clipped_update_is_within_the_clip() -> None:
    for scale in (0.01, 1.0, 100.0):
        delta = [RNG.normal(size=(5, 5)) * scale, RNG.normal(size=5) * scale]
        clipped = clip_update(delta, 0.5)
        assert global_norm(clipped) <= 0.5 + 1e-9
        if global_norm(delta) <= 0.5:  # short updates are left alone
            assert all(np.array_equal(a, b) for a, b in zip(clipped, delta, strict=True))


def test_dp_without_noise_is_clipped_averaging_over_the_expected_clients() -> None:
    config = FederatedConfig(client_fraction=0.3, dp_clip_norm=0.5, dp_noise_multiplier=0.0)
    results = _results()
    weights, facts = _server_round(config, results, clients=10)
    deltas = [clip_update([c.astype(np.float64) - g for c, g in zip(r.weights, GLOBAL,
                                                                   strict=True)], 0.5)
              for r in results]
    for i, w in enumerate(weights):
        by_hand = GLOBAL[i] + sum(d[i] for d in deltas) / (0.3 * 10)  # fixed denominator
        np.testing.assert_allclose(w, by_hand, rtol=1e-6, atol=1e-6)
    assert facts["clipped_clients"] == 3  # every update of norm ~4 was clipped


def test_dp_noise_has_the_configured_scale_and_is_seeded() -> None:
    config = FederatedConfig(client_fraction=0.5, dp_clip_norm=1.0, dp_noise_multiplier=2.0)
    zeros = [np.zeros((200, 200), np.float32)]
    results = [ClientResult(0, zeros, 1, 0.0)]
    delta, _ = aggregate(config, zeros, results, clients=10, seed=0, round_=1)
    # noise std z * S = 2 on the sum, divided by C * K = 5
    assert np.std(delta[0]) == pytest.approx(2.0 / 5, rel=0.02)
    again, _ = aggregate(config, zeros, results, clients=10, seed=0, round_=1)
    np.testing.assert_array_equal(delta[0], again[0])


def test_epsilon_grows_with_rounds_and_matches_dp_accounting() -> None:
    import dp_accounting

    config = FederatedConfig(client_fraction=0.1, dp_clip_norm=1.0, dp_noise_multiplier=1.1)
    spent = [privacy_spent(config, 1000, rounds) for rounds in (1, 10, 100)]
    assert spent[0] < spent[1] < spent[2]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.1)), 100)
    assert spent[2] == pytest.approx(accountant.get_epsilon(1000 ** -1.1), rel=1e-9)


def test_sampling_is_seeded_per_round() -> None:
    config = FederatedConfig(client_fraction=0.1)
    first = sample_clients(config, 100, seed=0, round_=1)
    assert len(first) == 10 and len(set(first)) == 10
    assert np.array_equal(first, sample_clients(config, 100, seed=0, round_=1))
    assert not np.array_equal(first, sample_clients(config, 100, seed=0, round_=2))
    assert len(sample_clients(FederatedConfig(client_fraction=0.001), 100, 0, 1)) == 1
    poisson = FederatedConfig(client_fraction=0.2, dp_clip_norm=1.0)
    counts = [len(sample_clients(poisson, 100, 0, r)) for r in range(1, 201)]
    assert 18 < np.mean(counts) < 22 and len(set(counts)) > 3  # about C * K, varying


def test_local_batches_cover_each_epoch_once() -> None:
    config = FederatedConfig(local_epochs=3, local_batch_size=4)
    order, bounds = local_batches(config, 10, seed=0, round_=1, client=2)
    assert len(order) == 30 and bounds.tolist()[:4] == [[0, 4], [4, 8], [8, 10], [10, 14]]
    for epoch in range(3):
        assert sorted(order[10 * epoch:10 * epoch + 10]) == list(range(10))
    full = FederatedConfig(local_batch_size=None)
    assert local_batches(full, 10, 0, 1, 2)[1].tolist() == [[0, 10]]


@pytest.mark.parametrize(("settings", "message"), [
    ({"client_fraction": 0.0}, "client_fraction must be in \\(0, 1\\], got 0.0"),
    ({"client_fraction": 1.5}, "client_fraction must be in \\(0, 1\\], got 1.5"),
    ({"local_epochs": 0}, "local_epochs must be >= 1, got 0"),
    ({"local_batch_size": 0}, "local_batch_size must be >= 1 or None"),
    ({"dp_clip_norm": 1.0, "dp_noise_multiplier": -0.5}, "dp_noise_multiplier must be >= 0"),
    ({"dp_noise_multiplier": 1.0}, "dp_noise_multiplier needs dp_clip_norm"),
    ({"server_optimizer": "adam"}, "server_optimizer must be @FedAvg\\(\\)"),
    ({"rounds": 0}, "rounds must be >= 1"),
])
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FederatedConfig(**settings)


def test_bad_server_optimizers_are_refused() -> None:
    with pytest.raises(ConfigError, match="FedAvgM.momentum must be in \\[0, 1\\)"):
        FedAvgM(momentum=1.0)
    with pytest.raises(ConfigError, match="FedAdam.tau must be > 0"):
        FedAdam(tau=0.0)
    with pytest.raises(ConfigError, match="FedAvg.learning_rate must be > 0"):
        FedAvg(learning_rate=0.0)
