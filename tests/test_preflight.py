"""The pre-flight size check of ``experiment.prepare``: before any model is built, each
task's share of the variables and optimizer slots against the memory it may use; the dry
run's per-task table and parameter count, worked out without allocating the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmt_tf.cli import main
from lmt_tf.process import EXIT_USER_ERROR, TASK_MEMORY_ENV
from tests.conftest import TINY, all_runs, mlflow_client

# 64 inputs -> 1,000,000 hidden units -> 10 classes: 75,000,010 parameters, 286 MB of
# float32 variables and twice that in Adam's slots: 858 MB per replica, never built.
BIG = TINY + "build_mlp.hidden_units = (1000000,)\nTrainConfig.optimizer = @keras.optimizers.Adam\n"
MIRRORED = ["--gin_param", "run_experiment.strategy = @mirrored_strategy"]


def _resident() -> int:
    status = Path("/proc/self/status").read_text().split("VmRSS:")[1]
    return int(status.split()[0]) * 1024


def test_a_model_too_large_for_mirrored_replicas_is_refused_in_one_line(
        gin_file, in_tmp: Path, monkeypatch, capsys) -> None:
    exp = gin_file(BIG)
    monkeypatch.setenv(TASK_MEMORY_ENV, str(1 << 30))
    before = _resident()
    assert main(["run", exp, *MIRRORED]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "lmt: error: the model needs 858.3 MB of variables and slots per replica (286.1 MB "
        "variables + 572.2 MB Adam slots) under MirroredStrategy, 1.7 GB for its 2 replicas "
        "on this host, above the 1.0 GB a task may use (--task-memory); one replica per "
        "host (858.3 MB) or use parameter_server_strategy with >= 1 ps (858.3 MB per ps "
        "task) or a cap of at least 1.7 GB (--task-memory)"), err
    assert _resident() - before < 150 << 20  # described, never built
    assert all_runs(in_tmp) == []  # refused before the run started


def test_the_dry_run_prints_each_tasks_share_and_counts_without_building(
        gin_file, in_tmp: Path, monkeypatch, capsys) -> None:
    exp = gin_file(BIG)
    monkeypatch.delenv(TASK_MEMORY_ENV, raising=False)
    before = _resident()
    assert main(["run", exp, "--dry-run", *MIRRORED]) == 0
    out = capsys.readouterr().out
    assert "lmt: model mlp: 75,000,010 parameters" in out
    assert ("lmt: memory per task under MirroredStrategy, 2 replica(s) on this host: "
            "858.3 MB in all (286.1 MB variables + 572.2 MB Adam slots)") in out
    assert "  chief:0  572.2 MB   1.1 GB  1.7 GB" in out
    assert "  largest variable or shard: dense_0/kernel, 244.1 MB (1 of 2 copies)" in out
    assert _resident() - before < 150 << 20
    assert all_runs(in_tmp) == []


@pytest.mark.parametrize("strategy, copies, share", [("default_strategy", 1, "18.8 KB"),
                                                      ("mirrored_strategy", 2, "37.7 KB")])
def test_a_run_logs_the_described_parameters_and_its_footprint(gin_file, in_tmp: Path,
                                                               capsys, strategy: str,
                                                               copies: int, share: str) -> None:
    """TINY: 2,410 float32 parameters (9.4 KB) and SGD's momentum slot of as much, once
    per process or once per replica on the host's two logical CPUs."""
    import json

    exp = gin_file(TINY + "TrainConfig.epochs = 1\nExportConfig.mlflow_model = False\n")
    assert main(["run", exp, "--gin_param", f"run_experiment.strategy = @{strategy}"]) == 0
    out = capsys.readouterr().out
    assert (f"lmt: memory: 9.4 KB variables + 9.4 KB SGD slots; the largest share, "
            f"chief:0's, is {share}, within the") in out
    (run,) = all_runs(in_tmp)
    assert run.data.params["derived.parameters"] == "2410"  # as count_params counts
    record = json.loads(Path(mlflow_client(in_tmp).download_artifacts(
        run.info.run_id, "footprint.json", str(in_tmp))).read_text())
    pieces = record["pieces"]
    assert [p[1:] for p in pieces["predicted"]] == [p[1:] for p in pieces["built"]]
    assert len(pieces["built"]) == 4 * copies  # a copy of each weight per replica
    assert abs(record["predicted"]["chief:0"] - record["built"]["chief:0"]) <= 64 * copies


@pytest.mark.parametrize("cap", ["1", "oops"])
def test_a_malformed_cap_in_the_environment_is_one_line(gin_file, in_tmp: Path, monkeypatch,
                                                        capsys, cap: str) -> None:
    exp = gin_file(TINY)
    monkeypatch.setenv(TASK_MEMORY_ENV, cap)
    status = main(["run", exp])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USER_ERROR and len(err) == 1, err
    if cap == "oops":
        assert err[0].startswith(f"lmt: error: {TASK_MEMORY_ENV} must be a size")
    else:  # one byte: every model is refused
        assert "above the 1 B a task may use (--task-memory)" in err[0]
