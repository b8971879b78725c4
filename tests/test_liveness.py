"""Runs never stay RUNNING: an owner killed with SIGKILL is found by the next lmt command,
and runs of owners still alive, or of other tools, are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmt_tf.liveness import (
    ENDED_BY,
    HEARTBEAT,
    OWNER_HOST,
    OWNER_PID,
    STALE_SECONDS,
    end_orphans,
    owner_gone,
    owner_tags,
)
from tests.conftest import TINY, all_runs, mlflow_client

LMT = str(Path(sys.executable).parent / "lmt")


def test_this_process_is_alive_and_a_finished_process_is_gone() -> None:
    assert owner_gone(owner_tags()) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    tags = {**owner_tags(), OWNER_PID: str(child.pid)}
    assert "no longer exists" in owner_gone(tags)


def test_a_reused_pid_is_not_the_owner() -> None:
    tags = {**owner_tags(), "lmt.owner.process_start": "1"}  # this pid, another start time
    assert "the pid now names another" in owner_gone(tags)


def test_owners_on_other_hosts_are_judged_by_their_heartbeat() -> None:
    now = time.time()
    elsewhere = {OWNER_HOST: "some-other-host", OWNER_PID: "1", HEARTBEAT: f"{now - 10:.0f}"}
    assert owner_gone(elsewhere, now) is None
    stale = {**elsewhere, HEARTBEAT: f"{now - STALE_SECONDS - 1:.0f}"}
    assert "no heartbeat" in owner_gone(stale, now)
    assert owner_gone({"mlflow.user": "someone"}) is None  # not an lmt run: never touched


def test_ending_orphans_ends_only_runs_whose_owner_is_gone(in_tmp: Path) -> None:
    client = mlflow_client(in_tmp)
    experiment = client.create_experiment("e")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    orphan = client.create_run(experiment, tags={**owner_tags(), OWNER_PID: str(child.pid)})
    alive = client.create_run(experiment, tags=owner_tags())
    foreign = client.create_run(experiment)  # no owner tags: made by another tool
    assert end_orphans(client, "a test") == [orphan.info.run_id]
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert "found by a test" in client.get_run(orphan.info.run_id).data.tags[ENDED_BY]
    for run in (alive, foreign):
        assert client.get_run(run.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_a_sigkilled_run_is_marked_killed_by_the_next_lmt_command(in_tmp: Path) -> None:
    (in_tmp / "exp.gin").write_text(TINY)
    process = subprocess.Popen(
        [LMT, "run", "exp.gin", "--gin_param", "TrainConfig.epochs = 100000"], cwd=in_tmp,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Wait for the run id in the run directory, not in the store: opening a new
        # SQLite store while the run creates it would race its schema migration.
        deadline = time.monotonic() + 120
        while not any("run_id" in json.loads(f.read_text())
                      for f in in_tmp.glob("lmt_work/*/*/state.json")):
            assert process.poll() is None and time.monotonic() < deadline, "no run started"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    (run,) = all_runs(in_tmp)
    assert run.info.status == "RUNNING"  # it could not end its own run
    assert run.data.tags[OWNER_PID] == str(process.pid)
    done = subprocess.run([LMT, "run", "exp.gin", "--gin_param", "TrainConfig.epochs = 1"],
                          cwd=in_tmp, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"marked run {run.info.run_id}" in done.stdout
    statuses = {r.info.run_id: r for r in all_runs(in_tmp)}
    killed = statuses.pop(run.info.run_id)
    assert killed.info.status == "KILLED" and "no longer exists" in killed.data.tags[ENDED_BY]
    assert [r.info.status for r in statuses.values()] == ["FINISHED"]


def test_the_heartbeat_beats_until_stopped_and_survives_a_failed_write() -> None:
    from lmt_tf.liveness import Heartbeat

    beats: list[str] = []

    def beat(now: str) -> None:
        beats.append(now)
        if len(beats) == 1:
            raise OSError("store briefly locked")  # the next beat tries again

    heartbeat = Heartbeat(beat, interval=0.02).start()
    deadline = time.monotonic() + 5
    while len(beats) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    heartbeat.stop()
    assert len(beats) >= 3 and all(float(b) > 0 for b in beats)
    stopped_at = len(beats)
    time.sleep(0.1)
    assert len(beats) == stopped_at  # no beat after stop
