"""Passwords in tracking URIs are used, never shown: redaction for output, params, tags,
config files and error messages."""

from __future__ import annotations

import re
import urllib.parse

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
