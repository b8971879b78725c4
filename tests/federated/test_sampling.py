"""Client sampling and local batches: seeded per round, C * K clients (Poisson with DP),
and every epoch of a client's batches covers its examples once."""

from __future__ import annotations

import numpy as np

from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.sampling import local_batches, sample_clients


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
