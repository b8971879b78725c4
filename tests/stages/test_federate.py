"""The federate stage: one MLflow run with per-round metrics and the partition's
artifacts, an early stop at the target accuracy, the global model exported, a killed
run resumed at its last round into the same MLflow run, and bad input."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from lmt_tf.cli import main
from lmt_tf.errors import ConfigError
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import PartitionConfig
from lmt_tf.runtime.strategy import mirrored_strategy
from lmt_tf.stages import Export
from lmt_tf.stages.federate import Federate
from tests.conftest import all_runs, mlflow_client
from tests.stages import run_stages
from tests.test_processes import LMT, _reap, _wait_for, run_state

FEDERATED = """
include 'gin/data/digits.gin'
include 'gin/models/mlp.gin'
include 'gin/strategies/default.gin'
include 'gin/federated/fedavg.gin'
build_mlp.hidden_units = (16,)
PartitionConfig.clients = 8
FederatedConfig.client_fraction = 0.5
FederatedConfig.local_epochs = 1
FederatedConfig.local_batch_size = 10
FederatedConfig.client_learning_rate = 0.1
"""


def _config(**settings) -> FederatedConfig:
    return FederatedConfig(**{"client_fraction": 0.5, "local_epochs": 2,
                              "local_batch_size": 10, "client_learning_rate": 0.1,
                              **settings})


def test_a_federated_run_logs_every_round_and_exports(in_tmp: Path) -> None:
    stage = Federate(_config(rounds=5), PartitionConfig(clients=8, scheme="pathological"))
    result = run_stages([stage, Export()], hidden=16)
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    history = mlflow_client(in_tmp).get_metric_history(run.info.run_id,
                                                       "federate/test_accuracy")
    accuracy = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)][:5] == [1, 2, 3, 4, 5]
    assert accuracy[4] > accuracy[0]
    metrics = run.data.metrics
    assert metrics["federate/clients"] == 4
    assert metrics["federate/bytes_up_total"] == 5 * 4 * 4 * result.model.count_params()
    artifacts = {a.path for a in mlflow_client(in_tmp).list_artifacts(run.info.run_id,
                                                                      "federate")}
    assert {"federate/partition.json", "federate/partition.png",
            "federate/rounds.jsonl"} <= artifacts
    assert run.data.tags["lmt.federate.traces"] == "1"
    assert (result.run_dir / "export" / "saved_model").is_dir()
    assert result.test_metrics["accuracy"] == pytest.approx(accuracy[-1])


def test_the_run_stops_at_the_target_accuracy(in_tmp: Path) -> None:
    run_stages([Federate(_config(rounds=40, target_accuracy=0.8),
                         PartitionConfig(clients=8))], hidden=16)
    (run,) = all_runs(in_tmp)
    reached = run.data.metrics["federate/rounds_to_target"]
    assert 1 <= reached < 40
    history = mlflow_client(in_tmp).get_metric_history(run.info.run_id,
                                                       "federate/test_accuracy")
    by_round = {m.step: m.value for m in history}
    assert max(by_round) == reached and by_round[reached] >= 0.8
    assert all(v < 0.8 for step, v in by_round.items() if step < reached)


def test_the_stage_runs_in_one_process_only(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="the federate stage simulates clients in one "
                                          "process"):
        run_stages([Federate(_config(rounds=1))], strategy=lambda: mirrored_strategy(2))


def test_more_clients_than_examples_is_refused(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match="5000 clients need at least as many training "
                                          "examples, got 1168"):
        run_stages([Federate(_config(), PartitionConfig(clients=5000))])


def test_a_diverging_federated_run_fails_and_exports_nothing(gin_file, in_tmp: Path,
                                                            capsys) -> None:
    gin_file(FEDERATED + "FederatedConfig.rounds = 3\n")
    status = main(["run", "exp.gin", "--gin_param",
                   "FederatedConfig.client_learning_rate = 1e30"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("lmt: error: training diverged: loss is nan in round 1 of "
                             "federate (FederatedConfig.client_learning_rate 1e+30)")
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FAILED"
    assert run.data.tags["lmt.error"].startswith("TrainingDiverged: training diverged")
    assert not any(k.startswith("federate/") for k in run.data.metrics)  # no round logged
    client = mlflow_client(in_tmp)
    assert client.list_artifacts(run.info.run_id, "saved_model") == []
    assert not list(in_tmp.glob("lmt_work/*/*/export"))
    assert not list(in_tmp.glob("lmt_work/*/*/stages/federate/checkpoints/round-*"))


def test_bad_bindings_are_one_line_errors(gin_file, capsys) -> None:
    gin_file(FEDERATED + "FederatedConfig.client_fraction = 1.5\n")
    assert main(["run", "exp.gin"]) == 2
    assert "FederatedConfig.client_fraction must be in (0, 1], got 1.5" in capsys.readouterr().err




@pytest.mark.slow
def test_a_killed_run_resumes_at_its_last_round_in_the_same_mlflow_run(in_tmp: Path) -> None:
    (in_tmp / "exp.gin").write_text(FEDERATED + "FederatedConfig.rounds = 100000\n")
    process = subprocess.Popen([LMT, "run", "exp.gin"], cwd=in_tmp,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _wait_for(lambda: run_state(in_tmp, "federate_round") >= 3
                  or process.poll() is not None, 120, "three rounds")
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        _reap(process)
    # The round the run resumes after: its newest checkpoint (state.json is written a
    # moment after it, so a kill in between leaves it one round behind).
    (newest, *_) = sorted(in_tmp.glob("lmt_work/*/*/stages/federate/checkpoints/round-*"),
                          reverse=True)
    killed_at = int(newest.name.split("-")[1].split(".")[0])
    rounds = killed_at + 2
    done = subprocess.run([LMT, "run", "exp.gin", "--resume", "--allow-changes",
                           "--gin_param", f"FederatedConfig.rounds = {rounds}"], cwd=in_tmp,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"lmt: federate: resuming at round {killed_at + 1}" in done.stdout
    (run,) = all_runs(in_tmp)  # the same run, now finished
    assert run.info.status == "FINISHED"
    history = mlflow_client(in_tmp).get_metric_history(run.info.run_id,
                                                       "federate/test_accuracy")
    steps = sorted(m.step for m in history)
    assert steps[-1] == rounds and set(range(killed_at + 1, rounds + 1)) <= set(steps)
    assert len(steps) == len(set(steps))  # no round logged twice
