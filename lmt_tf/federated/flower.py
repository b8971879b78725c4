"""Federated rounds across processes or machines on Flower (legacy gRPC API:
``start_server`` / ``start_client``, no Flower App project needed).

The server runs lmt's ``Federation`` as a Flower strategy: it picks each round's clients
by ``sample_clients`` (each Flower client says which client id it is), aggregates with
the same arithmetic as the simulation, evaluates the global model and hands each round
to the same logging and checkpointing. A client trains with the same ``ClientModel``.
Given the seed, a deployed run computes what the simulation computes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import flwr
import numpy as np

from lmt_tf.data.splits import Split
from lmt_tf.errors import LmtError
from lmt_tf.federated.aggregation import ClientResult
from lmt_tf.federated.client import ClientModel
from lmt_tf.federated.rounds import Federation, RoundRecord, RoundState

# Flower sends usage telemetry unless told not to.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Its INFO lines and the legacy API's deprecation banners repeat what lmt prints per
# round; its errors still show.
logging.getLogger("flwr").setLevel(logging.ERROR)

CONNECT_SECONDS = 120.0  # how long the server waits for every client to connect


def serve(federation: Federation, model: ClientModel, state: RoundState, test: Split,
          on_round: Callable[[RoundRecord, RoundState], None], address: str,
          echo: Callable[[str], None]) -> RoundState:
    """Runs rounds ``state.round + 1 ...`` as a Flower server on ``address``
    (``host:port``); returns the last state. ``model`` evaluates the global weights.

    Raises:
      LmtError: if the clients do not all connect in time, or a client fails (or is
        missing) and ``FederatedConfig.on_client_failure`` is ``fail``.
    """
    config = federation.config
    if state.reached_target is not None or state.round >= config.rounds:
        return state
    strategy = _Strategy(federation, model, state, test, on_round, echo)
    echo(f"lmt: Flower server on {address}, waiting for {federation.clients} client(s)")
    # start_server installs SIGINT/SIGTERM handlers that exit the process (SystemExit,
    # then os._exit after 5 s). lmt's own handling is restored after it, and its exit on
    # a signal becomes the KeyboardInterrupt lmt ends a run KILLED on.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        flwr.server.start_server(
            server_address=address, strategy=strategy,
            config=flwr.server.ServerConfig(num_rounds=config.rounds - state.round,
                                            round_timeout=config.round_timeout))
    except SystemExit as e:
        raise KeyboardInterrupt("the Flower server was stopped by a signal") from e
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if strategy.error is not None:
        raise strategy.error
    return strategy.state


def run_client(model: ClientModel, split: Split, client: int, seed: int, address: str,
               echo: Callable[[str], None]) -> None:
    """Serves client ``client`` (its examples ``split``) to the Flower server at
    ``address`` until the server ends the federation."""
    class LmtClient(flwr.client.NumPyClient):
        def get_properties(self, config: dict) -> dict:
            return {"client": client}

        def get_parameters(self, config: dict) -> list[np.ndarray]:
            return model.get_weights()

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple:
            round_ = int(config["round"])
            result = model.fit(parameters, split, seed, round_, client)
            echo(f"lmt: client {client}: round {round_}, {result.examples} examples, "
                 f"loss {result.loss:.4f}")
            return result.weights, result.examples, {"loss": result.loss, "client": client}

        def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple:
            return 0.0, 0, {}  # the server evaluates the global model itself

    echo(f"lmt: client {client} ({len(split)} examples) connecting to {address}")
    _wait_for_server(address, CONNECT_SECONDS)
    flwr.client.start_client(server_address=address, client=LmtClient().to_client(),
                             insecure=True, max_wait_time=CONNECT_SECONDS)


def _wait_for_server(address: str, timeout: float) -> None:
    """Waits until ``address`` accepts connections: Flower's legacy client gives up at
    once on a server that is still starting.

    Raises:
      LmtError: if it does not within ``timeout`` seconds.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise LmtError(f"the Flower server at {address} did not accept a connection "
                               f"within {timeout:g} s ({e.strerror or e})") from e
            time.sleep(0.5)


class _Strategy(flwr.server.strategy.Strategy):
    """lmt's federation as a Flower strategy. Exceptions inside a strategy would be lost
    in Flower's server loop; the first is kept in ``error``, and every later round is
    skipped, so that the server ends at once and ``serve`` raises it."""

    def __init__(self, federation: Federation, model: ClientModel, state: RoundState,
                 test: Split, on_round: Callable[[RoundRecord, RoundState], None],
                 echo: Callable[[str], None]):
        self.federation, self.model, self.state, self.test = federation, model, state, test
        self.on_round, self.echo = on_round, echo
        self.start = state.round
        self.error: LmtError | None = None
        self._proxies: dict[int, Any] = {}
        self._started = 0.0

    def initialize_parameters(self, client_manager: Any) -> Any:
        return flwr.common.ndarrays_to_parameters(self.state.weights)

    def _identify(self, client_manager: Any) -> None:
        """Which Flower client is which lmt client (asked once, when all are connected)."""
        wanted = self.federation.clients
        if not client_manager.wait_for(wanted, timeout=CONNECT_SECONDS):
            raise LmtError(f"only {client_manager.num_available()} of {wanted} Flower "
                           f"clients connected within {CONNECT_SECONDS:g} s")
        for proxy in client_manager.all().values():
            answer = proxy.get_properties(flwr.common.GetPropertiesIns({}),
                                          timeout=CONNECT_SECONDS, group_id=None)
            self._proxies[int(answer.properties["client"])] = proxy
        missing = sorted(set(range(wanted)) - set(self._proxies))
        if missing:
            raise LmtError(f"no Flower client says it is client {missing[0]} of {wanted}")
        self.echo(f"lmt: {wanted} Flower client(s) connected")

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        round_ = self.start + server_round
        if self.error is not None or self.state.reached_target is not None:
            return []
        try:
            if not self._proxies:
                self._identify(client_manager)
            connected = set(client_manager.all().values())
            chosen = []
            for client in self.federation.sample(round_):
                proxy = self._proxies[int(client)]
                if proxy not in connected:
                    self._failed(round_, f"client {client} is no longer connected")
                    continue
                chosen.append((proxy, flwr.common.FitIns(parameters, {"round": round_})))
        except LmtError as e:
            self.error = e
            return []
        self._started = time.perf_counter()
        return chosen

    def _failed(self, round_: int, what: str) -> None:
        if self.federation.config.on_client_failure == "fail":
            raise LmtError(f"round {round_}: {what} (FederatedConfig.on_client_failure = "
                           f"'continue' goes on without it)")
        self.echo(f"lmt: round {round_}: {what}; going on without it")

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        round_ = self.start + server_round
        try:
            for failure in failures:
                what = (f"{type(failure).__name__}: {failure}"
                        if isinstance(failure, BaseException) else "no result")
                self._failed(round_, f"a client failed ({what})")
            clients = [ClientResult(int(res.metrics["client"]),
                                    flwr.common.parameters_to_ndarrays(res.parameters),
                                    int(res.num_examples), float(res.metrics["loss"]))
                       for _, res in results]
            clients.sort(key=lambda r: r.client)  # the simulation's order: sorted ids
            if not clients and not self.federation.config.private:
                raise LmtError(f"round {round_}: no client returned a result")
            state, record = self.federation.close_round(
                self.state, clients, round_, self._started,
                lambda weights: self.model.evaluate(weights, self.test))
            self.state = state
            self.on_round(record, state)
        except LmtError as e:
            self.error = e
        return flwr.common.ndarrays_to_parameters(self.state.weights), {}

    def configure_evaluate(self, server_round: int, parameters: Any,
                           client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None
