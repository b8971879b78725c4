"""Client partitions of a training split: which examples each simulated or deployed
client holds. Every scheme is a pure function of the labels, the number of clients and
a seed, so a deployed client computes its own part without receiving anyone else's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmt_tf.checks import check, check_types
from lmt_tf.errors import ConfigError

SCHEMES = ("iid", "pathological", "dirichlet", "unbalanced")


@dataclass
class PartitionConfig:
    """How the training split is divided among clients."""

    clients: int = 100  # K: the number of clients
    # iid: a seeded shuffle cut into equal parts. pathological: McMahan et al. (2017):
    # examples sorted by label cut into clients * shards_per_client shards, each client
    # holding shards_per_client of them. dirichlet: each label's examples divided among
    # clients in Dirichlet(alpha) proportions (label skew; large alpha approaches iid).
    # unbalanced: iid labels, client sizes log-normal with sigma.
    scheme: str = "iid"
    shards_per_client: int = 2  # pathological (2 shards of 300 for 100 MNIST clients)
    alpha: float = 0.5  # dirichlet concentration: small is skewed
    sigma: float = 1.0  # unbalanced: log-normal spread of client sizes (0: equal)

    def __post_init__(self) -> None:
        check_types(self)
        check(self.clients >= 1, "PartitionConfig.clients", f"must be >= 1, got {self.clients}")
        check(self.scheme in SCHEMES, "PartitionConfig.scheme",
              f"must be one of {SCHEMES}, got {self.scheme!r}")
        check(self.shards_per_client >= 1, "PartitionConfig.shards_per_client",
              f"must be >= 1, got {self.shards_per_client}")
        check(self.alpha > 0, "PartitionConfig.alpha", f"must be > 0, got {self.alpha}")
        check(self.sigma >= 0, "PartitionConfig.sigma", f"must be >= 0, got {self.sigma}")


@dataclass(frozen=True)
class Partition:
    """The example ids (into the training split) of each client, each sorted."""

    clients: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.clients)

    def sizes(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.clients])

    def histogram(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Examples per (client, label)."""
        return np.stack([np.bincount(labels[ids], minlength=num_classes)
                         for ids in self.clients])

    def summary(self, labels: np.ndarray, num_classes: int, config: PartitionConfig,
                seed: int) -> dict:
        """The partition as a JSON-ready record: per client, its examples and labels."""
        counts = self.histogram(labels, num_classes)
        return {"scheme": config.scheme, "seed": seed, "clients": len(self),
                "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
                "examples": int(self.sizes().sum()),
                "per_client": [{"client": k, "examples": int(counts[k].sum()),
                                "label_histogram": counts[k].tolist()}
                               for k in range(len(self))]}


def partition(labels: np.ndarray, config: PartitionConfig, seed: int) -> Partition:
    """Divides examples with ``labels`` among ``config.clients`` clients.

    Every example goes to exactly one client and every client gets at least one.

    Raises:
      ConfigError: if there are more clients (or pathological shards) than examples, or
        a Dirichlet draw keeps leaving a client empty.
    """
    labels = np.asarray(labels)
    n, k = len(labels), config.clients
    check(k <= n, "PartitionConfig.clients",
          f"{k} clients need at least {k} training examples, got {n}")
    rng = np.random.default_rng([seed, 0x9E3779B9])
    if config.scheme == "iid":
        parts = np.array_split(rng.permutation(n), k)
    elif config.scheme == "unbalanced":
        parts = _unbalanced(rng, n, k, config.sigma)
    elif config.scheme == "pathological":
        parts = _pathological(rng, labels, k, config.shards_per_client)
    else:
        parts = _dirichlet(rng, labels, k, config.alpha)
    return Partition(tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts))


def _unbalanced(rng: np.random.Generator, n: int, k: int, sigma: float) -> list[np.ndarray]:
    weights = rng.lognormal(0.0, sigma, k)
    # One example each, the rest in proportion to the weights (largest remainders).
    extra = (n - k) * weights / weights.sum()
    sizes = 1 + np.floor(extra).astype(np.int64)
    sizes[np.argsort(extra - np.floor(extra))[::-1][: n - sizes.sum()]] += 1
    return np.split(rng.permutation(n), np.cumsum(sizes)[:-1])


def _pathological(rng: np.random.Generator, labels: np.ndarray, k: int,
                  shards_per_client: int) -> list[np.ndarray]:
    """Shards cut within labels (so a shard holds one label and a client at most
    ``shards_per_client``), as many per label as its share of the examples."""
    shards = k * shards_per_client
    check(shards <= len(labels), "PartitionConfig.shards_per_client",
          f"{k} clients x {shards_per_client} shards exceed the {len(labels)} examples")
    classes, counts = np.unique(labels, return_counts=True)
    exact = shards * counts / counts.sum()
    per_label = np.maximum(np.floor(exact).astype(np.int64), 1)
    while per_label.sum() > shards:  # more labels than shards: drop from the largest
        per_label[np.argmax(per_label)] -= 1
    order = np.argsort(exact - per_label)[::-1]
    per_label[order[: shards - per_label.sum()]] += 1
    pieces = []
    for label, count in zip(classes, per_label, strict=True):
        if count:
            ids = rng.permutation(np.flatnonzero(labels == label))
            pieces.extend(np.array_split(ids, count))
    dealt = rng.permutation(len(pieces)).reshape(k, shards_per_client)
    return [np.concatenate([pieces[s] for s in row]) for row in dealt]


def _dirichlet(rng: np.random.Generator, labels: np.ndarray, k: int,
               alpha: float) -> list[np.ndarray]:
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for label in np.unique(labels):
            ids = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(ids)).astype(np.int64)
            for client, piece in enumerate(np.split(ids, cuts[:-1])):
                parts[client].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) > 0:
            return merged
    raise ConfigError(f"PartitionConfig.alpha Dirichlet({alpha}) left a client without "
                      f"examples in 100 draws; raise alpha or use fewer than {k} clients")


def write_artifacts(summary: dict, num_classes: int, directory: Path) -> list[Path]:
    """Writes ``partition.json`` and ``partition.png`` (examples per label, stacked, for
    each client) into ``directory``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    record = directory / "partition.json"
    record.write_text(json.dumps(summary, indent=1))
    counts = np.array([c["label_histogram"] for c in summary["per_client"]])
    figure, axes = plt.subplots(figsize=(max(6.0, 0.08 * len(counts) + 2), 4))
    bottom = np.zeros(len(counts))
    colors = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for label in range(num_classes):
        axes.bar(np.arange(len(counts)), counts[:, label], bottom=bottom, width=1.0,
                 color=colors(label % colors.N), label=str(label))
        bottom += counts[:, label]
    axes.set(xlabel="client", ylabel="examples",
             title=f"{summary['scheme']} partition, {len(counts)} clients (seed {summary['seed']})")
    if num_classes <= 20:
        axes.legend(title="label", ncol=2, fontsize="small", bbox_to_anchor=(1.01, 1),
                    loc="upper left")
    figure.tight_layout()
    picture = directory / "partition.png"
    figure.savefig(picture, dpi=100)
    plt.close(figure)
    return [record, picture]
