"""How a Flower deployment's processes reach each other: the server's address is checked
and bound before any run starts; TLS (lmt's throw-away CA, or the user's files, checked
in one line each) keeps plaintext clients and clients that do not trust the server's CA
out of Flower's gRPC server; plaintext beyond loopback is refused unless asked for."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import flwr
import numpy as np
import pytest
from flwr.server.client_manager import SimpleClientManager
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import GrpcBridgeClosed
from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server

from lmt_tf.cli import main
from lmt_tf.data.splits import Split
from lmt_tf.errors import LmtError
from lmt_tf.federated.flower import run_client
from lmt_tf.federated.transport import FlowerTLS, secured, throwaway_tls
from lmt_tf.runtime.processes import free_ports
from tests.conftest import all_runs
from tests.stages.test_federate import FEDERATED


@pytest.fixture(scope="module")
def cas(tmp_path_factory) -> tuple[FlowerTLS, FlowerTLS]:
    """Two throw-away CAs, each with a server certificate for 127.0.0.1."""
    root = tmp_path_factory.mktemp("tls")
    return throwaway_tls(root / "a"), throwaway_tls(root / "b")


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:99999", "--flower-server must be HOST:PORT with a port in 1..65535"),
    ("localhost", "--flower-server must be HOST:PORT"),
    ("0.0.0.0:{free}", "--flower-server 0.0.0.0:{free} takes clients from other machines; "
                       "in plaintext"),
    ("127.0.0.1:{busy}", "--flower-server 127.0.0.1:{busy}: cannot listen there (the port "
                         "is in use)"),
])
def test_a_server_address_it_cannot_serve_on_is_refused_before_the_run(
        gin_file, in_tmp: Path, capsys, address: str, message: str) -> None:
    gin_file(FEDERATED)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"busy": busy.getsockname()[1], "free": free_ports(1)[0]}
        status = main(["run", "exp.gin", "--flower-server", address.format(**ports)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("lmt: error: " + message.format(**ports))
    assert all_runs(in_tmp) == []  # no MLflow run was started, so none is left RUNNING


def test_server_files_are_checked_in_one_line(cas) -> None:
    mine, other = cas
    mine.server_credentials()  # the throw-away CA signed its server certificate
    with pytest.raises(LmtError, match=r"^--tls-cert \(FlowerTLS.server_certificate\) .* is "
                                       r"not signed by the CA in"):
        FlowerTLS(other.ca_certificate, mine.server_certificate,
                  mine.server_key).server_credentials()
    with pytest.raises(LmtError, match=r"^--tls-key \(FlowerTLS.server_key\) .* is not the "
                                       r"key of the certificate"):
        FlowerTLS(mine.ca_certificate, mine.server_certificate,
                  other.server_key).server_credentials()
    with pytest.raises(LmtError, match="missing: --tls-key"):
        FlowerTLS(mine.ca_certificate, mine.server_certificate).server_credentials()
    with pytest.raises(LmtError, match=r"^--tls-ca .* holds no PEM certificate"):
        FlowerTLS(mine.server_key).root_certificate()


def test_plaintext_is_for_loopback_only_unless_asked_for(cas) -> None:
    mine, _ = cas
    assert secured("127.0.0.1:8080", FlowerTLS(), insecure=False, server=True) is None
    assert secured("localhost:8080", FlowerTLS(), insecure=False, server=False) is None
    for server in (True, False):
        with pytest.raises(LmtError, match="or --insecure to accept plaintext"):
            secured("10.1.2.3:8080", FlowerTLS(), insecure=False, server=server)
        assert secured("10.1.2.3:8080", FlowerTLS(), insecure=True, server=server) is None
    assert secured("0.0.0.0:8080", mine, insecure=False, server=True) == mine
    with pytest.raises(LmtError, match="--insecure turns TLS off, but TLS files are set"):
        secured("10.1.2.3:8080", FlowerTLS(mine.ca_certificate), insecure=True, server=False)


def _client(address: str, root: bytes | None) -> threading.Thread:
    """Flower's own client (not lmt's, which checks the handshake first), trying for 3 s."""

    class Empty(flwr.client.NumPyClient):
        def get_parameters(self, config: dict) -> list:
            return []

    thread = threading.Thread(target=flwr.client.start_client, daemon=True, kwargs=dict(
        server_address=address, client=Empty().to_client(), root_certificates=root,
        insecure=root is None, max_wait_time=3))
    thread.start()
    return thread


def test_flowers_server_with_tls_admits_only_clients_that_trust_its_ca(cas) -> None:
    """No client authentication in Flower's legacy API: what TLS keeps out is a client
    in plaintext and one that does not trust the server's CA."""
    mine, other = cas
    address = f"127.0.0.1:{free_ports(1)[0]}"
    clients = SimpleClientManager()
    server = start_grpc_server(client_manager=clients, server_address=address,
                               certificates=mine.server_credentials())
    try:
        for root in (None, other.root_certificate()):
            _client(address, root).join(30)
            assert clients.num_available() == 0
        admitted = _client(address, mine.root_certificate())
        assert clients.wait_for(1, timeout=30)
        for proxy in list(clients.all().values()):  # as Flower's server ends: the client leaves
            with contextlib.suppress(GrpcBridgeClosed):  # it may go before it answers
                proxy.reconnect(flwr.common.ReconnectIns(seconds=None), timeout=10,
                                group_id=None)
        admitted.join(30)
    finally:
        server.stop(grace=None)


def test_lmts_client_says_at_once_why_a_server_is_refused(cas) -> None:
    mine, other = cas
    address = f"127.0.0.1:{free_ports(1)[0]}"
    server = start_grpc_server(client_manager=SimpleClientManager(), server_address=address,
                               certificates=mine.server_credentials())
    split = Split(np.zeros((3, 2), np.float32), np.zeros(3, np.int64))
    try:
        with pytest.raises(LmtError, match=f"the Flower server at {address} speaks TLS: give "
                                           f"the CA certificate"):
            run_client(None, split, 0, 0, address, lambda _: None)
        with pytest.raises(LmtError, match=f"the Flower server at {address} presented a "
                                           f"certificate that --tls-ca does not verify"):
            run_client(None, split, 0, 0, address, lambda _: None,
                       FlowerTLS(other.ca_certificate))
    finally:
        server.stop(grace=None)
