"""The click-log experiments end to end, tiny (thousands of rows, small tables):
experiments/clicklog_dlrm.gin's bindings under the default strategy (the count
statistics fitted on the training split and kept in the exported model, the test AUC and
log-loss logged beside the Bayes optimum), and experiments/clicklog_dlrm_ps.gin's under
`lmt launch --workers 1 --ps 2` (every table split over both ps, row-sparse Adagrad,
the logged MLflow model answering raw 40-bit ids in a fresh interpreter as the
SavedModel does)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.cli import main
from lmt_tf.data.tfrecord import load_tfrecords
from lmt_tf.models import dlrm
from tests.conftest import all_runs, mlflow_client

NUM_DENSE, K = 13, 26
TINY = """
ClickLogConfig.train_examples = {train}
ClickLogConfig.validation_examples = 500
ClickLogConfig.test_examples = 2000
ClickLogConfig.shards = 2
load_clicklog.directory = 'data/tiny'
build_dlrm.buckets = {buckets}
build_dlrm.cross_buckets = 1000
build_dlrm.embedding_dim = 4
build_dlrm.bottom_units = (8,)
build_dlrm.top_units = (8,)
TrainConfig.global_batch_size = 256
TrainConfig.verbose = 0
"""


def _training_rows(directory: Path) -> np.ndarray:
    return np.concatenate([x for x, _ in load_tfrecords(str(directory)).train.chunks()])


def test_the_dlrm_experiment_fits_its_count_statistics_and_logs_test_auc(
        gin_file, in_tmp: Path) -> None:
    exp = gin_file("include 'experiments/clicklog_dlrm.gin'\n"
                   + TINY.format(train=4000, buckets=1000)
                   + "ExportConfig.mlflow_model = False\n")
    assert main(["run", exp]) == 0
    (run,) = all_runs(in_tmp)
    metrics = run.data.metrics
    assert 0 < metrics["data/bayes_test_logloss"] < metrics["test_loss"]
    assert 0.5 < metrics["data/bayes_test_auc"] <= 1 and 0 <= metrics["test_click_auc"] <= 1

    # The statistics were fitted on the training rows (nothing bound in gin) ...
    fitted = json.loads(Path(mlflow_client(in_tmp).download_artifacts(
        run.info.run_id, "preprocessing/fitted.json", str(in_tmp))).read_text())
    (step,) = fitted["steps"]
    mean, std = dlrm.dense_statistics(_training_rows(in_tmp / "data/tiny"), NUM_DENSE)
    np.testing.assert_allclose(step["arguments"]["dense_mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(step["arguments"]["dense_std"], std, rtol=1e-9)
    assert min(std) > 0.1 and max(abs(m) for m in mean) > 0.5  # not the defaults 0, 1

    # ... and are in the exported model, which scores the test split as the run logged.
    import tf_keras as keras
    from sklearn.metrics import log_loss, roc_auc_score

    (saved,) = in_tmp.glob("lmt_work/*/*/export/saved_model")
    model = keras.models.load_model(str(saved), compile=False)
    layer = model.get_layer("log_standardize")
    np.testing.assert_allclose(layer.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(layer.std, std, rtol=1e-6)
    test = load_tfrecords(str(in_tmp / "data/tiny")).test
    x, y = (np.concatenate(parts) for parts in zip(*test.chunks(), strict=True))
    assert x.dtype == np.int64 and x[:, NUM_DENSE:].max() > 2**31  # raw 40-bit ids
    click = model.predict(x, verbose=0)[:, 1]
    assert abs(roc_auc_score(y, click) - metrics["test_click_auc"]) < 2e-3
    assert abs(log_loss(y, click) - metrics["test_loss"]) < 1e-4


def test_click_auc_is_the_auc_of_the_click_column() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1)
    metric = dlrm.ClickAUC()
    metric.update_state(y, np.stack([1 - p, p], axis=1).astype(np.float32))
    assert abs(float(metric.result()) - roc_auc_score(y, p)) < 2e-3


FRESH = """
import sys
import numpy as np
import mlflow.pyfunc
rows = np.load(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(rows).to_numpy())
assert not any(m.split(".")[0] == "lmt_tf" for m in sys.modules), "lmt_tf was imported"
"""


@pytest.mark.slow
def test_the_ps_dlrm_splits_every_table_over_both_ps_and_serves_raw_rows(
        gin_file, in_tmp: Path) -> None:
    """Feature f's table has 20000 + f rows (so each table is known by its shape); a
    divergence retry saves checkpoint 0 before training, so the rows the epoch changed
    show: only buckets of ids in the training rows, in the table and its Adagrad slot."""
    import tensorflow as tf

    from lmt_tf.models.saved import load_saved_model
    from tests.runtime.test_launcher import Launch, _assert_all_gone

    buckets = [20000 + f for f in range(K)]
    exp = gin_file("include 'experiments/clicklog_dlrm_ps.gin'\n"
                   + TINY.format(train=2048, buckets=buckets)
                   + "parameter_server_strategy.min_shard_bytes = 4096\n"
                   "TrainConfig.steps_per_epoch = 8\nTrainConfig.steps_per_execution = 1\n"
                   "TrainConfig.divergence_retries = 1\n")
    launch = Launch(["--workers", "1", "--ps", "2", "--timeout", "150", exp], in_tmp)
    assert launch.wait(200) == 0, launch.output
    _assert_all_gone(launch.pids().values())
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    client = mlflow_client(in_tmp)

    placement = json.loads(Path(client.download_artifacts(
        run.info.run_id, "placement.json", str(in_tmp))).read_text())
    tables = [f"cat_{f}_embedding" for f in range(K)] + [
        f"cross_{a}_{b}_embedding" for a, b in ((0, 1), (4, 5), (10, 12), (17, 18))]
    for name in tables:
        for part in (0, 1):
            (device,) = placement[f"{name}/embeddings/part_{part}:0"]
            assert device.startswith(f"/job:ps/replica:0/task:{part}/"), (name, device)
            slots = [k for k in placement if k.endswith(f"/{name}/embeddings/part_{part}:0")
                     and "accumulator" in k]
            assert len(slots) == 1 and placement[slots[0]] == [device], slots
    assert not any("chief" in d for devices in placement.values() for d in devices)

    (checkpoints,) = in_tmp.glob("lmt_work/*/*/checkpoints")
    before = tf.train.load_checkpoint(str(checkpoints / "ckpt-0"))
    after = tf.train.load_checkpoint(str(checkpoints / "ckpt-1"))
    shapes = after.get_variable_to_shape_map()
    rows = _training_rows(in_tmp / "data/tiny")
    for f in (2, 3, 20):  # three of the large vocabularies (10M, 2M, 7M ids)
        keys = [k for k in shapes if shapes[k] == [buckets[f], 4]]
        (table,) = [k for k in keys if k.startswith("model/") and "optimizer" not in k]
        (slot,) = [k for k in keys if k != table]
        looked_up = {dlrm.hash_id(int(i), f, buckets[f]) for i in rows[:, NUM_DENSE + f]}
        old, new = before.get_tensor(table), after.get_tensor(table)
        changed = set(np.flatnonzero((old != new).any(axis=1)).tolist())
        assert changed and changed <= looked_up and len(changed) < buckets[f] // 4, f
        moved = (before.get_tensor(slot) != after.get_tensor(slot)).any(axis=1)
        assert set(np.flatnonzero(moved).tolist()) == changed

    # The export: raw int64 rows with ids above 2**31 answered by the SavedModel and by
    # the MLflow model in a fresh interpreter alike.
    (saved,) = in_tmp.glob("lmt_work/*/*/export/saved_model")
    test = load_tfrecords(str(in_tmp / "data/tiny")).test.sample(6)
    big = test[0].copy()
    big[NUM_DENSE:] = (1 << 40) - 1 - np.arange(K)  # the largest raw ids
    x = np.concatenate([test, big[None]]).astype(np.int64)
    assert (x[:, NUM_DENSE:] > 2**31).any(axis=1).all()
    expected = load_saved_model(saved).predict(x, verbose=0)
    np.save(in_tmp / "rows.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{in_tmp / 'mlruns.db'}"
    done = subprocess.run([sys.executable, "-c", FRESH, f"runs:/{run.info.run_id}/model",
                           str(in_tmp / "rows.npy"), str(in_tmp / "out.npy")], cwd=in_tmp,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = np.load(in_tmp / "out.npy")
    np.testing.assert_allclose(answers, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answers.sum(axis=1), 1, atol=1e-5)
    assert len(np.unique(answers[:, 1].round(6))) > 1  # not one constant answer
