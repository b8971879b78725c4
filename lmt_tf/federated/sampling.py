"""Which clients take part in a federated round, and in which order and batches each
walks its data: every random draw a function of (seed, round, client)."""

from __future__ import annotations

import numpy as np

from lmt_tf.federated.config import FederatedConfig

# The purposes of a round's draws, each its own generator.
SAMPLE, NOISE, ORDER = 1, 2, 3


def round_rng(seed: int, round_: int, purpose: int) -> np.random.Generator:
    """The generator of one purpose in one round: a pure function of its arguments, so a
    resumed run and a deployed server draw what the uninterrupted simulation drew."""
    return np.random.default_rng([seed, round_, purpose])


def sample_clients(config: FederatedConfig, clients: int, seed: int, round_: int) -> np.ndarray:
    """The clients of round ``round_`` (1-based), sorted.

    Without DP: max(C * K, 1) clients drawn without replacement (McMahan et al., 2017).
    With DP: each client independently with probability C (Poisson sampling), which is
    what the privacy accounting assumes; a round may then have no clients.
    """
    rng = round_rng(seed, round_, SAMPLE)
    if config.private:
        return np.flatnonzero(rng.random(clients) < config.client_fraction)
    count = max(int(round(config.client_fraction * clients)), 1)
    return np.sort(rng.choice(clients, size=count, replace=False))


def local_batches(config: FederatedConfig, examples: int, seed: int, round_: int,
                  client: int) -> tuple[np.ndarray, np.ndarray]:
    """How a client walks its ``examples`` in a round: the order of its example ids over
    E epochs (each a fresh permutation) and [start, end) bounds of each batch within that
    order; every epoch ends with its partial batch, if any.

    Returns:
      (order, bounds): int64 ids of length E * examples, and int32 (steps, 2) bounds.
    """
    rng = np.random.default_rng([seed, round_, ORDER, client])
    batch = config.local_batch_size or examples
    order = np.concatenate([rng.permutation(examples) for _ in range(config.local_epochs)])
    starts = np.concatenate([np.arange(0, examples, batch) + e * examples
                             for e in range(config.local_epochs)])
    ends = np.minimum(starts - starts % examples + examples, starts + batch)
    return order.astype(np.int64), np.stack([starts, ends], axis=1).astype(np.int32)
