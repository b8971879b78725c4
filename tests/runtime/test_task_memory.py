"""`lmt launch --task-memory`: the cap told to every task, kept by a memory cgroup per
task (cgroup v1 as root here), a task it kills said in one line, no group left after the
job, and every task's peak memory printed and logged into the job's run; the predicted
footprint against the real placement of a parameter-server job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmt_tf.cli import main
from lmt_tf.process import EXIT_USER_ERROR, TASK_MEMORY_ENV
from lmt_tf.runtime.cgroups import CgroupUnavailable, Hierarchy, JobCgroups
from lmt_tf.runtime.memory import format_size
from lmt_tf.runtime.task_memory import Peak, TaskMemory
from tests.conftest import PROJECT_ROOT, TINY, all_runs, mlflow_client
from tests.runtime.test_cgroups import _groups
from tests.runtime.test_launcher import Launch, _assert_all_gone


def _cgroups_writable() -> bool:
    try:
        JobCgroups(1 << 30).close()
    except CgroupUnavailable:
        return False
    return True


def test_without_a_writable_cgroup_the_cap_is_measured_and_reported(tmp_path: Path) -> None:
    lines: list[str] = []
    missing = tmp_path / "no-such-hierarchy"
    memory = TaskMemory(2 << 30, lines.append,
                        cgroups=lambda cap: JobCgroups(cap, Hierarchy(1, missing, missing)))
    (line,) = lines
    assert line.startswith("lmt launch: cannot cap the tasks with the kernel's memory cgroup "
                           "(cannot write ")
    assert line.endswith("the cap of 2.0 GB per task is measured and reported, not enforced")
    assert memory.environment() == {TASK_MEMORY_ENV: str(2 << 30)}
    assert memory.command("ps:0", ["lmt", "run"]) == ["lmt", "run"]
    assert memory.killed_by_cap("ps:0", -9) is None
    assert memory.tags() == {"lmt.task_memory": str(2 << 30),
                             "lmt.task_memory.enforcement": "measured, not enforced"}


def test_peaks_become_metrics_per_task_and_a_table() -> None:
    memory = TaskMemory(None, print)
    memory.peaks = {"chief:0": Peak(600 << 20, None), "ps:1": Peak(700 << 20, 300 << 20)}
    assert memory.metrics(memory.peaks) == {
        "memory/peak_rss_bytes/chief_0": float(600 << 20),
        "memory/peak_rss_bytes/ps_1": float(700 << 20),
        "memory/peak_charged_bytes/ps_1": float(300 << 20)}
    assert memory.tags() == {"lmt.task_memory": "none", "lmt.task_memory.enforcement": "none"}
    assert memory.table().splitlines() == [
        "lmt launch: peak memory per task (no cap (--task-memory)):",
        "  task     peak RSS  peak charged (cgroup)",
        "  chief:0  600.0 MB  -",
        "  ps:1     700.0 MB  300.0 MB"]


def test_a_bad_task_memory_is_one_line(gin_file, capsys) -> None:
    exp = gin_file(TINY)
    assert main(["launch", "--workers", "1", "--task-memory", "lots", exp]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == (
        "lmt: error: --task-memory must be a size such as 2G, 512M or 1.5G (K, M, G, T: "
        "powers of 1024), got 'lots'")


@pytest.mark.slow
def test_a_task_over_its_cap_is_killed_said_in_one_line_and_leaves_no_group(
        gin_file, in_tmp: Path) -> None:
    """A cap below what TensorFlow itself needs: the worker is killed while it starts."""
    if not _cgroups_writable():
        pytest.skip("memory cgroups cannot be written here")
    before = _groups()
    exp = gin_file(TINY)
    launch = Launch(["--workers", "1", "--task-memory", "150M", "--timeout", "60", exp],
                    in_tmp)
    status = launch.wait(120)
    assert status != 0, launch.output
    killed = [line for line in launch.lines if "killed by the kernel" in line]
    assert killed == ["lmt launch: worker:0 was killed by the kernel for going over its "
                      "memory cap of 150.0 MB (--task-memory, cgroup v1)"], launch.output
    assert "enforced by a memory cgroup v1 per task" in launch.output
    charged = re.search(r"^  worker:0 .* (\d+\.\d) MB$", launch.output, re.MULTILINE)
    assert charged and float(charged.group(1)) <= 150.0, launch.output
    assert _groups() == before
    _assert_all_gone(launch.pids().values())


@pytest.mark.slow
def test_a_parameter_server_job_logs_every_tasks_peak_and_matches_its_footprint(
        in_tmp: Path) -> None:
    """MovieLens' tables partitioned over 2 ps: the footprint predicted before the model
    was built puts every shard and slot where TensorFlow did, and the peak of every task
    is logged under the cap."""
    cap = 2 << 30
    launch = Launch(["--workers", "1", "--ps", "2", "--task-memory", "2G", "--timeout", "150",
                     str(PROJECT_ROOT / "experiments" / "movielens_ps.gin"),
                     "--gin_param", "TrainConfig.steps_per_epoch = 5",
                     "--gin_param", "TrainConfig.epochs = 1",
                     "--gin_param", "run_experiment.stages = [@train()]"], in_tmp)
    assert launch.wait(200) == 0, launch.output
    (run,) = all_runs(in_tmp)
    tasks = ("chief_0", "worker_0", "ps_0", "ps_1")
    for task in tasks:
        rss = run.data.metrics[f"memory/peak_rss_bytes/{task}"]
        charged = run.data.metrics.get(f"memory/peak_charged_bytes/{task}")
        assert 50 << 20 < rss < 2 * cap  # resident: TensorFlow's shared libraries count
        assert charged is None or 50 << 20 < charged <= cap
    assert run.data.metrics["memory/task_cap_bytes"] == cap
    assert run.data.tags["lmt.task_memory"] == str(cap)
    assert run.data.tags["lmt.task_memory.enforcement"] in ("cgroup v1", "cgroup v2",
                                                            "measured, not enforced")
    table = launch.output.split("lmt launch: peak memory per task")[1].splitlines()
    assert [row.split()[0] for row in table[2:6]] == ["chief:0", "worker:0", "ps:0", "ps:1"]

    client = mlflow_client(in_tmp)
    footprint = json.loads(Path(client.download_artifacts(
        run.info.run_id, "footprint.json", str(in_tmp))).read_text())
    placement = json.loads(Path(client.download_artifacts(
        run.info.run_id, "placement.json", str(in_tmp))).read_text())
    predicted, built = footprint["pieces"]["predicted"], footprint["pieces"]["built"]
    assert [piece[1:] for piece in predicted] == [piece[1:] for piece in built]
    # ... as TensorFlow's own placement lists them: each table in 2 shards, one per ps.
    assert [task for _, task, _ in predicted] == [
        f"ps:{devices[0].split('/device:')[0].rsplit(':', 1)[1]}"
        for devices in placement.values()]
    for table in ("user_embedding", "item_embedding"):
        assert [task for name, task, _ in built if name.startswith(table)] == ["ps:0", "ps:1"]
    # Slots too: each ps holds what was predicted, but for the optimizer's scalars.
    for task in ("ps:0", "ps:1"):
        assert abs(footprint["predicted"][task] - footprint["built"][task]) <= 64
    assert footprint["predicted"]["chief:0"] == footprint["predicted"]["worker:0"] == 0
    largest = max(footprint["predicted"]["ps:0"], footprint["predicted"]["ps:1"])
    assert re.search(rf"\[chief:0\] lmt: memory: .* Adam slots; the largest share, ps:\d's, "
                     rf"is {format_size(largest)}, within the 2.0 GB a task may use "
                     rf"\(--task-memory\)", launch.output), launch.output
