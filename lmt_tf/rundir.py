"""The working directory of one run: checkpoints, exports, and the state that lets
``--resume`` find the checkpoint and re-attach to the same MLflow run.

Layout: ``<work_dir>/<experiment>/<run name>/{checkpoints,export,state.json}`` and
``<work_dir>/<experiment>/LATEST`` naming the newest run that has a checkpoint (a run
that failed before its first checkpoint never becomes the one ``--resume`` picks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmt_tf.errors import ConfigError, LmtError

LATEST = "LATEST"
OWNER_LOCK = "owner.lock"  # held by the process that writes the run (RunDir.owned)
# Experiment and run names become directory names: one path component, no tricks.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}")


def check_name(name: str, setting: str) -> str:
    """Returns ``name`` if it is usable as one directory name.

    Raises:
      ConfigError: for a name with a path separator, ``..``, or other characters that
        could place files outside the work directory.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"{setting} must be 1-128 letters, digits and _.+=- (not "
                          f"starting with . or -, no '..'), got {name!r}")
    return name


def safe_name(text: str, limit: int = 128) -> str:
    """``text`` made into one directory name of at most ``limit`` (>= 16) characters, for
    paths built from a name that may be anything (an MLflow experiment name, which may
    hold ``/``): ``text`` itself where ``check_name`` accepts it and it fits; else its
    letters, digits and ``_.+=-`` (any other character as ``_``), cut to fit, and a hash
    of the whole ``text``, so that different names stay apart."""
    if len(text) <= limit and _NAME.fullmatch(text) and ".." not in text:
        return text
    slug = re.sub(r"[^A-Za-z0-9_.+=-]", "_", text).replace("..", "__").lstrip(".-")
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    slug = slug[: limit - len(digest) - 1]
    return check_name(f"{slug}-{digest}" if slug else digest, "a name")


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "export"

    def read_state(self) -> dict[str, Any]:
        file = self.path / "state.json"
        return json.loads(file.read_text()) if file.is_file() else {}

    def update_state(self, **values: Any) -> None:
        """Merges ``values`` into state.json, atomically (a crash leaves the old file)."""
        state = {**self.read_state(), **values}
        _write_atomically(self.path / "state.json", json.dumps(state, indent=2, sort_keys=True))

    def mark_latest(self) -> None:
        """Makes this the run that a plain ``--resume`` of its experiment continues."""
        _write_atomically(self.path.parent / LATEST, self.name + "\n")

    @contextlib.contextmanager
    def owned(self) -> Iterator[None]:
        """This process owns the run while inside: one writer at a time, so that two
        ``--resume`` of one run cannot both continue it. The lock is the kernel's
        (``flock`` on ``owner.lock``), released whenever the process ends, even on
        SIGKILL; where the file system offers no locks, nothing is checked.

        Raises:
          LmtError: if another process owns the run, naming it.
        """
        file = self.path / OWNER_LOCK
        with open(file, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise LmtError(f"run {self.name} is in use by {owner}; wait for it to "
                               f"end (or stop it) before continuing this run") from None
            except OSError:  # no locks on this file system
                yield
                return
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            try:
                yield
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(file: Path, text: str) -> None:
    # A scratch file of this writer's own: runs of one experiment side by side (a
    # sweep's parallel trials) all mark LATEST.
    tmp = file.with_name(f"{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _experiment_root(work_dir: str | Path, experiment: str) -> Path:
    return Path(work_dir) / check_name(experiment, "run_experiment.name")


def new_run_dir(work_dir: str | Path, experiment: str, name: str | None = None) -> RunDir:
    """Creates a fresh run directory: ``name``, or a timestamped one.

    Raises:
      LmtError: if the directory cannot be made, or a run called ``name`` exists.
    """
    root = _experiment_root(work_dir, experiment)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if name is not None:
            path = root / check_name(name, "--run-name")
            if path.exists():
                raise LmtError(f"run {name!r} of {experiment!r} exists in {root}; continue it "
                               f"with --resume, or choose another --run-name")
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path, n = root / f"{experiment}-{stamp}", 1
            while path.exists():
                n += 1
                path = root / f"{experiment}-{stamp}-{n}"
        path.mkdir()
    except OSError as e:
        raise LmtError(f"cannot create a run directory in {root} ({e.strerror})") from e
    return RunDir(path)


def find_run_dir(work_dir: str | Path, experiment: str, name: str | None = None) -> RunDir:
    """The run directory that ``--resume`` continues: run ``name``, else the latest run of
    ``experiment`` that has a checkpoint.

    Raises:
      LmtError: if there is no such run under ``work_dir``.
    """
    root = _experiment_root(work_dir, experiment)
    if name is not None:
        path = root / check_name(name, "--run-name")
        if not path.is_dir():
            raise LmtError(f"nothing to resume: no run {name!r} of {experiment!r} in {root}")
        return RunDir(path)
    marker = root / LATEST
    if not marker.is_file():
        raise LmtError(f"nothing to resume: no earlier run of {experiment!r} with a "
                       f"checkpoint in {root}")
    path = root / marker.read_text().strip()
    if not path.is_dir():
        raise LmtError(f"nothing to resume: {path} (named by {marker}) is missing")
    return RunDir(path)
