"""How the processes of a Flower deployment reach each other: the server's address
(checked, and its port bound once, before anything is built), TLS (``FlowerTLS``: the
certificate the server presents and the CA its clients trust it by; a throw-away CA for
``lmt federate``), and the rule that only loopback traffic is plaintext unless asked.

TLS here is what Flower's legacy gRPC API offers: it encrypts the traffic and lets a
client verify the server. It does not authenticate clients: that API has no client
certificates or keys (``require_client_auth`` is off, and ``start_client``'s
``authentication_keys`` are ignored on its transport).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmt_tf.checks import check_types
from lmt_tf.errors import LmtError

# How each file is set, for messages: a flag of `lmt run` / `lmt flower-client`, or gin.
_SETTINGS = {"ca_certificate": "--tls-ca (FlowerTLS.ca_certificate)",
             "server_certificate": "--tls-cert (FlowerTLS.server_certificate)",
             "server_key": "--tls-key (FlowerTLS.server_key)"}


@dataclass(frozen=True)
class FlowerTLS:
    """TLS of a Flower deployment, as PEM files. The server needs all three; a client
    only the CA certificate. Flags of ``lmt run --flower-server`` and ``lmt
    flower-client`` (``--tls-ca``, ``--tls-cert``, ``--tls-key``) override these."""

    ca_certificate: str | None = None  # the CA (or CAs) that signed the server's certificate
    server_certificate: str | None = None  # the server's certificate (its chain, leaf first)
    server_key: str | None = None  # the private key of that certificate, unencrypted

    def __post_init__(self) -> None:
        check_types(self)

    @property
    def given(self) -> bool:
        return any(dataclasses.astuple(self))

    def overridden_by(self, other: FlowerTLS) -> FlowerTLS:
        """These settings with each file ``other`` names instead."""
        return dataclasses.replace(self, **{k: v for k, v in dataclasses.asdict(other).items()
                                            if v is not None})

    def server_credentials(self) -> tuple[bytes, bytes, bytes]:
        """(CA certificate, server certificate, server key) as Flower's server takes them,
        checked: each is PEM, the server's certificate is signed by the CA and the key is
        its own.

        Raises:
          LmtError: naming the setting and the file.
        """
        missing = [_SETTINGS[k] for k, v in dataclasses.asdict(self).items() if v is None]
        if missing:
            raise LmtError("a Flower server with TLS needs a CA certificate, its own "
                           "certificate and key; missing: " + ", ".join(missing))
        from cryptography.hazmat.primitives import serialization

        ca, cas = self._certificates("ca_certificate")
        chain, leaves = self._certificates("server_certificate")
        key_bytes = _read(self.server_key, "server_key")
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
        except (ValueError, TypeError) as e:
            raise LmtError(f"{_SETTINGS['server_key']} {self.server_key!r} is not an "
                           f"unencrypted PEM private key ({_first_line(e)})") from e
        if _public(key) != _public(leaves[0]):
            raise LmtError(f"{_SETTINGS['server_key']} {self.server_key!r} is not the key "
                           f"of the certificate {self.server_certificate!r}")
        if not _issued_by(leaves[-1], cas):
            raise LmtError(f"{_SETTINGS['server_certificate']} {self.server_certificate!r} "
                           f"is not signed by the CA in {self.ca_certificate!r}: clients "
                           f"would refuse the server")
        return ca, chain, key_bytes

    def root_certificate(self) -> bytes:
        """The CA certificate(s) a client verifies the server by (PEM, checked).

        Raises:
          LmtError: if it is not set, or not a PEM certificate.
        """
        if self.ca_certificate is None:
            raise LmtError(f"a Flower client with TLS needs {_SETTINGS['ca_certificate']}")
        return self._certificates("ca_certificate")[0]

    def _certificates(self, field: str) -> tuple[bytes, list[Any]]:
        from cryptography import x509

        path = getattr(self, field)
        data = _read(path, field)
        try:
            return data, x509.load_pem_x509_certificates(data)
        except ValueError as e:
            raise LmtError(f"{_SETTINGS[field]} {path!r} holds no PEM certificate") from e


def split_address(address: str, setting: str) -> tuple[str, int]:
    """The host and port of ``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:8080``).

    Raises:
      LmtError: naming ``setting`` for anything else.
    """
    host, colon, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if (not colon or not host or (":" in host and not bracketed) or not port.isdigit()
            or not 1 <= int(port) <= 65535):
        raise LmtError(f"{setting} must be HOST:PORT with a port in 1..65535 (an IPv6 host "
                       f"in brackets: [::1]:8080), got {address!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback: traffic to it never leaves it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: assume it may be another machine


def secured(address: str, tls: FlowerTLS, insecure: bool, server: bool) -> FlowerTLS | None:
    """The TLS a Flower server (``server``) or client on ``address`` uses, its files read
    and checked; None: plaintext, which only loopback gets unless ``insecure``.

    Raises:
      LmtError: for a bad address; a file that is missing or not what it should be;
        plaintext beyond loopback without ``--insecure``; ``--insecure`` with TLS files.
    """
    setting = "--flower-server" if server else "--server"
    host, _ = split_address(address, setting)
    if insecure and tls.given:
        raise LmtError("--insecure turns TLS off, but TLS files are set ("
                       + ", ".join(_SETTINGS[k] for k, v in dataclasses.asdict(tls).items()
                                   if v is not None) + ")")
    if tls.given:
        if server:
            tls.server_credentials()
        else:
            tls.root_certificate()
        return tls
    if not insecure and not is_loopback(host):
        where, needs = (("takes clients from other machines",
                         "--tls-ca, --tls-cert and --tls-key (or FlowerTLS in gin)") if server
                        else ("may be another machine", "--tls-ca (the CA certificate that "
                                                        "signed the server's)"))
        raise LmtError(f"{setting} {address} {where}; in plaintext anyone on the way could "
                       f"read the model and change it: give {needs}, or --insecure to "
                       f"accept plaintext")
    return None


def check_listen(address: str, setting: str = "--flower-server") -> None:
    """Raises LmtError unless this machine can listen on ``address`` now (its host is
    one of this machine's addresses and its port is free). The port is bound for a
    moment, never listened on."""
    host, port = split_address(address, setting)
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise LmtError(f"{setting} {address}: unknown host {host!r} ({e.strerror})") from e
    with socket.socket(family, kind, proto) as probe:
        # As a server binds: a port whose last connections are closing (TIME_WAIT) is
        # free; one that a process listens on (even with SO_REUSEPORT, as gRPC) is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as e:
            reason = ("the port is in use" if e.errno == errno.EADDRINUSE
                      else e.strerror or str(e))
            raise LmtError(f"{setting} {address}: cannot listen there ({reason})") from e


def throwaway_tls(directory: Path, days: int = 1) -> FlowerTLS:
    """A CA made for one deployment on this machine and a server certificate it signed
    for 127.0.0.1 and localhost, written to ``directory``. The CA's key is never written:
    nothing else can be signed by it.

    Returns:
      The files, as the server's settings (clients take ``ca_certificate``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: Any, issuer: x509.Name, signer: Any,
                    extensions: list[tuple[Any, bool]]) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       signer.public_key()), critical=False))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lmt federate throw-away CA")])
    ca = certificate("lmt federate throw-away CA", ca_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       key_cert_sign=True, crl_sign=True, encipher_only=False,
                       decipher_only=False), True)])
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = certificate("127.0.0.1", server_key, ca_name, ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                      x509.DNSName("localhost")]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    files = {"ca.pem": ca.public_bytes(pem), "server.pem": server.public_bytes(pem),
             "server.key": server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption())}
    for name, data in files.items():
        path = directory / name
        path.touch(mode=0o600)
        path.write_bytes(data)
    return FlowerTLS(str(directory / "ca.pem"), str(directory / "server.pem"),
                     str(directory / "server.key"))


def _read(path: str | None, field: str) -> bytes:
    try:
        return Path(str(path)).read_bytes()
    except OSError as e:
        raise LmtError(f"{_SETTINGS[field]} {path!r}: {e.strerror or e}") from e


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _public(holder: Any) -> bytes:
    """The DER public key of a certificate or a private key."""
    from cryptography.hazmat.primitives import serialization

    return holder.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(certificate: Any, cas: list[Any]) -> bool:
    """Whether ``certificate`` is one of ``cas`` or signed by one of them."""
    from cryptography.exceptions import InvalidSignature

    for ca in cas:
        if certificate == ca:
            return True
        try:
            certificate.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):  # another issuer or key type
            continue
    return False
