"""Federated rounds across processes or machines on Flower (legacy gRPC API:
``start_server`` / ``start_client``, no Flower App project needed).

The server runs lmt's ``Federation`` as a Flower strategy: it picks each round's clients
by ``sample_clients`` (each Flower client says which client id it is), aggregates with
the same arithmetic as the simulation, evaluates the global model and hands each round
to the same logging and checkpointing. A client trains with the same ``ClientModel``.
Given the seed, a deployed run computes what the simulation computes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import flwr
import numpy as np

from lmt_tf.data.splits import Split
from lmt_tf.errors import LmtError
from lmt_tf.federated.aggregation import ClientResult
from lmt_tf.federated.client import ClientModel
from lmt_tf.federated.rounds import Federation, RoundRecord, RoundState
from lmt_tf.federated.transport import FlowerTLS, check_listen, split_address

# Flower sends usage telemetry unless told not to.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Its INFO lines and the legacy API's deprecation banners repeat what lmt prints per
# round; its errors still show.
logging.getLogger("flwr").setLevel(logging.ERROR)

CONNECT_SECONDS = 120.0  # how long the server waits for every client to connect


def serve(federation: Federation, model: ClientModel, state: RoundState, test: Split,
          on_round: Callable[[RoundRecord, RoundState], None], address: str,
          echo: Callable[[str], None], tls: FlowerTLS | None = None) -> RoundState:
    """Runs rounds ``state.round + 1 ...`` as a Flower server on ``address``
    (``host:port``), with ``tls`` (None: plaintext); returns the last state. ``model``
    evaluates the global weights.

    Raises:
      LmtError: if the server cannot listen on ``address``, the clients do not all
        connect in time, or a client fails (or is missing) and
        ``FederatedConfig.on_client_failure`` is ``fail``.
      KeyboardInterrupt: if a signal stopped the server.
    """
    config = federation.config
    if state.reached_target is not None or state.round >= config.rounds:
        return state
    check_listen(address)  # checked before the run too; a process may have taken it since
    certificates = tls.server_credentials() if tls is not None else None
    strategy = _Strategy(federation, model, state, test, on_round, echo)
    echo(f"lmt: Flower server on {address} ({'TLS' if tls else 'plaintext'}), waiting for "
         f"{federation.clients} client(s)")
    start_server(address, strategy, flwr.server.ServerConfig(
        num_rounds=config.rounds - state.round, round_timeout=config.round_timeout),
        certificates)
    if strategy.error is not None:
        raise strategy.error
    return strategy.state


def start_server(address: str, strategy: flwr.server.strategy.Strategy,
                 config: flwr.server.ServerConfig,
                 certificates: tuple[bytes, bytes, bytes] | None) -> None:
    """``flwr.server.start_server``, its exits told apart. It installs SIGINT, SIGTERM
    and SIGQUIT handlers that exit the process (SystemExit, then os._exit after 5 s);
    and it exits the same way when it cannot start (an address it cannot parse or
    bind). lmt's own handling is restored after it. Only an exit on a signal becomes the
    KeyboardInterrupt lmt ends a run KILLED on; any other is an error.

    Raises:
      KeyboardInterrupt: if a signal stopped the server.
      LmtError: if Flower exited for another reason.
    """
    stops = [signal.SIGINT, signal.SIGTERM, *([signal.SIGQUIT] if hasattr(signal, "SIGQUIT")
                                              else [])]
    handlers = {s: signal.getsignal(s) for s in stops}
    try:
        with _signals_received() as received:
            try:
                flwr.server.start_server(server_address=address, strategy=strategy,
                                         config=config, certificates=certificates)
            except SystemExit as e:
                if set(received()) & set(stops):
                    raise KeyboardInterrupt("the Flower server was stopped by a "
                                            "signal") from e
                reason = e.code if isinstance(e.code, str) else f"exit status {e.code}"
                raise LmtError(f"the Flower server on {address} stopped: "
                               f"{str(reason).strip()}") from e
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _signals_received() -> Iterator[Callable[[], list[int]]]:
    """Inside the block, the signals this process has received so far (the numbers
    Python writes to its wakeup file descriptor for each signal it handles), whoever
    installed the handlers."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def received() -> list[int]:
        try:
            return list(reader.recv(4096))
        except BlockingIOError:
            return []

    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


def run_client(model: ClientModel, split: Split, client: int, seed: int, address: str,
               echo: Callable[[str], None], tls: FlowerTLS | None = None) -> None:
    """Serves client ``client`` (its examples ``split``) to the Flower server at
    ``address`` until the server ends the federation; with ``tls``, only to a server
    whose certificate its CA certificate verifies (None: plaintext).

    Raises:
      LmtError: if the server does not accept a connection in time, or its TLS (or
        the lack of it) does not match ``tls``.
    """
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

    root = tls.root_certificate() if tls is not None else None
    echo(f"lmt: client {client} ({len(split)} examples) connecting to {address} "
         f"({'TLS' if root else 'plaintext'})")
    _wait_for_server(address, CONNECT_SECONDS)
    _check_handshake(address, root)
    flwr.client.start_client(server_address=address, client=LmtClient().to_client(),
                             root_certificates=root, insecure=root is None,
                             max_wait_time=CONNECT_SECONDS)


def _wait_for_server(address: str, timeout: float) -> None:
    """Waits until ``address`` accepts connections: Flower's legacy client gives up at
    once on a server that is still starting.

    Raises:
      LmtError: if it does not within ``timeout`` seconds.
    """
    host, port = split_address(address, "--server")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise LmtError(f"the Flower server at {address} did not accept a connection "
                               f"within {timeout:g} s ({e.strerror or e})") from e
            time.sleep(0.5)


def _check_handshake(address: str, root: bytes | None) -> None:
    """Says at once, in one line, what Flower's client would only retry until it gives
    up on: a server whose certificate ``root`` does not verify, one that does not speak
    TLS although ``root`` is given, or one that does although it is not.

    Raises:
      LmtError: if the server's TLS does not match ``root``.
    """
    host, port = split_address(address, "--server")
    if root:
        context = ssl.create_default_context(cadata=root.decode())
    else:  # only to learn whether it speaks TLS
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # as gRPC does
    try:
        with socket.create_connection((host, port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as e:
        raise LmtError(f"the Flower server at {address} presented a certificate that "
                       f"--tls-ca does not verify ({e.verify_message})") from e
    except (ssl.SSLError, OSError) as e:
        if root:
            raise LmtError(f"the Flower server at {address} did not complete a TLS "
                           f"handshake ({e.__class__.__name__}); does it run without "
                           f"TLS?") from e
        return  # plaintext, as expected
    if not root:
        raise LmtError(f"the Flower server at {address} speaks TLS: give the CA "
                       f"certificate that signed its certificate (--tls-ca)")


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
