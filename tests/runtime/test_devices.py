"""The device plan: each task's GPUs for 0, 1, 2 and 8 visible GPUs and every job shape,
decided without a GPU."""

from __future__ import annotations

import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.runtime.devices import (
    collective,
    plan_cluster,
    plan_federation,
    plan_single,
    plan_trials,
    unseen_gpus,
    visible_gpus,
)

GPUS = {n: tuple(str(i) for i in range(n)) for n in (0, 1, 2, 8)}


def _table(plan) -> dict[str, str]:
    return {t.task: ",".join(t.gpus) or "cpu" for t in plan.tasks}


def test_visible_gpus_come_from_cuda_visible_devices_or_the_device_nodes() -> None:
    nodes = ["/dev/nvidia0", "/dev/nvidia1"]
    assert visible_gpus({}, nodes) == ("0", "1")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}, nodes) == ("3", "5")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, nodes) == ()
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, nodes) == ()
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,-1,4"}, nodes) == ("2",)  # CUDA stops
    assert visible_gpus({}, []) == ()


@pytest.mark.parametrize("count, default, mirrored", [
    (0, "cpu", "cpu"), (1, "0", "0"), (2, "0", "0,1"), (8, "0", "0,1,2,3,4,5,6,7")])
def test_one_process(count: int, default: str, mirrored: str) -> None:
    assert _table(plan_single(GPUS[count], mirrored=False)) == {"chief:0": default}
    assert _table(plan_single(GPUS[count], mirrored=True)) == {"chief:0": mirrored}


@pytest.mark.parametrize("count, expected, all_reduce", [
    (0, {"worker:0": "cpu", "worker:1": "cpu"}, "ring"),
    (2, {"worker:0": "0", "worker:1": "1"}, "nccl"),
    (8, {"worker:0": "0,1,2,3", "worker:1": "4,5,6,7"}, "nccl"),
])
def test_multi_worker_mirrored_splits_the_gpus(count: int, expected: dict,
                                               all_reduce: str) -> None:
    plan = plan_cluster(GPUS[count], workers=2)
    assert _table(plan) == expected and plan.collective == all_reduce
    assert not any(t.memory_growth for t in plan.tasks)  # no GPU serves two tasks


def test_parameter_servers_and_their_chief_hold_no_gpu() -> None:
    plan = plan_cluster(GPUS[8], workers=2, ps=2)
    assert _table(plan) == {"chief:0": "cpu", "worker:0": "0,1,2,3",
                            "worker:1": "4,5,6,7", "ps:0": "cpu", "ps:1": "cpu"}
    assert plan.task("ps:0").environment() == {"CUDA_VISIBLE_DEVICES": "-1"}
    assert plan.task("worker:1").environment() == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}


@pytest.mark.parametrize("count, evaluator", [(0, "cpu"), (1, "cpu"), (2, "cpu"),
                                              (8, "cpu")])
def test_the_evaluator_takes_a_free_gpu_or_none(count: int, evaluator: str) -> None:
    # Split evenly, the workers use every GPU: the evaluator gets none.
    assert _table(plan_cluster(GPUS[count], workers=1, evaluator=True))["evaluator:0"] \
        == evaluator
    # With one GPU per worker, one of 8 is left for it (never worker 0's, as before).
    spare = plan_cluster(GPUS[8], workers=2, gpus_per_worker=1, evaluator=True)
    assert _table(spare) == {"worker:0": "0", "worker:1": "1", "evaluator:0": "2"}


def test_more_workers_than_gpus_is_refused_in_one_line_unless_shared() -> None:
    with pytest.raises(ConfigError, match="3 worker\\(s\\) need 3 GPU\\(s\\) but this host "
                                          "shows 2; give --gpus-per-worker 0"):
        plan_cluster(GPUS[2], workers=3)
    with pytest.raises(ConfigError, match="need 4 GPU"):
        plan_cluster(GPUS[2], workers=2, gpus_per_worker=2)
    shared = plan_cluster(GPUS[2], workers=3, share=True)
    assert _table(shared) == {"worker:0": "0", "worker:1": "1", "worker:2": "0"}
    assert all(t.memory_growth for t in shared.tasks)
    assert shared.task("worker:2").environment()["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    cpu = plan_cluster(GPUS[8], workers=3, gpus_per_worker=0)
    assert set(_table(cpu).values()) == {"cpu"} and cpu.collective == "ring"


@pytest.mark.parametrize("count, expected", [
    (0, {"trial:0": "cpu", "trial:1": "cpu"}), (2, {"trial:0": "0", "trial:1": "1"}),
    (8, {"trial:0": "0,1,2,3", "trial:1": "4,5,6,7"})])
def test_parallel_trials_take_a_slice_each(count: int, expected: dict) -> None:
    assert _table(plan_trials(GPUS[count], parallel=2)) == expected
    if count:
        with pytest.raises(ConfigError, match=f"{count + 1} trial\\(s\\) need"):
            plan_trials(GPUS[count], parallel=count + 1)


def test_flower_clients_share_the_gpus() -> None:
    plan = plan_federation(GPUS[2], clients=3)
    assert _table(plan) == {"server:0": "0", "client:0": "0", "client:1": "1",
                            "client:2": "0"}
    assert all(t.memory_growth for t in plan.tasks)
    assert set(_table(plan_federation(GPUS[0], clients=3)).values()) == {"cpu"}


def test_the_collective_is_nccl_on_gpus_and_ring_on_cpus() -> None:
    assert collective("auto", gpus=2) == "nccl" and collective("auto", gpus=0) == "ring"
    assert collective("ring", gpus=8) == "ring"  # an explicit choice wins


def test_gpus_tensorflow_cannot_see_are_said_once_not_skipped() -> None:
    nodes = ["/dev/nvidia0", "/dev/nvidia1"]
    warning = unseen_gpus(0, {}, nodes)
    assert warning.startswith("lmt: warning: this host has 2 NVIDIA GPU(s) but TensorFlow "
                              "sees none") and "lmt_tf[gpu]" in warning
    assert unseen_gpus(2, {}, nodes) is None  # TensorFlow uses them
    assert unseen_gpus(0, {"CUDA_VISIBLE_DEVICES": "-1"}, nodes) is None  # hidden on purpose
    assert unseen_gpus(0, {}, []) is None  # no GPU here


def test_every_launched_task_gets_its_part_of_the_gpus() -> None:
    import sys

    from lmt_tf.runtime.launcher import cluster_spec, start_cluster

    plan = plan_cluster(GPUS[8], workers=2, ps=1, evaluator=False)
    spec = cluster_spec(2, 1, [1, 2, 3, 4])
    lines: list[str] = []
    group = start_cluster(spec, [sys.executable, "-c", "import os; print('sees', os.environ["
                                 "'CUDA_VISIBLE_DEVICES'])"], lines.append, lines.append,
                          {}, plan)
    for process in group.processes.values():
        process.wait(60)
    group.stop()
    seen = sorted(line.split("] ", 1) for line in lines if "] sees" in line)
    assert seen == [["[chief:0", "sees -1"], ["[ps:0", "sees -1"],
                    ["[worker:0", "sees 0,1,2,3"], ["[worker:1", "sees 4,5,6,7"]]


def test_more_workers_than_gpus_stops_lmt_launch_before_any_task(in_tmp, gin_file,
                                                                 monkeypatch, capsys) -> None:
    from lmt_tf.cli import main
    from tests.conftest import TINY

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    exp = gin_file(TINY)
    assert main(["launch", "--workers", "3", exp]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 worker(s) need 3 GPU(s) but this host shows 2" in err[0]
