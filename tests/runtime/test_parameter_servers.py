"""The MovieLens recommender on a real cluster with 2 ps (`lmt launch`): row-sparse
updates of its sharded tables, whose optimizer slots are sharded beside them on the ps,
and a ps killed with SIGKILL mid-training, survived by a restart from the last
checkpoint into the same run. Every process is reaped."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from lmt_tf.training.checkpoints import BYTES, RESTORE_SECONDS, SAVE_SECONDS, checkpoint_bytes
from tests.conftest import all_runs, mlflow_client
from tests.runtime.test_launcher import Launch, _assert_all_gone

pytestmark = pytest.mark.slow

# Every (user, item) pair of the data looks up these rows only.
USERS, ITEMS = [3, 10, 500, 901], [7, 20, 1500]
TABLES = {"model/inner/layer_with_weights-0/embeddings": (USERS, 943),
          "model/inner/layer_with_weights-1/embeddings": (ITEMS, 1682)}
VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def _pairs(directory: Path) -> Path:
    """512 clicks (1) and non-clicks (0) of the users above on the items above."""
    rng = np.random.default_rng(0)
    x = np.stack([rng.choice(USERS, 512), rng.choice(ITEMS, 512)], axis=1).astype(np.int64)
    path = directory / "pairs.npz"
    np.savez(path, x=x, y=((x[:, 0] + x[:, 1]) % 2).astype(np.int64))
    return path


def _experiment(directory: Path, *lines: str) -> str:
    """The recommender of experiments/movielens_ps_sparse.gin (tables sharded over the
    ps, Adam for the dense layers) on the pairs above, with small tables' shards."""
    path = directory / "exp.gin"
    path.write_text("\n".join([
        "include 'experiments/movielens_ps_sparse.gin'",
        "run_experiment.data = @load_npz",
        f"load_npz.path = '{_pairs(directory)}'",
        "TrainConfig.loss = 'sparse_categorical_crossentropy'",
        "TrainConfig.metrics = ('accuracy',)",
        "build_recommender.embedding_dim = 8",
        "build_recommender.hidden_units = (8,)",
        "parameter_server_strategy.min_shard_bytes = 4096",
        "TrainConfig.global_batch_size = 64",
        "TrainConfig.steps_per_execution = 1",
        "TrainConfig.verbose = 0",
        "ExportConfig.mlflow_model = False", *lines]) + "\n")
    return str(path)


def _rows(table: np.ndarray, other: np.ndarray) -> set[int]:
    return set(np.flatnonzero((table != other).any(axis=1)).tolist())


def test_row_sparse_updates_of_tables_sharded_over_two_ps(in_tmp: Path) -> None:
    """FTRL for the tables (a dense FTRL update would rewrite every row), Adam for the
    rest. The checkpoint before training (a divergence retry saves one) and after the
    epoch differ in the looked-up rows only, in each table and in both slots."""
    exp = _experiment(in_tmp, "include 'gin/optimizers/sparse_ftrl.gin'",
                      "TrainConfig.epochs = 1", "TrainConfig.divergence_retries = 1")
    launch = Launch(["--workers", "1", "--ps", "2", "--timeout", "150", exp], in_tmp)
    assert launch.wait(200) == 0, launch.output
    _assert_all_gone(launch.pids().values())
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    (checkpoints,) = in_tmp.glob("lmt_work/*/*/checkpoints")
    before = tf.train.load_checkpoint(str(checkpoints / "ckpt-0"))
    after = tf.train.load_checkpoint(str(checkpoints / "ckpt-1"))
    shapes = after.get_variable_to_shape_map()
    for table, (ids, rows) in TABLES.items():
        changed = _rows(before.get_tensor(table + VALUE), after.get_tensor(table + VALUE))
        assert changed and changed <= set(ids), changed
        slots = [k for k in shapes if k.startswith("model/embedding_optimizer/")
                 and shapes[k] == [rows, 8]]
        assert len(slots) == 2  # FTRL's accumulator and linear term
        for slot in slots:
            assert _rows(before.get_tensor(slot), after.get_tensor(slot)) == changed
    # Adam keeps moments for the dense layers only; they trained.
    adam = [k for k in shapes if k.startswith("optimizer/_variables/")]
    assert len(adam) == 8 and all(shapes[k][0] not in (943, 1682) for k in adam)
    kernel = "model/inner/layer_with_weights-2/kernel" + VALUE
    assert not np.array_equal(before.get_tensor(kernel), after.get_tensor(kernel))

    client = mlflow_client(in_tmp)
    placement = json.loads(Path(client.download_artifacts(
        run.info.run_id, "placement.json", str(in_tmp))).read_text())
    for name in ("user_embedding", "item_embedding"):
        for part in (0, 1):  # each slot's shard on the ps of its table's shard
            (device,) = placement[f"{name}/embeddings/part_{part}:0"]
            assert device.startswith(f"/job:ps/replica:0/task:{part}/")
            for slot in ("accumulator", "linear"):
                assert placement[f"Ftrl/{slot}/{name}/embeddings/part_{part}:0"] == [device]
    assert not any("chief" in d for devices in placement.values() for d in devices)
    assert run.data.metrics[BYTES] == checkpoint_bytes(checkpoints / "ckpt-1")
    assert 0 < run.data.metrics[SAVE_SECONDS] < 60


def _state(directory: Path) -> dict:
    states = list(directory.glob("lmt_work/*/*/state.json"))
    return json.loads(states[0].read_text()) if states else {}


def test_a_ps_killed_mid_training_is_survived_by_a_restart_into_the_same_run(
        in_tmp: Path) -> None:
    epochs, steps = 4, 6  # 6 steps of 64 cover the 410 training pairs once
    exp = _experiment(in_tmp, "include 'gin/optimizers/sparse_adagrad.gin'",
                      f"TrainConfig.epochs = {epochs}", "run_experiment.stages = [@train()]")
    launch = Launch(["--workers", "1", "--ps", "2", "--restarts", "1", "--timeout", "120",
                     exp], in_tmp)
    try:
        deadline = time.monotonic() + 90
        while _state(in_tmp).get("epochs", 0) < 1:  # the first checkpoint is saved
            assert time.monotonic() < deadline and launch.process.poll() is None, \
                launch.output
            time.sleep(0.1)
        first = launch.pids()
        os.kill(first["ps:1"], signal.SIGKILL)
        saved = _state(in_tmp)["epochs"]
        assert launch.wait(200) == 0, launch.output
    finally:
        launch.wait(10)
    _assert_all_gone(first.values())
    assert re.search(r"ps:1 exited with status -9; stopping the cluster", launch.output)
    assert "restarting (1/1) from the last checkpoint" in launch.output
    resumed_at = int(re.search(r"lmt: resuming \S+ at epoch (\d+), step 1",
                               launch.output).group(1))
    # Nothing lost but the steps since the last checkpoint before the kill.
    assert saved < resumed_at <= epochs, launch.output
    (run,) = all_runs(in_tmp)  # one run through both attempts
    assert run.info.status == "FINISHED"
    assert _state(in_tmp)["epochs"] == epochs
    client = mlflow_client(in_tmp)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step for m in losses} == set(range(1, epochs + 1))
    (restore,) = client.get_metric_history(run.info.run_id, RESTORE_SECONDS)
    assert restore.step == resumed_at - 1
    (checkpoints,) = in_tmp.glob("lmt_work/*/*/checkpoints")
    final = tf.train.load_checkpoint(str(checkpoints / f"ckpt-{epochs}"))
    for optimizer in ("optimizer", "model/embedding_optimizer"):  # every planned step, once
        assert final.get_tensor(f"{optimizer}/_iterations{VALUE}") == epochs * steps
