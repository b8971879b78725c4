"""Memory cgroups as the launcher uses them, on the real kernel (here cgroup v1 as root;
skipped where this process may not write a memory hierarchy): a task over its cap is
killed and said to be, one within it is not, and no group outlives its job, even a job
whose launcher was killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmt_tf.runtime.cgroups import (
    JOB_PREFIX,
    CgroupUnavailable,
    Hierarchy,
    JobCgroups,
    memory_hierarchy,
    remove_stale,
)
from lmt_tf.runtime.memory import cgroup_limit

CAP = 64 << 20


def _job() -> JobCgroups:
    try:
        return JobCgroups(CAP)
    except CgroupUnavailable as e:
        pytest.skip(f"memory cgroups cannot be written here: {e}")


def _groups() -> list[Path]:
    hierarchy = memory_hierarchy()
    return sorted(p for p in (hierarchy.own, hierarchy.own.parent) for p in p.iterdir()
                  if p.name.startswith(JOB_PREFIX)) if hierarchy else []


def _allocate(megabytes: int) -> list[str]:
    return [sys.executable, "-c", f"x = bytearray({megabytes} << 20); print('held', flush=True)"]


def test_this_process_has_a_memory_hierarchy_and_its_limit() -> None:
    hierarchy = memory_hierarchy()
    if hierarchy is None:
        pytest.skip("no memory cgroup hierarchy is mounted")
    assert hierarchy.version in (1, 2) and hierarchy.own.is_relative_to(hierarchy.mount)
    assert hierarchy.own.is_dir()
    limit = cgroup_limit()
    assert limit is None or limit > 0


def test_a_task_over_its_cap_is_killed_and_one_within_it_is_not() -> None:
    before = _groups()
    with _job() as job:
        assert job.path.is_dir() and job.path not in before
        over = subprocess.run(job.task_command("ps:0", _allocate(256)), capture_output=True,
                              text=True, timeout=60)
        within = subprocess.run(job.task_command("ps:1", _allocate(16)), capture_output=True,
                                text=True, timeout=60)
        assert over.returncode == -signal.SIGKILL and "held" not in over.stdout
        assert job.oom_killed("ps:0") and job.peak("ps:0") <= CAP
        assert within.returncode == 0 and within.stdout.strip() == "held"
        assert not job.oom_killed("ps:1") and 16 << 20 < job.peak("ps:1") <= CAP
        # Each task's own group, limited to the cap; the job's holds them all, unlimited.
        hierarchy = job.hierarchy
        assert hierarchy.read(job.path / "ps_0", "limit") == CAP
        assert (hierarchy.read(job.path, "limit") or 0) > 4 * CAP
    assert not job.path.exists() and _groups() == before


def test_the_task_is_in_its_group_from_its_first_instruction() -> None:
    """The shell enters the group and execs the command: the same pid, already inside."""
    with _job() as job:
        command = job.task_command("chief:0", [sys.executable, "-c",
                                               "import os; print(os.getpid()); "
                                               "print(open('/proc/self/cgroup').read())"])
        process = subprocess.run(command, capture_output=True, text=True, timeout=60)
        pid, cgroups = process.stdout.split("\n", 1)
        assert f"{job.path.name}/chief_0" in cgroups
        assert process.returncode == 0 and int(pid) > 0


def test_the_groups_of_a_launcher_killed_with_sigkill_are_removed() -> None:
    """A launcher that made its groups and a task in them, then died of SIGKILL: its
    watcher removes the groups once the task has gone too."""
    script = ("import subprocess, sys, time\n"
              "from lmt_tf.runtime.cgroups import JobCgroups\n"
              f"job = JobCgroups({CAP})\n"
              "task = subprocess.Popen(job.task_command('worker:0', "
              "[sys.executable, '-c', 'import time; time.sleep(3)']))\n"
              "print(job.path, task.pid, flush=True)\n"
              "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = launcher.stdout.readline().split()
    if not line:
        launcher.wait()
        pytest.skip("memory cgroups cannot be written here")
    path, task = Path(line[0]), int(line[1])
    assert (path / "worker_0").is_dir()
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not path.exists(), "the killed launcher's groups are still there"
    assert not Path(f"/proc/{task}").exists() or "Z" in Path(f"/proc/{task}/stat").read_text()


def test_stale_groups_whose_launcher_is_gone_are_swept(tmp_path: Path) -> None:
    """On a plain directory standing in for a hierarchy: a job's group named after a
    launcher that is gone is removed, one of a live launcher (this process) is kept."""
    from lmt_tf.liveness import process_start

    own = tmp_path / "own"
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = own / f"{JOB_PREFIX}{gone.pid}-1" / "ps_0"
    live = own / f"{JOB_PREFIX}{os.getpid()}-{process_start(os.getpid())}" / "ps_0"
    for directory in (stale, live):
        directory.mkdir(parents=True)
    removed = remove_stale(Hierarchy(1, tmp_path, own))
    assert removed == [stale.parent] and not stale.parent.exists() and live.is_dir()


def test_an_unwritable_hierarchy_is_said_so(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-hierarchy"
    with pytest.raises(CgroupUnavailable, match="cannot write"):
        JobCgroups(CAP, Hierarchy(1, missing, missing / "own"))
