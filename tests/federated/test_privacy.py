"""The privacy DP-FedAvg spends: epsilon grows with rounds and is dp-accounting's, for the
delta the run names or 1 / clients^1.1."""

from __future__ import annotations

import pytest

from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.privacy import dp_delta, privacy_spent


def test_epsilon_grows_with_rounds_and_matches_dp_accounting() -> None:
    import dp_accounting

    config = FederatedConfig(client_fraction=0.1, dp_clip_norm=1.0, dp_noise_multiplier=1.1)
    spent = [privacy_spent(config, 1000, rounds) for rounds in (1, 10, 100)]
    assert spent[0] < spent[1] < spent[2]
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.1)), 100)
    assert spent[2] == pytest.approx(accountant.get_epsilon(1000 ** -1.1), rel=1e-9)


def test_delta_is_the_configured_one_or_below_one_over_clients() -> None:
    assert dp_delta(FederatedConfig(dp_clip_norm=1.0), 100) == pytest.approx(100 ** -1.1)
    assert dp_delta(FederatedConfig(dp_clip_norm=1.0, dp_delta=1e-5), 100) == 1e-5


def test_no_noise_spends_no_finite_privacy() -> None:
    assert privacy_spent(FederatedConfig(), 100, 10) == float("inf")
    assert privacy_spent(FederatedConfig(dp_clip_norm=1.0), 100, 10) == float("inf")
