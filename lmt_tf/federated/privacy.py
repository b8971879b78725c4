"""The differential privacy DP-FedAvg spends at the client level: epsilon after some
rounds (Renyi DP accounting of the Poisson-sampled Gaussian) and the delta it is for."""

from __future__ import annotations

from lmt_tf.federated.config import FederatedConfig


def privacy_spent(config: FederatedConfig, clients: int, rounds: int) -> float:
    """Epsilon of (epsilon, delta)-DP at the client level after ``rounds`` rounds of
    Poisson-sampled Gaussian aggregation, by Google's dp-accounting (Renyi DP).

    Args:
      config: the run's settings (C, noise multiplier, delta).
      clients: K, the number of clients.
      rounds: the rounds run so far.

    Returns:
      Epsilon, or infinity without DP or without noise.
    """
    import dp_accounting

    if not config.private or config.dp_noise_multiplier == 0:
        return float("inf")
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        config.client_fraction, dp_accounting.GaussianDpEvent(config.dp_noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(dp_delta(config, clients)))


def dp_delta(config: FederatedConfig, clients: int) -> float:
    """The delta epsilon is computed for: ``FederatedConfig.dp_delta``, else
    1 / clients^1.1 (below 1 / clients)."""
    return config.dp_delta if config.dp_delta is not None else clients ** -1.1
