"""The server optimizers of federated training: how the round's aggregated update moves the
global weights (plain averaging, server momentum, Adam on the server), in NumPy."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from lmt_tf.checks import check, check_types

Weights = list[np.ndarray]  # a model's weights (or their deltas), one array per variable


class ServerOptimizer:
    """Applies the round's aggregated update ``delta`` (mean client weights minus the
    global weights: a negative pseudo-gradient) to the global weights.

    ``name`` is the algorithm's name, under which gin binds the class (``@FedAvgM()``)
    and which messages and ``FederatedConfig.describe`` use; the Python class names
    leave the algorithms' names to Flower's strategies.
    """

    name: ClassVar[str]
    learning_rate: float = 1.0

    def __repr__(self) -> str:
        # As bound in gin, FedAvgM(learning_rate=1.0, momentum=0.9), in messages that
        # show a value given in the wrong place.
        settings = ", ".join(f"{f.name}={getattr(self, f.name)!r}"
                             for f in fields(self))
        return f"{self.name}({settings})"

    def initial_state(self, weights: Weights) -> Weights:
        return []

    def apply(self, weights: Weights, delta: Weights, state: Weights
              ) -> tuple[Weights, Weights]:
        """Returns the new global weights and optimizer state (float64 deltas)."""
        raise NotImplementedError


@dataclass(repr=False)
class ServerAveraging(ServerOptimizer):
    """w <- w + lr * delta; lr 1 takes the mean of the clients' weights (FedAvg)."""

    name: ClassVar[str] = "FedAvg"
    learning_rate: float = 1.0

    def __post_init__(self) -> None:
        check_types(self, self.name)
        check(self.learning_rate > 0, f"{self.name}.learning_rate",
              f"must be > 0, got {self.learning_rate}")

    def apply(self, weights, delta, state):
        new = [_step(w, self.learning_rate * d) for w, d in zip(weights, delta, strict=True)]
        return new, state


@dataclass(repr=False)
class ServerMomentum(ServerOptimizer):
    """Server momentum, FedAvgM (Hsu et al., 2019): m <- beta * m + delta; w <- w + lr * m."""

    name: ClassVar[str] = "FedAvgM"
    learning_rate: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        check_types(self, self.name)
        check(self.learning_rate > 0, f"{self.name}.learning_rate",
              f"must be > 0, got {self.learning_rate}")
        check(0 <= self.momentum < 1, f"{self.name}.momentum",
              f"must be in [0, 1), got {self.momentum}")

    def initial_state(self, weights):
        return [np.zeros(w.shape, np.float64) for w in weights]

    def apply(self, weights, delta, state):
        state = [self.momentum * m + d for m, d in zip(state, delta, strict=True)]
        new = [_step(w, self.learning_rate * m) for w, m in zip(weights, state, strict=True)]
        return new, state


@dataclass(repr=False)
class ServerAdam(ServerOptimizer):
    """Adaptive server optimizer, FedAdam (Reddi et al., 2021, "Adaptive Federated
    Optimization"): Adam on the pseudo-gradient -delta, with tau the adaptivity (epsilon)
    term and no bias correction, as in the paper's Algorithm 2."""

    name: ClassVar[str] = "FedAdam"
    learning_rate: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        check_types(self, self.name)
        for setting in ("learning_rate", "tau"):
            check(getattr(self, setting) > 0, f"{self.name}.{setting}",
                  f"must be > 0, got {getattr(self, setting)}")
        for setting in ("beta_1", "beta_2"):
            check(0 <= getattr(self, setting) < 1, f"{self.name}.{setting}",
                  f"must be in [0, 1), got {getattr(self, setting)}")

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
