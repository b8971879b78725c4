"""The server optimizers by hand: averaging steps by lr * delta, momentum accumulates,
FedAdam follows the paper; bad settings are refused naming the setting as gin binds it,
and gin binds each optimizer by its algorithm's name (``@FedAvgM()``)."""

from __future__ import annotations

import numpy as np
import pytest

from lmt_tf import config
from lmt_tf.errors import ConfigError
from lmt_tf.federated.server_optimizers import ServerAdam, ServerAveraging, ServerMomentum


def test_server_averaging_steps_by_the_learning_rate_in_the_weights_dtype() -> None:
    averaging = ServerAveraging(learning_rate=0.5)
    weights = [np.array([1.0, 2.0], np.float32)]
    new, state = averaging.apply(weights, [np.array([0.5, -1.0])],
                                 averaging.initial_state(weights))
    np.testing.assert_array_equal(new[0], [1.25, 1.5])  # w + 0.5 * delta
    assert new[0].dtype == np.float32 and state == []


def test_server_momentum_accumulates() -> None:
    delta = [np.ones((2,)), np.full((1,), -2.0)]
    weights = [np.zeros(2, np.float32), np.zeros(1, np.float32)]
    m = ServerMomentum(learning_rate=0.5, momentum=0.9)
    state = m.initial_state(weights)
    weights, state = m.apply(weights, delta, state)
    weights, state = m.apply(weights, delta, state)
    # m1 = d, m2 = 0.9 d + d; w = 0.5 (m1 + m2) = 0.5 * 2.9 d
    np.testing.assert_allclose(weights[0], [1.45, 1.45], rtol=1e-6)


def test_server_adam_follows_the_paper() -> None:
    adam = ServerAdam(learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    new, _ = adam.apply([np.zeros(2, np.float32)], [np.ones(2)], adam.initial_state(
        [np.zeros(2, np.float32)]))
    m1, v1 = 0.1, 1e-6 * 0.99 + 0.01  # (1 - b1) d and b2 tau^2 + (1 - b2) d^2
    np.testing.assert_allclose(new[0], 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-5)


def test_bad_server_optimizers_are_refused() -> None:
    with pytest.raises(ConfigError, match="FedAvgM.momentum must be in \\[0, 1\\)"):
        ServerMomentum(momentum=1.0)
    with pytest.raises(ConfigError, match="FedAdam.tau must be > 0"):
        ServerAdam(tau=0.0)
    with pytest.raises(ConfigError, match="FedAvg.learning_rate must be > 0"):
        ServerAveraging(learning_rate=0.0)
    with pytest.raises(ConfigError, match="^FedAvgM.momentum must be a number, got 'x'"):
        ServerMomentum(momentum="x")


def test_an_optimizer_shows_as_gin_binds_it() -> None:
    assert repr(ServerMomentum(momentum=0.5)) == "FedAvgM(learning_rate=1.0, momentum=0.5)"
    assert repr(ServerAveraging()) == "FedAvg(learning_rate=1.0)"
    assert repr(ServerAdam()) == (
        "FedAdam(learning_rate=0.01, beta_1=0.9, beta_2=0.99, tau=0.001)")


def test_gin_binds_the_server_optimizers_by_their_algorithms_names() -> None:
    config.parse([], ["FederatedConfig.server_optimizer = @FedAvgM()",
                      "FedAvgM.momentum = 0.5"])
    federated = config.configurable("FederatedConfig")()
    assert federated.server_optimizer == ServerMomentum(learning_rate=1.0, momentum=0.5)
    assert ", server FedAvgM," in federated.describe(10)
    assert config.operative_params()["FedAvgM.momentum"] == "0.5"
    for name, cls in [("FedAvg", ServerAveraging), ("lmt.federated.FedAdam", ServerAdam)]:
        config.parse([], [f"FederatedConfig.server_optimizer = @{name}()"])
        assert type(config.configurable("FederatedConfig")().server_optimizer) is cls
