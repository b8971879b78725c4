"""A network namespace of a local job's own, so that its tasks' gRPC servers cannot be
reached from other hosts.

TensorFlow's servers listen on every interface (``[::]:port``) whatever address the
cluster spec names, and have no authentication. ``lmt launch`` therefore starts its
tasks inside a fresh network namespace that holds only a loopback interface: the tasks
reach each other on 127.0.0.1, and nothing outside the namespace reaches them. A small
holder process keeps the namespace alive (``unshare``, with a user namespace when not
root, so no privileges are needed where the kernel allows unprivileged user
namespaces); tasks join it with ``nsenter``. Both are util-linux tools.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys

from lmt_tf.errors import LmtError

READY_TIMEOUT = 10.0  # seconds for the holder to bring its loopback up

# Brings the namespace's loopback interface up (SIOCGIFFLAGS / SIOCSIFFLAGS with
# IFF_UP; the kernel then gives it 127.0.0.1 and ::1), says so, and waits to be ended, or
# for its parent (the launcher, argv[1]) to be gone however it ended (SIGKILL included).
_HOLDER = """
import fcntl, os, socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, struct.pack("16sH14s", b"lo", 0, b"")))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 1, b""))
print("ready", flush=True)
while os.getppid() == int(sys.argv[1]):
    time.sleep(1)
"""


def unavailable() -> str | None:
    """Why a job namespace cannot be made on this machine, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are a Linux feature"
    missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} (util-linux) not found"
    return None


class JobNamespace:
    """A network namespace with only loopback, alive until ``close``."""

    def __init__(self) -> None:
        reason = unavailable()
        if reason:
            raise LmtError(f"cannot isolate the job's network: {reason}; run with "
                           f"--network host to use this machine's network instead")
        self._user = os.geteuid() != 0  # unprivileged: a user namespace owns the net one
        command = ["unshare", "--net", *(["--map-root-user"] if self._user else []), "--",
                   sys.executable, "-c", _HOLDER, str(os.getpid())]
        self._holder = subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        text=True, start_new_session=True)
        ready = False
        if select.select([self._holder.stdout], [], [], READY_TIMEOUT)[0]:
            ready = self._holder.stdout.readline().strip() == "ready"
        if not ready:
            if self._holder.poll() is None:
                self._holder.kill()
            self._holder.wait()
            error = (self._holder.stderr.read() or "").strip().splitlines()
            self.close()
            detail = error[-1] if error else f"exit status {self._holder.returncode}"
            raise LmtError(f"cannot isolate the job's network ({detail}); run with "
                           f"--network host to use this machine's network instead")

    def command(self, command: list[str]) -> list[str]:
        """``command`` run inside the namespace (same pid: nsenter execs it)."""
        enter = ["nsenter", f"--target={self._holder.pid}", "--net"]
        if self._user:
            enter += ["--user", "--preserve-credentials"]
        return [*enter, "--", *command]

    def close(self) -> None:
        if self._holder.poll() is None:
            self._holder.kill()
        self._holder.wait()
        for stream in (self._holder.stdout, self._holder.stderr):
            stream.close()

    def __enter__(self) -> JobNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
