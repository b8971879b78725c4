"""FederatedConfig: bad settings are refused naming the setting, and ``describe`` names
the algorithm and the server optimizer as a user writes them."""

from __future__ import annotations

import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.server_optimizers import ServerAdam, ServerMomentum


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


def test_describe_names_the_algorithm_and_the_server_optimizer() -> None:
    assert FederatedConfig().describe(100) == (
        "FedAvg: 100 clients, C=0.1, E=1, B=10, client lr 0.05, server FedAvg, "
        "up to 20 rounds")
    sgd = FederatedConfig(local_batch_size=None, server_optimizer=ServerAdam(), rounds=5)
    assert sgd.describe(10) == ("FedSGD: 10 clients, C=0.1, E=1, B=inf, client lr 0.05, "
                                "server FedAdam, up to 5 rounds")
    private = FederatedConfig(dp_clip_norm=1.0, prox_mu=0.1, server_optimizer=ServerMomentum())
    assert private.describe(10).startswith("DP-FedAvg: 10 clients,")
    assert ", server FedAvgM," in private.describe(10)
    assert FederatedConfig(prox_mu=0.1).describe(10).startswith("FedProx: ")
