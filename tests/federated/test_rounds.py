"""A server round (``Federation.close_round``): aggregation, then the server optimizer.
FedAvg takes the example-weighted mean, FedAvgM without momentum at rate one is FedAvg,
and DP without noise averages clipped updates over the expected number of clients."""

from __future__ import annotations

import numpy as np
import pytest

from lmt_tf.federated.aggregation import ClientResult, clip_update
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import Partition
from lmt_tf.federated.rounds import Federation
from lmt_tf.federated.server_optimizers import ServerMomentum
from lmt_tf.training.callbacks import TrainingDiverged

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
    momentum, _ = _server_round(FederatedConfig(server_optimizer=ServerMomentum(1.0, 0.0)),
                                results)
    for a, b in zip(plain, momentum, strict=True):
        np.testing.assert_array_equal(a, b)


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


@pytest.mark.parametrize("broken", ["loss", "weights"])
def test_a_round_that_diverged_is_refused_before_it_counts(broken: str) -> None:
    """Shared by the simulation and a Flower server: a non-finite loss or global weight
    stops the run at that round, before any state or record of it exists."""
    results = _results()
    if broken == "loss":
        results[1].loss = float("nan")
    else:
        results[2].weights[0][0, 0] = np.inf
    with pytest.raises(TrainingDiverged, match="federate round 1|round 1 of federate"):
        _server_round(FederatedConfig(), results)
