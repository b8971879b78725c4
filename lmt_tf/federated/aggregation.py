"""How the server combines its clients' results in a federated round: FedAvg's
example-weighted mean, or DP-FedAvg's clipped, noised mean, in NumPy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmt_tf.checks import check
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.sampling import NOISE, round_rng
from lmt_tf.federated.server_optimizers import Weights


@dataclass
class ClientResult:
    """What a client sends back after local training."""

    client: int
    weights: Weights
    examples: int
    loss: float  # mean training loss over its local steps


def aggregate(config: FederatedConfig, weights: Weights, results: Sequence[ClientResult],
              clients: int, seed: int, round_: int) -> tuple[Weights, dict[str, float]]:
    """The round's update of the global ``weights`` (before the server optimizer).

    Without DP: the example-weighted mean of the clients' deltas w_k - w. With DP: each
    delta clipped to ``dp_clip_norm``, summed, Gaussian noise of std noise_multiplier *
    clip added, divided by the expected number of clients C * K (a fixed denominator,
    so one client's influence is bounded whatever the round's draw).

    Returns:
      The float64 deltas and facts of the round (clipped clients, update norms).
    """
    base = [w.astype(np.float64) for w in weights]
    deltas = [[c.astype(np.float64) - b for c, b in zip(r.weights, base, strict=True)]
              for r in results]
    facts: dict[str, float] = {}
    if not config.private:
        total = sum(r.examples for r in results)
        check(total > 0, "federated round", f"round {round_}: no client returned examples")
        mean = [sum(r.examples * d[i] for r, d in zip(results, deltas, strict=True)) / total
                for i in range(len(base))]
        return mean, facts
    clip = config.dp_clip_norm
    norms = [global_norm(d) for d in deltas]
    clipped = [clip_update(d, clip, norm) for d, norm in zip(deltas, norms, strict=True)]
    summed = [sum((d[i] for d in clipped), np.zeros_like(b)) for i, b in enumerate(base)]
    rng = round_rng(seed, round_, NOISE)
    std = config.dp_noise_multiplier * clip
    noised = [s + rng.normal(0.0, std, s.shape) if std else s for s in summed]
    expected = config.client_fraction * clients
    facts["clipped_clients"] = float(sum(n > clip for n in norms))
    facts["mean_update_norm"] = float(np.mean(norms)) if norms else 0.0
    return [s / expected for s in noised], facts


def global_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``arrays`` taken together, as one flat vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(delta: Sequence[np.ndarray], clip: float,
                norm: float | None = None) -> list[np.ndarray]:
    """``delta`` scaled to L2 norm ``clip`` if it is longer (``norm``: its norm, if known)."""
    norm = global_norm(delta) if norm is None else norm
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [d * factor for d in delta]


def wire_bytes(weights: Weights) -> int:
    """Bytes of one copy of the model's weights on the wire (raw arrays)."""
    return int(sum(w.nbytes for w in weights))
