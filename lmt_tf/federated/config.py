"""The settings of a federated training run (``FederatedConfig``): rounds, client sampling,
local training, the server optimizer, differential privacy and stopping.

FedSGD is FedAvg with one local epoch of one full batch (``local_batch_size = None``):
each client then takes one gradient step, and the weighted mean of those steps is one
step of the weighted mean gradient (McMahan et al., 2017, section 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmt_tf.checks import check, check_types
from lmt_tf.federated.server_optimizers import ServerAveraging, ServerOptimizer


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
    server_optimizer: ServerOptimizer = field(default_factory=ServerAveraging)
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
                f"{self.server_optimizer.name}, up to {self.rounds} rounds")
