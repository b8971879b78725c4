"""Who owns an MLflow run, whether that owner is still alive, and ending the runs of
owners that are gone.

A process killed by a signal it cannot catch (SIGKILL, an abort inside a native library,
the machine going down) cannot end its run, so every run records its owner and a
heartbeat in tags. Any later ``lmt`` command on the same store ends runs whose owner is
gone as KILLED, with a tag saying how that was found:

- on the owner's own host (same host name and PID namespace): the owner is gone when its
  pid no longer exists or now belongs to a process started at another time;
- elsewhere: when its heartbeat is older than ``STALE_SECONDS``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

HEARTBEAT_SECONDS = 30.0  # how often a live run's heartbeat tag is refreshed
STALE_SECONDS = 300.0  # a run on another host whose heartbeat is older than this is gone

OWNER_HOST = "lmt.owner.host"
OWNER_PID = "lmt.owner.pid"
OWNER_PID_NS = "lmt.owner.pid_namespace"
OWNER_STARTED = "lmt.owner.process_start"  # the pid's start time, so a reused pid differs
HEARTBEAT = "lmt.heartbeat"  # seconds since the epoch, refreshed while the run is live
ENDED_BY = "lmt.ended_by"  # how a run ended by someone other than its owner was found


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), ``""`` where
    the system does not tell, or None if there is no such process."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (a one-line read)
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # Field 22 (starttime), counted after the command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_tags() -> dict[str, str]:
    """Tags naming this process as a run's owner, with a first heartbeat."""
    pid = os.getpid()
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(pid),
            OWNER_PID_NS: _pid_namespace(), OWNER_STARTED: process_start(pid) or "",
            HEARTBEAT: f"{time.time():.0f}"}


def owner_gone(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why the owner recorded in ``tags`` is gone, or None if it may still be alive (or
    the run has no lmt owner: runs made by other tools are never touched)."""
    if OWNER_PID not in tags:
        return None
    host, pid = tags.get(OWNER_HOST, ""), int(tags[OWNER_PID])
    if host == socket.gethostname() and tags.get(OWNER_PID_NS, "") == _pid_namespace():
        started = process_start(pid) if _pid_exists(pid) else None
        if started is None:
            return f"owner process {pid} on {host} no longer exists"
        if started and tags.get(OWNER_STARTED) and started != tags[OWNER_STARTED]:
            return f"owner process {pid} on {host} has exited (the pid now names another)"
        return None
    beat = float(tags.get(HEARTBEAT, "0") or 0)
    silent = (now if now is not None else time.time()) - beat
    if silent > STALE_SECONDS:
        return f"owner process {pid} on {host} sent no heartbeat for {silent:.0f} s"
    return None


def end_orphans(client: Any, found_by: str,
                  echo: Callable[[str], None] | None = None) -> list[str]:
    """Ends every RUNNING run in the store of ``client`` (an ``MlflowClient``) whose owner
    is gone, as KILLED, tagged with how it was found. Returns their run ids.

    Args:
      client: an MlflowClient on the store to look through.
      found_by: what is looking, for the tag (e.g. ``lmt run, pid 123``).
      echo: where to say which runs were ended.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    ended = []
    running = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'",
                                 max_results=1000)
    for run in running:
        reason = owner_gone(run.data.tags)
        if reason is None:
            continue
        client.set_tag(run.info.run_id, ENDED_BY, f"{reason}; found by {found_by}")
        beat = float(run.data.tags.get(HEARTBEAT, "0") or 0)
        end_time = int(beat * 1000) if beat else None
        client.set_terminated(run.info.run_id, "KILLED", end_time=end_time)
        ended.append(run.info.run_id)
        if echo:
            echo(f"lmt: marked run {run.info.run_id} ({run.info.run_name}) KILLED: {reason}")
    return ended


class Heartbeat:
    """Refreshes a run's heartbeat tag every ``interval`` seconds from a daemon thread,
    off the training loop; a failed write is retried at the next beat."""

    def __init__(self, beat: Callable[[str], None], interval: float = HEARTBEAT_SECONDS):
        self._beat = beat
        self._interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmt-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            with contextlib.suppress(Exception):
                self._beat(f"{time.time():.0f}")

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval)
