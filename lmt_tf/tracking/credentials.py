"""Passwords in tracking URIs are used, never shown: redaction for output, params, tags,
config files and error messages. Everything an ``lmt`` process prints goes through
``redacted_output``: its own lines, MLflow's, warnings, tracebacks."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from lmt_tf.errors import LmtError

# scheme://user:password@ and scheme://token@ (user info without a colon: a token).
_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]+):[^@\s/'\"]+@")
_TOKEN = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@'\"*]+@")


def secret(uri: str) -> str | None:
    """The secret of ``uri``'s user info: its password, or the whole user info where it
    has no password (``http://TOKEN@host``); None without user info."""
    netloc = urllib.parse.urlsplit(uri).netloc
    if "@" not in netloc:
        return None
    userinfo = netloc.rpartition("@")[0]
    user, colon, password = userinfo.partition(":")
    return password if colon else user


def redact_uri(uri: str) -> str:
    """``uri`` with any password (or token) replaced by ``***``: ``http://user:***@host``,
    ``http://***@host``."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return parts._replace(netloc=f"{shown}@{host}").geturl()


def redact_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it, and
    every token of a ``scheme://token@host``, replaced by ``***``: for params, tags and
    config files logged with a run."""
    return _TOKEN.sub(r"\1***@", _PASSWORD.sub(r"\1:***@", text))


def redact(text: str, uri: str) -> str:
    """``text`` with the secret of ``uri`` (if any: see ``secret``) replaced by ``***``."""
    hidden = secret(uri)
    if not hidden:
        return text
    for value in {hidden, urllib.parse.unquote(hidden)}:
        text = text.replace(value, "***")
    return text


def check_uri(uri: str) -> str:
    """Returns ``uri`` if its user info can be read as it was meant.

    Raises:
      LmtError: where a password or token holds a character that ends the user info
        unencoded ('/', '#', '?'): the URI would be read as another host or port.
        The message shows the host, never the secret.
    """
    if "://" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    rest = uri.split("://", 1)[1][len(parts.netloc):]
    try:
        parts.port  # noqa: B018 (parsing it is the check)
        readable = "@" not in rest
    except ValueError:
        readable = False
    if readable:
        return uri
    host = uri.rpartition("@")[2].split("/", 1)[0] if "@" in uri else "?"
    raise LmtError(f"the tracking URI {parts.scheme}://***@{host} has a '/', '#' or '?' in "
                   f"its password or token that must be percent-encoded (e.g. "
                   f"urllib.parse.quote(password, safe=''))")


def error_line(error: BaseException, uri: str) -> str:
    """The first line of ``error``'s message (its type's name if it has none), without
    the password of ``uri``: what a store's error adds to lmt's one line."""
    text = str(error).strip()
    return redact(text.splitlines()[0] if text else type(error).__name__, uri)


_SECRETS: set[str] = set()  # passwords of the tracking URIs this process has used
# user:password@ after a scheme, also where a file path collapsed its "//" to "/"
_PRINTED_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*:/+[^/\s:@'\"]+):[^@\s/'\"]+@")
_SHORTEST_SECRET = 4  # a shorter one is redacted only where it sits in a URI


def remember(uri: str | None) -> None:
    """Keeps the password of ``uri`` (if any), so that ``redact_output`` hides it also
    where it does not appear as part of a URI (a URL-decoded form, an echoed setting)."""
    hidden = secret(uri) if uri and "://" in uri else None
    for value in {hidden or "", urllib.parse.unquote(hidden or "")}:
        if len(value) >= _SHORTEST_SECRET:
            _SECRETS.add(value)


def redact_output(text: str) -> str:
    """``text`` as an ``lmt`` process may print it: the password of every
    ``scheme://user:password@host`` and every remembered password replaced by ``***``."""
    text = _PRINTED_CREDENTIALS.sub(r"\1:***@", redact_credentials(text))
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class RedactedStream:
    """A text stream that writes through ``redact_output``; anything else it is asked
    (``isatty``, ``fileno``, ``flush``, ``encoding``) is the wrapped stream's."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact_output(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """Within it, ``sys.stdout`` and ``sys.stderr`` redact what is written to them (the
    passwords of MLflow's variables and of every URI ``remember``ed)."""
    remember(os.environ.get("MLFLOW_TRACKING_URI"))
    for variable in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        secret = os.environ.get(variable, "")
        if len(secret) >= _SHORTEST_SECRET:
            _SECRETS.add(secret)
    saved = sys.stdout, sys.stderr
    # (None where the stream is closed, `lmt run >&-`: print() then writes nothing)
    sys.stdout, sys.stderr = (None if stream is None else RedactedStream(stream)
                              for stream in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
