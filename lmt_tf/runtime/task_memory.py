"""The memory side of an ``lmt launch`` job: the cap passed to every task
(``--task-memory``), enforced with a memory cgroup per task where the launcher may write
them (else measured and reported, not enforced), each task's peak memory, a task the cap
killed said in one line, and the peaks as a table and in the job's MLflow run."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from lmt_tf.errors import LmtError
from lmt_tf.process import TASK_MEMORY_ENV
from lmt_tf.runtime.cgroups import CgroupUnavailable, JobCgroups
from lmt_tf.runtime.memory import children_by_parent, format_size, tree_hwm
from lmt_tf.runtime.processes import Task

SAMPLE_SECONDS = 1.0  # between reads of the tasks' VmHWM (a high-water mark: none is lost
# but the growth of a task's last second, which its cgroup's peak still has)


@dataclass
class Peak:
    """A task's peaks: its resident set (``VmHWM`` of its process tree, sampled), and the
    most memory charged to its cgroup (resident memory plus the page cache it brought
    in; None without a cgroup)."""

    rss: int | None = None
    charged: int | None = None

    def merge(self, other: Peak) -> Peak:
        def most(a: int | None, b: int | None) -> int | None:
            return max(a, b) if a is not None and b is not None else (a if b is None else b)

        return Peak(most(self.rss, other.rss), most(self.charged, other.charged))


class TaskMemory:
    """One job's cap, its enforcement, and its tasks' peaks (over every attempt)."""

    def __init__(self, cap: int | None, echo: Callable[[str], None],
                 cgroups: Callable[[int], JobCgroups] = JobCgroups):
        """Makes the job's cgroup (``cgroups(cap)``) where a cap is given and the launcher
        may write it; otherwise says, in one line, that the cap is measured and reported
        only."""
        self.cap = cap
        self.cgroups: JobCgroups | None = None
        self.enforcement = "none"
        if cap is not None:
            try:
                self.cgroups = cgroups(cap)
                self.enforcement = self.cgroups.description
                echo(f"lmt launch: each task may use {format_size(cap)} (--task-memory), "
                     f"enforced by a memory {self.enforcement} per task")
            except CgroupUnavailable as e:
                self.enforcement = "measured, not enforced"
                echo(f"lmt launch: cannot cap the tasks with the kernel's memory cgroup "
                     f"({e}); the cap of {format_size(cap)} per task is measured and "
                     f"reported, not enforced")
        self.peaks: dict[str, Peak] = {}  # over every attempt
        self._attempt: dict[str, Peak] = {}
        self._sampled = 0.0

    def environment(self) -> dict[str, str]:
        """What every task's environment gets: the cap its pre-flight check uses."""
        return {TASK_MEMORY_ENV: str(self.cap)} if self.cap is not None else {}

    def command(self, task: str, command: Sequence[str]) -> list[str]:
        """``command`` as ``task`` runs it: inside its cgroup where the cap is enforced.

        Raises:
          LmtError: if the task's cgroup cannot be made.
        """
        if self.cgroups is None:
            return list(command)
        try:
            return self.cgroups.task_command(task, command)
        except CgroupUnavailable as e:
            raise LmtError(f"cannot cap {task}'s memory: {e}") from e

    def start_attempt(self) -> None:
        self._attempt = {}

    def sample(self, processes: Mapping[Task, subprocess.Popen], force: bool = False) -> None:
        """Reads the running tasks' peak resident sets (at most every SAMPLE_SECONDS
        unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._sampled < SAMPLE_SECONDS:
            return
        self._sampled = now
        children = children_by_parent()
        for task, process in processes.items():
            if process.poll() is None:
                rss = tree_hwm(process.pid, children)
                if rss is not None:
                    peak = self._attempt.get(task.name, Peak())
                    self._attempt[task.name] = peak.merge(Peak(rss=rss))

    def killed_by_cap(self, task: str, status: int) -> str | None:
        """The line saying that ``task``, ended with ``status``, was killed for going over
        its cap; None if it was not."""
        if self.cgroups is None or status >= 0 or not self.cgroups.oom_killed(task):
            return None
        return (f"lmt launch: {task} was killed by the kernel for going over its memory "
                f"cap of {format_size(self.cap)} (--task-memory, {self.enforcement})")

    def end_attempt(self) -> dict[str, Peak]:
        """Records this attempt's peaks (its cgroups' too, read after the tasks are
        gone) and returns them."""
        if self.cgroups is not None:
            for task in self.cgroups.tasks:
                charged = self.cgroups.peak(task)
                peak = self._attempt.get(task, Peak())
                self._attempt[task] = peak.merge(Peak(charged=charged))
        for task, peak in self._attempt.items():
            self.peaks[task] = self.peaks.get(task, Peak()).merge(peak)
        return dict(self._attempt)

    def table(self) -> str:
        """The peaks of every task, with the cap and how it was kept."""
        cap = (f"cap {format_size(self.cap)} per task, {self.enforcement}"
               if self.cap is not None else "no cap (--task-memory)")
        rows = [("task", "peak RSS", "peak charged (cgroup)")]
        for task, peak in self.peaks.items():
            rows.append((task, format_size(peak.rss) if peak.rss is not None else "-",
                         format_size(peak.charged) if peak.charged is not None else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        return f"lmt launch: peak memory per task ({cap}):\n" + "\n".join(lines)

    def metrics(self, peaks: Mapping[str, Peak]) -> dict[str, float]:
        """``memory/peak_rss_bytes/ps_0``, ``memory/peak_charged_bytes/ps_0``, ... and
        ``memory/task_cap_bytes``."""
        values: dict[str, float] = {}
        for task, peak in peaks.items():
            key = task.replace(":", "_")
            if peak.rss is not None:
                values[f"memory/peak_rss_bytes/{key}"] = float(peak.rss)
            if peak.charged is not None:
                values[f"memory/peak_charged_bytes/{key}"] = float(peak.charged)
        if self.cap is not None:
            values["memory/task_cap_bytes"] = float(self.cap)
        return values

    def tags(self) -> dict[str, str]:
        return {"lmt.task_memory": str(self.cap) if self.cap is not None else "none",
                "lmt.task_memory.enforcement": self.enforcement}

    def log(self, made: Mapping[str, str] | None, peaks: Mapping[str, Peak], attempt: int,
            echo: Callable[[str], None]) -> None:
        """Logs ``peaks`` (step ``attempt``) and the cap into the run the job's chief made
        (``made``: its report); says so in one line if the store cannot be written."""
        if not made or not peaks:
            return
        from mlflow.entities import Metric, RunTag

        from lmt_tf.tracking.read import store_client

        now = int(time.time() * 1000)
        try:
            store_client(made["tracking_uri"]).log_batch(
                made["run_id"],
                metrics=[Metric(k, v, now, attempt) for k, v in self.metrics(peaks).items()],
                tags=[RunTag(k, v) for k, v in self.tags().items()])
        except Exception as e:  # noqa: BLE001 (the store's own errors: not the job's)
            reason = (str(e).strip().splitlines() or [""])[0]
            echo(f"lmt launch: the tasks' peak memory could not be logged to run "
                 f"{made.get('run_id')} ({type(e).__name__}: {reason})")

    def close(self) -> None:
        """Removes the job's cgroups (its tasks must be gone)."""
        if self.cgroups is not None:
            with contextlib.suppress(OSError):
                self.cgroups.close()
