"""Memory sizes as users write them (``2G``, ``512M``), the memory a task may use (its
``--task-memory`` cap, else this machine's), and the peak resident memory of a process
tree as the kernel records it (``VmHWM``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lmt_tf.errors import LmtError
from lmt_tf.process import TASK_MEMORY_ENV

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
# cgroup v1 writes "no limit" as the largest page-aligned 63-bit number; v2 as "max".
_UNLIMITED = 1 << 62


def parse_size(text: str, setting: str = "--task-memory") -> int:
    """Bytes of a size such as ``2G``, ``512M``, ``1.5G``, ``4096`` (binary units: K =
    1024; a trailing ``B``/``iB`` is allowed).

    Raises:
      LmtError: for anything else, or a size of zero.
    """
    match = _SIZE.fullmatch(text.strip())
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()]) if match else 0
    if size <= 0:
        raise LmtError(f"{setting} must be a size such as 2G, 512M or 1.5G (K, M, G, T: "
                       f"powers of 1024), got {text!r}")
    return size


def format_size(size: float) -> str:
    """``size`` bytes for people: ``8.0 GB``, ``512.0 MB``, ``4.2 KB``, ``12 B`` (powers
    of 1024, as ``--task-memory`` reads them)."""
    for unit in ("TB", "GB", "MB", "KB"):
        scale = _UNITS[unit[0]]
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


@dataclass(frozen=True)
class Cap:
    """The memory a task may use and where that number comes from."""

    bytes: int
    source: str  # e.g. "--task-memory", "this machine's memory (MemTotal)"


def task_cap(environ: Mapping[str, str] | None = None) -> Cap:
    """This task's cap: what ``lmt launch --task-memory`` passed in ``TASK_MEMORY_ENV``,
    else the machine's memory (``machine_memory``).

    Raises:
      LmtError: for a malformed ``TASK_MEMORY_ENV``.
    """
    environ = os.environ if environ is None else environ
    given = environ.get(TASK_MEMORY_ENV)
    if given:
        return Cap(parse_size(given, TASK_MEMORY_ENV), "--task-memory")
    return machine_memory()


def machine_memory() -> Cap:
    """The memory this process may use without a cap of its own: the limit of the memory
    cgroup it runs in (the smallest on its path, as the kernel enforces them all), where
    one is set below the machine's, else ``MemTotal``."""
    total = _meminfo_total()
    limit = cgroup_limit()
    if limit is not None and limit < total:
        return Cap(limit, "the memory cgroup this process runs in")
    return Cap(total, "this machine's memory (MemTotal)")


def _meminfo_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_limit(pid: int | str = "self") -> int | None:
    """The smallest memory limit on the path of ``pid``'s memory cgroup (v1
    ``memory.limit_in_bytes``, v2 ``memory.max``), or None where none is set or none is
    readable."""
    from lmt_tf.runtime.cgroups import memory_hierarchy  # the kernel's side of it

    hierarchy = memory_hierarchy(pid)
    if hierarchy is None:
        return None
    limits = []
    directory = hierarchy.own
    while True:
        value = hierarchy.read(directory, "limit")
        if value is not None and value < _UNLIMITED:
            limits.append(value)
        if directory == hierarchy.mount:
            break
        directory = directory.parent
    return min(limits) if limits else None


def vm_hwm(pid: int) -> int | None:
    """The peak resident set (``VmHWM``) of process ``pid`` in bytes; None once it has
    exited (a zombie has no memory left to report)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def children_by_parent() -> dict[int, list[int]]:
    """Every process's children, from ``/proc`` (one pass, for several trees)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the name
        children.setdefault(parent, []).append(int(entry))
    return children


def process_tree(pid: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """``pid`` and every process descended from it (``children``: from
    ``children_by_parent``, read now if not given)."""
    children = children_by_parent() if children is None else children
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def tree_hwm(pid: int, children: dict[int, list[int]] | None = None) -> int | None:
    """The summed peak resident sets of ``pid``'s process tree (an upper bound of the
    tree's peak: its processes may peak at different times); None once ``pid`` is gone."""
    peaks = [vm_hwm(p) for p in process_tree(pid, children)]
    known = [p for p in peaks if p is not None]
    return sum(known) if peaks and peaks[0] is not None else None
