"""The federated algorithms' server side, in NumPy so that the in-process simulation and
a Flower deployment run the very same arithmetic: which clients take part in a round,
how each client cuts its data into batches, how client results are aggregated (FedAvg's
example-weighted mean; DP-FedAvg's clipped, noised mean), the server optimizers (plain
averaging, FedAvgM, FedAdam) and the privacy spent.

FedSGD is FedAvg with one local epoch of one full batch (``local_batch_size = None``):
each client then takes one gradient step, and the weighted mean of those steps is one
step of the weighted mean gradient (McMahan et al., 2017, section 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmt_tf.checks import check, check_types

Weights = list[np.ndarray]


class ServerOptimizer:
    """Applies the round's aggregated update ``delta`` (mean client weights minus the
    global weights: a negative pseudo-gradient) to the global weights."""

    learning_rate: float = 1.0

    def initial_state(self, weights: Weights) -> Weights:
        return []

    def apply(self, weights: Weights, delta: Weights, state: Weights
              ) -> tuple[Weights, Weights]:
        """Returns the new global weights and optimizer state (float64 deltas)."""
        raise NotImplementedError


@dataclass
class FedAvg(ServerOptimizer):
    """w <- w + lr * delta; lr 1 takes the mean of the clients' weights (FedAvg)."""

    learning_rate: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)
        check(self.learning_rate > 0, "FedAvg.learning_rate",
              f"must be > 0, got {self.learning_rate}")

    def apply(self, weights, delta, state):
        new = [_step(w, self.learning_rate * d) for w, d in zip(weights, delta, strict=True)]
        return new, state


@dataclass
class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019): m <- beta * m + delta; w <- w + lr * m."""

    learning_rate: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_types(self)
        check(self.learning_rate > 0, "FedAvgM.learning_rate",
              f"must be > 0, got {self.learning_rate}")
        check(0 <= self.momentum < 1, "FedAvgM.momentum",
              f"must be in [0, 1), got {self.momentum}")

    def initial_state(self, weights):
        return [np.zeros(w.shape, np.float64) for w in weights]

    def apply(self, weights, delta, state):
        state = [self.momentum * m + d for m, d in zip(state, delta, strict=True)]
        new = [_step(w, self.learning_rate * m) for w, m in zip(weights, state, strict=True)]
        return new, state


@dataclass
class FedAdam(ServerOptimizer):
    """Adaptive server optimizer (Reddi et al., 2021, "Adaptive Federated Optimization"):
    Adam on the pseudo-gradient -delta, with tau the adaptivity (epsilon) term and no
    bias correction, as in the paper's Algorithm 2."""

    learning_rate: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("learning_rate", "tau"):
            check(getattr(self, name) > 0, f"FedAdam.{name}",
                  f"must be > 0, got {getattr(self, name)}")
        for name in ("beta_1", "beta_2"):
            check(0 <= getattr(self, name) < 1, f"FedAdam.{name}",
                  f"must be in [0, 1), got {getattr(self, name)}")

    def initial_state(self, weights):
        # First moments, then second moments (tau^2 initially, as in the paper).
        return ([np.zeros(w.shape, np.float64) for w in weights]
                + [np.full(w.shape, self.tau ** 2, np.float64) for w in weights])

    def apply(self, weights, delta, state):
        n = len(weights)
        m = [self.beta_1 * a + (1 - self.beta_1) * d for a, d in zip(state[:n], delta, strict=True)]
        v = [self.beta_2 * b + (1 - self.beta_2) * d * d
             for b, d in zip(state[n:], delta, strict=True)]
        new = [_step(w, self.learning_rate * a / (np.sqrt(b) + self.tau))
               for w, a, b in zip(weights, m, v, strict=True)]
        return new, m + v


def _step(weight: np.ndarray, update: np.ndarray) -> np.ndarray:
    return (weight.astype(np.float64) + update).astype(weight.dtype)


@dataclass
class FederatedConfig:
    """A federated training run: rounds, client sampling, local training, aggregation,
    differential privacy and stopping. McMahan et al. (2017)'s names in brackets."""

    rounds: int = 20  # communication rounds at most
    client_fraction: float = 0.1  # [C] clients per round, a fraction of all (0, 1]
    local_epochs: int = 1  # [E] passes of each client over its data per round
    local_batch_size: int | None = 10  # [B] examples per local step; None: all (B = inf)
    client_learning_rate: float = 0.05  # local SGD step size (tuned per setting)
    prox_mu: float = 0.0  # FedProx (Li et al., 2020): mu/2 ||w - w_global||^2; 0: FedAvg
    server_optimizer: ServerOptimizer = field(default_factory=FedAvg)
    # DP-FedAvg (McMahan et al., 2018): each client's update clipped to this L2 norm,
    # Gaussian noise of std noise_multiplier * clip on the sum; None: no DP.
    dp_clip_norm: float | None = None
    dp_noise_multiplier: float = 0.0
    dp_delta: float | None = None  # None: 1 / clients^1.1 (below 1/clients)
    target_accuracy: float | None = None  # stop at the first round reaching it (test split)
    eval_every: int = 1  # rounds between evaluations of the global model
    # Deployed (Flower) only: seconds a round waits for its clients, and what a client
    # that fails or disconnects does to the run: 'fail' ends it (resumable from the
    # last round), 'continue' aggregates the other clients' results.
    round_timeout: float = 600.0
    on_client_failure: str = "fail"

    def __post_init__(self) -> None:
        check(isinstance(self.server_optimizer, ServerOptimizer),
              "FederatedConfig.server_optimizer",
              f"must be @FedAvg(), @FedAvgM() or @FedAdam(), got {self.server_optimizer!r}")
        check_types(self)
        check(self.rounds >= 1, "FederatedConfig.rounds", f"must be >= 1, got {self.rounds}")
        check(0 < self.client_fraction <= 1, "FederatedConfig.client_fraction",
              f"must be in (0, 1], got {self.client_fraction}")
        check(self.local_epochs >= 1, "FederatedConfig.local_epochs",
              f"must be >= 1, got {self.local_epochs}")
        check(self.local_batch_size is None or self.local_batch_size >= 1,
              "FederatedConfig.local_batch_size",
              f"must be >= 1 or None (the whole client), got {self.local_batch_size}")
        check(self.client_learning_rate > 0, "FederatedConfig.client_learning_rate",
              f"must be > 0, got {self.client_learning_rate}")
        check(self.prox_mu >= 0, "FederatedConfig.prox_mu", f"must be >= 0, got {self.prox_mu}")
        check(self.dp_clip_norm is None or self.dp_clip_norm > 0, "FederatedConfig.dp_clip_norm",
              f"must be > 0 or None, got {self.dp_clip_norm}")
        check(self.dp_noise_multiplier >= 0, "FederatedConfig.dp_noise_multiplier",
              f"must be >= 0, got {self.dp_noise_multiplier}")
        check(self.dp_noise_multiplier == 0 or self.dp_clip_norm is not None,
              "FederatedConfig.dp_noise_multiplier", "needs dp_clip_norm (noise is scaled to it)")
        check(self.dp_delta is None or 0 < self.dp_delta < 1, "FederatedConfig.dp_delta",
              f"must be in (0, 1), got {self.dp_delta}")
        check(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
              "FederatedConfig.target_accuracy", f"must be in (0, 1], got {self.target_accuracy}")
        check(self.eval_every >= 1, "FederatedConfig.eval_every",
              f"must be >= 1, got {self.eval_every}")
        check(self.round_timeout > 0, "FederatedConfig.round_timeout",
              f"must be > 0 seconds, got {self.round_timeout}")
        check(self.on_client_failure in ("fail", "continue"), "FederatedConfig.on_client_failure",
              f"must be 'fail' or 'continue', got {self.on_client_failure!r}")

    @property
    def private(self) -> bool:
        return self.dp_clip_norm is not None

    def describe(self, clients: int) -> str:
        batch = "inf" if self.local_batch_size is None else self.local_batch_size
        name = ("DP-FedAvg" if self.private else "FedProx" if self.prox_mu
                else "FedSGD" if batch == "inf" and self.local_epochs == 1 else "FedAvg")
        return (f"{name}: {clients} clients, C={self.client_fraction}, E={self.local_epochs}, "
                f"B={batch}, client lr {self.client_learning_rate}, server "
                f"{type(self.server_optimizer).__name__}, up to {self.rounds} rounds")


def round_rng(seed: int, round_: int, purpose: int) -> np.random.Generator:
    """The generator of one purpose in one round: a pure function of its arguments, so a
    resumed run and a deployed server draw what the uninterrupted simulation drew."""
    return np.random.default_rng([seed, round_, purpose])


_SAMPLE, _NOISE, _ORDER = 1, 2, 3


def sample_clients(config: FederatedConfig, clients: int, seed: int, round_: int) -> np.ndarray:
    """The clients of round ``round_`` (1-based), sorted.

    Without DP: max(C * K, 1) clients drawn without replacement (McMahan et al., 2017).
    With DP: each client independently with probability C (Poisson sampling), which is
    what the privacy accounting assumes; a round may then have no clients.
    """
    rng = round_rng(seed, round_, _SAMPLE)
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
    rng = np.random.default_rng([seed, round_, _ORDER, client])
    batch = config.local_batch_size or examples
    order = np.concatenate([rng.permutation(examples) for _ in range(config.local_epochs)])
    starts = np.concatenate([np.arange(0, examples, batch) + e * examples
                             for e in range(config.local_epochs)])
    ends = np.minimum(starts - starts % examples + examples, starts + batch)
    return order.astype(np.int64), np.stack([starts, ends], axis=1).astype(np.int32)


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
    rng = round_rng(seed, round_, _NOISE)
    std = config.dp_noise_multiplier * clip
    noised = [s + rng.normal(0.0, std, s.shape) if std else s for s in summed]
    expected = config.client_fraction * clients
    facts["clipped_clients"] = float(sum(n > clip for n in norms))
    facts["mean_update_norm"] = float(np.mean(norms)) if norms else 0.0
    return [s / expected for s in noised], facts


def global_norm(arrays: Sequence[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays)))


def clip_update(delta: Sequence[np.ndarray], clip: float,
                norm: float | None = None) -> list[np.ndarray]:
    """``delta`` scaled to L2 norm ``clip`` if it is longer (``norm``: its norm, if known)."""
    norm = global_norm(delta) if norm is None else norm
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return [d * factor for d in delta]


def privacy_spent(config: FederatedConfig, clients: int, rounds: int) -> float:
    """Epsilon of (epsilon, delta)-DP at the client level after ``rounds`` rounds of
    Poisson-sampled Gaussian aggregation, by Google's dp-accounting (Renyi DP)."""
    import dp_accounting

    if not config.private or config.dp_noise_multiplier == 0:
        return float("inf")
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        config.client_fraction, dp_accounting.GaussianDpEvent(config.dp_noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(dp_delta(config, clients)))


def dp_delta(config: FederatedConfig, clients: int) -> float:
    return config.dp_delta if config.dp_delta is not None else clients ** -1.1


def weight_bytes(weights: Weights) -> int:
    """Bytes of one copy of the model's weights on the wire (raw arrays)."""
    return int(sum(w.nbytes for w in weights))
