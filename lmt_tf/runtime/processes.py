"""Child processes, each in a process group of its own: started with their output
prefixed by their names (or written to a log file), supervised, and stopped so that none
is left running, also when this process is killed (each child watches it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.process import EXIT_INTERRUPTED, EXIT_TIMEOUT, PARENT_PID_ENV

POLL_SECONDS = 0.2
GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Task:
    """A child's name: its kind (``worker``, ``client``, ``trial``, ...) and number."""

    task_type: str
    task_id: int

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.task_id}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class ProcessGroup:
    """Named processes, each in a process group of its own, their output prefixed with
    their names or written to a log file each; ``stop`` leaves none running."""

    def __init__(self, echo: Callable[[str], None], echo_error: Callable[[str], None]):
        self.processes: dict[Task, subprocess.Popen] = {}
        lock = threading.Lock()

        def locked(sink: Callable[[str], None]) -> Callable[[str], None]:
            def write(line: str) -> None:
                with lock:  # whole lines, from the pumps' threads and the caller's
                    sink(line)
            return write

        self.echo, self._echo_error = locked(echo), locked(echo_error)
        self._pumps: list[threading.Thread] = []

    def start(self, task: Task, command: Sequence[str], environment: dict[str, str],
              where: str | None = None, log: Path | None = None) -> subprocess.Popen:
        """Starts ``command`` as ``task`` in a session of its own, with this process's
        environment and ``environment`` (unbuffered output), no standard input.

        Args:
          task: the child's name (it prefixes its output lines).
          command: the command line.
          environment: variables set for the child on top of this process's.
          where: where the child serves, for a line saying it started; None: no line.
          log: a file for its output and errors instead of prefixed lines.
        """
        env = child_environment(environment)
        if log is not None:
            with log.open("w") as out:
                process = subprocess.Popen(
                    list(command), env=env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)
        else:
            process = subprocess.Popen(
                list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        self.processes[task] = process
        if where is not None:
            self.echo(f"lmt launch: started {task.name} at {where} (pid {process.pid})")
        if log is None:
            for stream, sink in ((process.stdout, self.echo),
                                 (process.stderr, self._echo_error)):
                pump = threading.Thread(target=self._pump, args=(task, stream, sink),
                                        daemon=True)
                pump.start()
                self._pumps.append(pump)
        return process

    @staticmethod
    def _pump(task: Task, stream: Iterable[str], echo: Callable[[str], None]) -> None:
        for line in stream:
            echo(f"[{task.name}] {line.rstrip()}")

    def supervise(self, outcome: Callable[[], int | None], timeout: float,
                  on_timeout: str) -> int:
        """Polls ``outcome`` (the job's exit status once decided, else None) until it
        decides, ``timeout`` seconds pass (0: none; says ``on_timeout``, returns 124) or
        Ctrl-C/SIGTERM (130); then stops every process still running."""
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while True:
                status = outcome()
                if status is not None:
                    return status
                if deadline and time.monotonic() > deadline:
                    self.echo(on_timeout)
                    return EXIT_TIMEOUT
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            # Stopping the processes sends them SIGTERM, on which a training task saves a
            # checkpoint at a step they agree on and ends the run KILLED.
            return EXIT_INTERRUPTED
        finally:
            self.stop()

    def signal_all(self, signum: int) -> None:
        signal_groups(self.processes.values(), signum)

    def stop(self) -> None:
        """Stops every task still running (see ``stop_process_groups``) and its output."""
        stop_process_groups(list(self.processes.values()))
        for pump in self._pumps:
            pump.join(timeout=5)


# Runs `python -m MODULE ARGS` once it watches its parent (process.watch_parent): for
# children that are no lmt process (the MLflow server of lmt ui, lmt tensorboard's).
_WATCHED = ("import runpy, sys; from lmt_tf.process import watch_parent; watch_parent(); "
            "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', "
            "alter_sys=True)")


def watched_module(module: str, *args: str) -> list[str]:
    """The command line of ``python -m module args`` (this interpreter) in a process that
    stops, with its own children, when the process that started it with
    ``child_environment`` is gone, even killed with SIGKILL."""
    return [sys.executable, "-c", _WATCHED, module, *args]


def child_environment(environment: dict[str, str]) -> dict[str, str]:
    """A child's environment: this process's, ``environment``, unbuffered output, and
    this process's pid, which an ``lmt`` child watches (``process.watch_parent``) so as
    to stop when this process is gone, even if killed with SIGKILL."""
    return {**os.environ, **environment, "PYTHONUNBUFFERED": "1",
            PARENT_PID_ENV: str(os.getpid())}


def signal_groups(processes: Iterable[subprocess.Popen], signum: int) -> None:
    """Sends ``signum`` to the process group of each process still running."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)


def stop_process_groups(processes: Sequence[subprocess.Popen],
                        grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to the process group of each process still running, SIGKILL after
    ``grace`` seconds; reaps them all."""
    signal_groups(processes, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(POLL_SECONDS)
    signal_groups(processes, signal.SIGKILL)
    for process in processes:
        process.wait()
