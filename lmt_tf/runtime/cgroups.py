"""The kernel's memory cgroups as ``lmt launch`` uses them to cap each task: one group per
task under one group per job, each task placed in its group before it allocates
anything, its peak and its OOM kills read back, every group removed afterwards.

cgroup v1 (a ``memory`` hierarchy) and v2 (the unified hierarchy with the ``memory``
controller) are both read; whichever holds the memory controller is used. Under v1 the
job's group is made inside the launcher's own memory group, under v2 beside it (v2 allows
no processes in a group whose children have controllers, and the launcher lives in its
own): either way every limit the launcher runs under still applies to its tasks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.liveness import process_start

JOB_PREFIX = "lmt-job-"
REMOVE_SECONDS = 5.0  # for a group whose last process is still being torn down
# After a launcher killed with SIGKILL, its tasks stop on their own (each watches its
# parent: SIGTERM, then SIGKILL after process.ORPHAN_GRACE_SECONDS); the job's groups are
# removed by the watcher below once they are empty, or given up on after this long.
ORPHAN_CLEANUP_SECONDS = 180.0

# File names per version: the limit, the peak usage, OOM kills.
_FILES = {
    1: {"limit": "memory.limit_in_bytes", "peak": "memory.max_usage_in_bytes",
        "swap": "memory.memsw.limit_in_bytes", "events": "memory.oom_control"},
    2: {"limit": "memory.max", "peak": "memory.peak", "swap": "memory.swap.max",
        "events": "memory.events"},
}

# The first thing a capped task runs: it writes its own pid into its group's
# cgroup.procs and only then execs the task (same pid), so everything the task ever
# allocates is charged to its group. (A write by the launcher after the start would race
# with the task's first allocations; a preexec_fn is unsafe in a process with threads,
# as the launcher's output pumps are.)
_ENTER = 'echo $$ > "$1" && shift && exec "$@"'

# Removes a job's groups once the launcher (argv[1]) is gone however it ended, SIGKILL
# included, as soon as their tasks have left them; ends at once if the launcher removed
# them itself. It stays in the launcher's own group, outside the job's.
_WATCHER = """
import os, sys, time
from pathlib import Path
launcher, job, patience = int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
while job.exists() and os.getppid() == launcher:
    time.sleep(0.5)
deadline = time.monotonic() + patience
while job.exists() and time.monotonic() < deadline:
    for group in [*(d for d in job.iterdir() if d.is_dir()), job]:
        try:
            group.rmdir()
        except OSError:
            pass
    time.sleep(1)
"""


@dataclass(frozen=True)
class Hierarchy:
    """Where the memory controller is mounted and which of its groups a process is in."""

    version: int  # 1 or 2
    mount: Path  # the hierarchy's mount point
    own: Path  # the process's group (a directory under ``mount``)

    def file(self, directory: Path, what: str) -> Path:
        """``directory``'s file for ``what``: ``limit``, ``peak``, ``swap``, ``events``."""
        return directory / _FILES[self.version][what]

    def read(self, directory: Path, what: str) -> int | None:
        """A number file of ``directory`` (``limit``, ``peak``); None if absent, or for v2's
        ``max`` (no limit)."""
        try:
            text = self.file(directory, what).read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def oom_kills(self, directory: Path) -> int:
        """Processes of ``directory`` killed by the OOM killer (``oom_kill`` in v1's
        ``memory.oom_control``, v2's ``memory.events``)."""
        with contextlib.suppress(OSError, ValueError):
            for line in self.file(directory, "events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0


def memory_hierarchy(pid: int | str = "self") -> Hierarchy | None:
    """The memory controller's hierarchy and ``pid``'s group in it, or None where
    neither version's memory controller is mounted (or ``/proc`` does not tell)."""
    try:
        groups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    except OSError:
        return None
    v1 = {}
    for line in groups:
        number, controllers, path = line.split(":", 2)
        v1.update({c: path for c in controllers.split(",") if c})
        if number == "0" and not controllers:
            v1.setdefault("", path)  # the unified (v2) group
    for line in mounts:
        fields = line.split()
        separator = fields.index("-")
        root, point = fields[3], Path(_unescape(fields[4]))
        kind, options = fields[separator + 1], fields[separator + 3].split(",")
        if kind == "cgroup" and "memory" in options and "memory" in v1:
            return Hierarchy(1, point, point / _relative(v1["memory"], root))
        if kind == "cgroup2" and "" in v1:
            with contextlib.suppress(OSError):
                if "memory" in (point / "cgroup.controllers").read_text().split():
                    return Hierarchy(2, point, point / _relative(v1[""], root))
    return None


def _relative(path: str, root: str) -> str:
    """A group's path as /proc/PID/cgroup names it, relative to the mount's root."""
    relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    return "" if relative == "." else relative


def _unescape(path: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space)."""
    return path.encode().decode("unicode_escape") if "\\" in path else path


class CgroupUnavailable(Exception):
    """Why the launcher cannot cap its tasks with memory cgroups here."""


class JobCgroups:
    """A job's memory group and one group per task under it, each limited to the cap.

    ``task_command`` wraps a task's command so that the task enters its group before it
    starts; ``close`` removes every group (after the tasks are gone).
    """

    def __init__(self, cap: int, hierarchy: Hierarchy | None = None):
        """Makes the job's group.

        Raises:
          CgroupUnavailable: where no memory hierarchy is mounted, or this process may not
            write it.
        """
        self.cap = cap
        self.hierarchy = hierarchy or memory_hierarchy()
        if self.hierarchy is None:
            raise CgroupUnavailable("no memory cgroup hierarchy is mounted")
        h = self.hierarchy
        remove_stale(h)
        # Under v2 a group with processes (the launcher's own) cannot hand controllers to
        # child groups: the job's group goes beside it, under its parent, unless the
        # launcher is in the root group.
        parent = h.own if h.version == 1 or h.own == h.mount else h.own.parent
        started = process_start(os.getpid()) or "0"
        self.path = parent / f"{JOB_PREFIX}{os.getpid()}-{started}"
        try:
            self.path.mkdir(exist_ok=True)
            if h.version == 2:
                (self.path / "cgroup.subtree_control").write_text("+memory")
            # No limit here: the cap is each task's, and the job's group holds them all.
        except OSError as e:
            _remove(self.path, wait=False)
            raise CgroupUnavailable(f"cannot write {self.path} ({e.strerror or e})") from e
        self._tasks: dict[str, Path] = {}
        self._watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(os.getpid()), str(self.path),
             str(ORPHAN_CLEANUP_SECONDS)], stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def description(self) -> str:
        return f"cgroup v{self.hierarchy.version}"

    @property
    def tasks(self) -> list[str]:
        """The tasks that have a group (``ps:0``)."""
        return list(self._tasks)

    def _limit(self, directory: Path) -> None:
        h = self.hierarchy
        h.file(directory, "limit").write_text(str(self.cap))
        swap = h.file(directory, "swap")
        if swap.exists():  # no swapping past the cap either (v1: memory+swap >= memory)
            with contextlib.suppress(OSError):
                swap.write_text(str(self.cap) if h.version == 1 else "0")

    def task_command(self, task: str, command: Sequence[str]) -> list[str]:
        """``command`` run inside a new group of its own for ``task`` (``ps:0``), entered
        before the command starts (the same pid: the shell execs it).

        Raises:
          CgroupUnavailable: if the task's group cannot be made.
        """
        directory = self.path / task.replace(":", "_")
        try:
            if directory.exists():  # an earlier attempt's: its peak must not carry over
                _remove(directory)
            directory.mkdir()
            self._limit(directory)
        except OSError as e:
            raise CgroupUnavailable(f"cannot write {directory} ({e.strerror or e})") from e
        self._tasks[task] = directory
        return ["/bin/sh", "-c", _ENTER, "lmt-cgroup", str(directory / "cgroup.procs"),
                *command]

    def peak(self, task: str) -> int | None:
        """The most memory ever charged to ``task``'s group (its resident memory and the
        page cache it brought in), or None where the kernel does not say (v2 before
        Linux 5.19)."""
        directory = self._tasks.get(task)
        return self.hierarchy.read(directory, "peak") if directory else None

    def oom_killed(self, task: str) -> bool:
        """Whether the kernel killed a process of ``task``'s group for going over the cap."""
        directory = self._tasks.get(task)
        return bool(directory and self.hierarchy.oom_kills(directory))

    def close(self) -> None:
        """Removes the task groups and the job's (their processes must be gone), and
        ends the watcher."""
        for directory in self._tasks.values():
            _remove(directory)
        _remove(self.path)
        self._tasks = {}
        if self._watcher.poll() is None:
            self._watcher.kill()
        self._watcher.wait()

    def __enter__(self) -> JobCgroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove(directory: Path, wait: bool = True) -> bool:
    """Removes a group and the groups under it once empty (with ``wait``, waiting
    briefly while their last processes are torn down); whether it is gone."""
    deadline = time.monotonic() + (REMOVE_SECONDS if wait else 0)
    for child in _children(directory):
        _remove(child, wait)
    while True:
        try:
            directory.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _children(directory: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [d for d in directory.iterdir() if d.is_dir()]
    return []


def remove_stale(hierarchy: Hierarchy) -> list[Path]:
    """Removes the groups of jobs whose launcher is gone (killed with SIGKILL, it could
    not remove them, and nor could its watcher in time) once their tasks have ended too;
    returns those removed."""
    removed = []
    parents = {hierarchy.own, hierarchy.own.parent}
    for parent in parents:
        for directory in _children(parent):
            name = directory.name
            if not name.startswith(JOB_PREFIX):
                continue
            pid, _, started = name[len(JOB_PREFIX):].partition("-")
            if not pid.isdigit() or process_start(int(pid)) == started:
                continue  # its launcher is alive (the same pid, started at the same time)
            if _remove(directory, wait=False):
                removed.append(directory)
    return removed
