"""The round machinery a federated run shares between the in-process simulation and a
Flower deployment: the ``Federation`` (clients' data and the server's side of a round),
the server's state after a round (``RoundState``, its checkpoint) and a round's record."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmt_tf.data.splits import Split
from lmt_tf.federated.aggregation import ClientResult, aggregate, wire_bytes
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import Partition
from lmt_tf.federated.privacy import privacy_spent
from lmt_tf.federated.sampling import sample_clients
from lmt_tf.federated.server_optimizers import Weights
from lmt_tf.training.callbacks import TrainingDiverged, check_finite


@dataclass
class RoundState:
    """The server after ``round`` rounds: what a checkpoint holds and a resume needs."""

    round: int
    weights: Weights
    server_state: Weights = field(default_factory=list)
    reached_target: int | None = None  # the first round whose accuracy met the target
    bytes_up: int = 0  # sent by clients in all rounds so far
    bytes_down: int = 0  # sent to clients in all rounds so far

    def save(self, directory: Path, keep: int = 2) -> Path:
        """Writes ``round-NNNNNN.npz`` atomically and keeps the newest ``keep``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"round-{self.round:06d}.npz"
        arrays = {f"w{i}": w for i, w in enumerate(self.weights)}
        arrays.update({f"s{i}": s for i, s in enumerate(self.server_state)})
        meta = {"round": self.round, "weights": len(self.weights),
                "server_state": len(self.server_state), "reached_target": self.reached_target,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(partial, path)
        for old in sorted(directory.glob("round-*[0-9].npz"))[:-keep]:
            old.unlink()
        return path

    @classmethod
    def latest(cls, directory: Path) -> RoundState | None:
        """The newest checkpoint in ``directory``, or None."""
        found = sorted(directory.glob("round-*[0-9].npz")) if directory.is_dir() else []
        if not found:
            return None
        with np.load(found[-1]) as saved:
            meta = json.loads(str(saved["meta"]))
            return cls(meta["round"], [saved[f"w{i}"] for i in range(meta["weights"])],
                       [saved[f"s{i}"] for i in range(meta["server_state"])],
                       meta["reached_target"], meta["bytes_up"], meta["bytes_down"])


@dataclass
class RoundRecord:
    """What happened in one round, as it is logged."""

    round: int
    clients: list[int]
    examples: int
    train_loss: float
    bytes_up: int
    bytes_down: int
    seconds: float
    test: dict[str, float] = field(default_factory=dict)  # empty: not evaluated this round
    epsilon: float | None = None
    facts: dict[str, float] = field(default_factory=dict)

    def metrics(self, state: RoundState) -> dict[str, float]:
        """The round's metrics, with the run's totals so far from ``state``."""
        out = {"bytes_up_total": state.bytes_up, "bytes_down_total": state.bytes_down,
               "clients": len(self.clients), "examples": self.examples,
               "train_loss": self.train_loss, "bytes_up": self.bytes_up,
               "bytes_down": self.bytes_down, "round_seconds": self.seconds, **self.facts}
        out.update({f"test_{k}": v for k, v in self.test.items()})
        if self.epsilon is not None:
            out["epsilon"] = self.epsilon
        return out


class Federation:
    """The clients' data and the server's side of the algorithm for one run.

    Args:
      config: the algorithm's settings.
      partition: which training examples each client holds.
      train: the training split the partition indexes.
      seed: the run's seed (client sampling, local order, DP noise).
    """

    def __init__(self, config: FederatedConfig, partition: Partition, train: Split, seed: int):
        self.config, self.partition, self.train, self.seed = config, partition, train, seed

    @property
    def clients(self) -> int:
        return len(self.partition)

    def client_split(self, client: int) -> Split:
        ids = self.partition.clients[client]
        return Split(self.train.x[ids], self.train.y[ids])

    def sample(self, round_: int) -> np.ndarray:
        return sample_clients(self.config, self.clients, self.seed, round_)

    def initial_state(self, weights: Weights) -> RoundState:
        return RoundState(0, [np.array(w) for w in weights],
                          self.config.server_optimizer.initial_state(weights))

    def close_round(self, state: RoundState, results: Sequence[ClientResult], round_: int,
                    started: float, evaluate: Callable[[Weights], dict[str, float]]
                    ) -> tuple[RoundState, RoundRecord]:
        """Round ``round_`` from its clients' ``results``: the new global model (server
        optimizer after aggregation) and the round's record, evaluated by ``evaluate``
        when the round is one to evaluate (``started``: its ``time.perf_counter()``).

        Raises:
          TrainingDiverged: if the clients' loss or the new global weights are NaN or
            infinite.
        """
        delta, facts = aggregate(self.config, state.weights, results, self.clients,
                                 self.seed, round_)
        weights, server = self.config.server_optimizer.apply(state.weights, delta,
                                                             state.server_state)
        examples = sum(r.examples for r in results)
        loss = (sum(r.loss * r.examples for r in results) / examples) if examples else 0.0
        # A diverged round ends the run as a diverged epoch does: before it is
        # checkpointed, logged or evaluated.
        if not math.isfinite(loss):
            raise TrainingDiverged(loss, round_, round_, f"loss is {loss} in round {round_} "
                                   f"of federate (FederatedConfig.client_learning_rate "
                                   f"{self.config.client_learning_rate:g})")
        check_finite(weights, f"the global model of federate round {round_}")
        sent = wire_bytes(weights) * len(results)  # each way: a model to and from each
        epsilon = (privacy_spent(self.config, self.clients, round_)
                   if self.config.private and self.config.dp_noise_multiplier else None)
        state = RoundState(round_, weights, server, state.reached_target,
                           state.bytes_up + sent, state.bytes_down + sent)
        record = RoundRecord(round_, [r.client for r in results], examples, loss, sent, sent,
                             time.perf_counter() - started, epsilon=epsilon, facts=facts)
        if self.evaluates(round_):
            record.test = evaluate(weights)
            target = self.config.target_accuracy
            if target is not None and record.test.get("accuracy", 0.0) >= target:
                state.reached_target = round_
        return state, record

    def evaluates(self, round_: int) -> bool:
        return round_ % self.config.eval_every == 0 or round_ == self.config.rounds
