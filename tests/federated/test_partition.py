"""Client partitions: disjoint and covering, seeded, McMahan's pathological split (at most
two labels per client), Dirichlet label skew that approaches IID as alpha grows,
unbalanced sizes, the artifacts, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.federated.partition import PartitionConfig, partition, write_artifacts

# MNIST-like labels: 10 classes of unequal sizes (6,000 examples in all).
LABELS = np.random.default_rng(7).choice(10, size=6000, p=np.linspace(0.07, 0.13, 10) / 1.0)


def _covers(parts, n: int) -> None:
    everything = np.concatenate(parts.clients)
    assert len(everything) == n  # no example twice ...
    assert np.array_equal(np.sort(everything), np.arange(n))  # ... and none left out
    assert all(len(ids) >= 1 for ids in parts.clients)


@pytest.mark.parametrize("scheme", ["iid", "pathological", "dirichlet", "unbalanced"])
def test_every_scheme_is_disjoint_covering_and_seeded(scheme: str) -> None:
    config = PartitionConfig(clients=20, scheme=scheme, alpha=0.3)
    parts = partition(LABELS, config, seed=3)
    assert len(parts) == 20
    _covers(parts, len(LABELS))
    again = partition(LABELS, config, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts.clients, again.clients, strict=True))
    other = partition(LABELS, config, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts.clients, other.clients,
                                                         strict=True))


def test_the_pathological_split_gives_each_client_at_most_two_labels() -> None:
    # McMahan et al. (2017): 100 clients x 2 shards; here of 30 examples instead of 300.
    parts = partition(LABELS, PartitionConfig(clients=100, scheme="pathological"), seed=0)
    _covers(parts, len(LABELS))
    labels_per_client = (parts.histogram(LABELS, 10) > 0).sum(axis=1)
    assert labels_per_client.max() <= 2
    assert (labels_per_client == 2).mean() > 0.8  # most clients do hold two digits
    assert parts.sizes().min() >= 55 and parts.sizes().max() <= 65  # 2 shards of ~30


def test_dirichlet_approaches_iid_as_alpha_grows() -> None:
    overall = np.bincount(LABELS, minlength=10) / len(LABELS)

    def skew(alpha: float) -> float:
        parts = partition(LABELS, PartitionConfig(clients=10, scheme="dirichlet",
                                                  alpha=alpha), seed=1)
        histogram = parts.histogram(LABELS, 10)
        shares = histogram / histogram.sum(axis=1, keepdims=True)
        return float(np.abs(shares - overall).sum(axis=1).max())  # worst client's L1

    assert skew(0.1) > 0.8  # strongly skewed: some client is mostly a few labels
    assert skew(1000.0) < 0.1  # nearly the overall label distribution on every client


def test_unbalanced_sizes_spread_and_equal_at_sigma_zero() -> None:
    spread = partition(LABELS, PartitionConfig(clients=50, scheme="unbalanced", sigma=1.5), 0)
    assert spread.sizes().max() > 5 * spread.sizes().min()
    equal = partition(LABELS, PartitionConfig(clients=50, scheme="unbalanced", sigma=0.0), 0)
    assert equal.sizes().max() - equal.sizes().min() <= 1


def test_the_artifacts_record_every_client(tmp_path: Path) -> None:
    config = PartitionConfig(clients=8, scheme="pathological")
    parts = partition(LABELS, config, seed=0)
    files = write_artifacts(parts.summary(LABELS, 10, config, 0), 10, tmp_path)
    record = json.loads(files[0].read_text())
    assert record["examples"] == len(LABELS) and len(record["per_client"]) == 8
    assert [c["examples"] for c in record["per_client"]] == parts.sizes().tolist()
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_partitions() -> None:
    with pytest.raises(ConfigError, match="10 clients need at least 10 training examples, "
                                          "got 5"):
        partition(np.arange(5), PartitionConfig(clients=10), 0)
    with pytest.raises(ConfigError, match="PartitionConfig.scheme must be one of"):
        PartitionConfig(scheme="sorted")
    with pytest.raises(ConfigError, match="PartitionConfig.clients must be >= 1"):
        PartitionConfig(clients=0)
    with pytest.raises(ConfigError, match="PartitionConfig.alpha must be > 0"):
        PartitionConfig(alpha=0.0)
    with pytest.raises(ConfigError, match="shards exceed the 6 examples"):
        partition(np.arange(6) % 2, PartitionConfig(clients=4, scheme="pathological"), 0)
