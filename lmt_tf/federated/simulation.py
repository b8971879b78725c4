"""Federated rounds in one process: the simulation's round loop, every client trained in
turn on one compiled model."""

from __future__ import annotations

import time
from collections.abc import Callable

from lmt_tf.data.splits import Split
from lmt_tf.federated.client import ClientModel
from lmt_tf.federated.rounds import Federation, RoundRecord, RoundState


def simulate(federation: Federation, client: ClientModel, state: RoundState, test: Split,
             on_round: Callable[[RoundRecord, RoundState], None]) -> RoundState:
    """Runs rounds ``state.round + 1 ...`` until ``config.rounds`` or the target accuracy,
    every client on ``client``'s one model; ``on_round`` logs and checkpoints each."""
    config = federation.config
    for round_ in range(state.round + 1, config.rounds + 1):
        if state.reached_target is not None:
            break
        started = time.perf_counter()
        results = [client.fit(state.weights, federation.client_split(k), federation.seed,
                              round_, int(k)) for k in federation.sample(round_)]
        state, record = federation.close_round(state, results, round_, started,
                                               lambda weights: client.evaluate(weights, test))
        on_round(record, state)
    return state
