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

_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]+):[^@\s/'\"]+@")


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (``http://user:***@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.netloc.rpartition("@")[0].split(":", 1)[0]
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def redact_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it
    replaced by ``***``: for params, tags and config files logged with a run."""
    return _CREDENTIALS.sub(r"\1:***@", text)


def redact(text: str, uri: str) -> str:
    """``text`` with the password of ``uri`` (if any) replaced by ``***``."""
    password = urllib.parse.urlsplit(uri).password
    if not password:
        return text
    for secret in {password, urllib.parse.unquote(password)}:
        text = text.replace(secret, "***")
    return text


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
    password = urllib.parse.urlsplit(uri or "").password if uri and "://" in uri else None
    for secret in {password or "", urllib.parse.unquote(password or "")}:
        if len(secret) >= _SHORTEST_SECRET:
            _SECRETS.add(secret)


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
