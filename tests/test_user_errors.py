"""Every mistake a user can make ends in one line on stderr and exit status 2, and leaves
no run RUNNING (a run already started ends FAILED): gin values, data files, the tracking
store, the command line and the cluster description."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lmt_tf.cli import main
from lmt_tf.process import EXIT_USER_ERROR
from tests.conftest import TINY, all_runs


def _csv(text: str) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / "data.csv").write_text(text)
    return write


def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        np.savez(directory / "data.npz", **arrays)
    return write


def _file(name: str, text: str = "not what it should be\n") -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / name).write_text(text)
    return write


def _files(texts: dict[str, str]) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        for name, text in texts.items():
            (directory / name).write_text(text)
    return write


def _bad_manifest(directory: Path) -> None:
    (directory / "shards").mkdir()
    (directory / "shards" / "manifest.json").write_text("{not json")


@dataclass
class Case:
    args: list[str]  # after `lmt`
    expected: str  # in the one stderr line
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def _run(*bindings: str) -> list[str]:
    args = ["run", "exp.gin"]
    for binding in bindings:
        args += ["--gin_param", binding]
    return args


CSV_DATA = ("run_experiment.data = @load_csv", "load_csv.path = 'data.csv'")
NPZ_DATA = ("run_experiment.data = @load_npz", "load_npz.path = 'data.npz'")
TWO_WORKERS = json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                          "task": {"type": "worker", "index": 0}})

CASES = {
    # gin values
    "optimizer argument of the wrong kind": Case(
        _run("keras.optimizers.SGD.learning_rate = 'fast'"),
        "keras.optimizers.SGD.learning_rate must be a number or a LearningRateSchedule"),
    "unknown Keras loss": Case(
        _run("TrainConfig.loss = 'sparse_categorical_crossentropyy'"), "TrainConfig.loss:"),
    "unknown Keras metric": Case(
        _run("TrainConfig.metrics = ['acuracy']"),
        "unknown metric 'acuracy' (did you mean accuracy"),
    "data source argument of the wrong type": Case(
        _run("load_digits.validation_fraction = 'a tenth'"),
        "load_digits.validation_fraction must be a number in [0, 1), got 'a tenth' (str)"),
    "data source argument out of range": Case(
        _run("load_digits.test_fraction = 1.5"), "test_fraction must be in [0, 1)"),
    "model argument of the wrong type": Case(
        _run("build_mlp.hidden_units = 'wide'"),
        "build_mlp.hidden_units must be a list of integers >= 1, got 'wide' (str)"),
    # types and ranges of every configurable, from its hints (a few of each kind)
    "evaluate's noise levels not a list": Case(
        _run("evaluate.noise_levels = 5"), "evaluate.noise_levels must be a list of numbers"),
    "distill's alpha a word": Case(
        _run("distill.alpha = 'x'"), "distill.alpha must be a number in [0, 1], got 'x'"),
    "distill's temperature None": Case(
        _run("distill.temperature = None"), "distill.temperature must be a number > 0"),
    "prune's sparsity a word": Case(
        _run("prune.final_sparsity = 'high'"), "prune.final_sparsity must be a number in (0, 1)"),
    "prune's m_by_n one number": Case(_run("prune.m_by_n = 2"), "prune.m_by_n must be None or ("),
    "tflite's representative examples a word": Case(
        _run("tflite.representative_examples = 'many'"),
        "tflite.representative_examples must be an integer >= 1, got 'many'"),
    "tflite's representative examples a fraction": Case(
        _run("tflite.representative_examples = 100.5"),
        "tflite.representative_examples must be an integer >= 1, got 100.5"),
    "tflite's modes one string": Case(
        _run("tflite.modes = 'int8'"), "got 'int8' (a string, not a list: write ['int8'])"),
    "preprocessing's quantiles one number": Case(
        _run("Preprocessing.clip_quantiles = 0.5"), "Preprocessing.clip_quantiles must be ("),
    "preprocessing's k a word beside variance": Case(
        _run("Preprocessing.select = 'variance'", "Preprocessing.k = 'ten'"),
        "Preprocessing.k must be None or an integer >= 1, got 'ten'"),
    "a data source's seed negative": Case(_run("load_digits.seed = -1"),
                                          "load_digits.seed must be >= 0, got -1"),
    "a strategy's setting of the wrong type": Case(
        _run("run_experiment.strategy = @mirrored_strategy",
             "mirrored_strategy.num_cpu_devices = '2'"),
        "mirrored_strategy.num_cpu_devices must be an integer >= 1"),
    "a server optimizer's setting of the wrong type": Case(
        _run("FedAvgM.momentum = 'high'"), "FedAvgM.momentum must be a number"),
    "a gradient transform's limit of the wrong type": Case(
        _run("ClipByNorm.limit = [1]"), "ClipByNorm.limit must be a number > 0"),
    "a weight-decay exclusion of an unknown kind": Case(
        _run("TrainConfig.exclude_from_weight_decay = ['layernorm']"),
        "TrainConfig.exclude_from_weight_decay must be a list of values from ('biases', "
        "'norms', 'embeddings'), got ['layernorm']"),
    "layer-wise rate decay on a model without transformer blocks": Case(
        _run("TrainConfig.layer_decay = 0.8"),
        "TrainConfig.layer_decay needs transformer blocks, layers named block{i}_... "
        "(block0_attention, block0_ffn1, ...), but model 'mlp' has none (layers with "
        "weights: dense_0, predictions)"),
    "a config class where its instance belongs": Case(
        _run("federate.config = @FederatedConfig"), "call it, @FederatedConfig()"),
    "a macro of the wrong type": Case(
        _run("SPARSITY = 'high'", "prune.final_sparsity = %SPARSITY"),
        "prune.final_sparsity must be a number in (0, 1), got %SPARSITY = 'high'"),
    "a scoped binding of the wrong type": Case(
        _run("late/prune.epochs = 'two'"), "late/prune.epochs must be an integer >= 1"),
    # ranges that depend on the data or the model: checked before the first stage runs
    "more centroids than weights": Case(
        _run("run_experiment.stages = [@train(), @cluster(), @export()]",
             "cluster.clusters = 100000"),
        "cluster.clusters must be at most the 320 weights of the smallest clustered kernel"),
    "a clustered layer that is not there": Case(
        _run("run_experiment.stages = [@train(), @cluster(), @export()]",
             "cluster.layers = ['conv_9']"), "cluster.layers names ['conv_9'] to cluster"),
    "a pruned layer that is not there": Case(
        _run("run_experiment.stages = [@train(), @prune(), @export()]",
             "prune.layers = ['conv_9']"), "prune.layers names ['conv_9'], not layers"),
    "more representative examples than training examples": Case(
        _run("run_experiment.stages = [@train(), @tflite(), @export()]",
             "tflite.representative_examples = 5000"),
        "tflite.representative_examples must be at most the 1168 training examples"),
    # the order of the stages
    "tflite before anything trains": Case(
        _run("run_experiment.stages = [@tflite(), @train(), @export()]"),
        "tflite needs a trained model, and no stage before it trains one"),
    "export of an untrained model": Case(
        _run("run_experiment.stages = [@export()]"),
        "or set export.allow_untrained = True"),
    "distill without a teacher or a trained model": Case(
        _run("run_experiment.stages = [@distill(), @export()]"), "or set distill.teacher"),
    "evaluate of this run's model before training": Case(
        _run("run_experiment.stages = [@evaluate(), @train()]"), "or set evaluate.model"),
    "prune before train": Case(
        _run("run_experiment.stages = [@prune(), @train(), @export()]"),
        "prune needs a trained model"),
    "a Flower server without a federate stage": Case(
        ["run", "exp.gin", "--flower-server", "127.0.0.1:1"],
        "a Flower deployment needs a federate stage"),
    # gin files that are not complete experiments
    "an empty gin file": Case(["run", "empty.gin"], "empty.gin binds nothing",
                              _file("empty.gin", "")),
    "a gin file that includes itself": Case(
        ["run", "self.gin"], "gin file self.gin includes itself (self.gin -> self.gin)",
        _file("self.gin", "include 'self.gin'\n")),
    "gin files that include each other": Case(
        ["run", "a.gin"], "gin file a.gin includes itself (a.gin -> b.gin -> a.gin)",
        _files({"a.gin": "include 'b.gin'\n", "b.gin": "include 'a.gin'\n"})),
    "a gin file without a model": Case(
        ["run", "data.gin"], "data.gin is not a complete experiment: it does not set "
        "run_experiment.model", _file("data.gin", "include 'gin/data/digits.gin'\n")),
    "a gin file without data": Case(
        ["run", "model.gin"], "it does not set run_experiment.data",
        _file("model.gin", "include 'gin/models/mlp.gin'\n")),
    "optimizer bound to something that is not one": Case(
        _run("TrainConfig.optimizer = @build_mlp"), "TrainConfig.optimizer:"),
    "batch larger than the data": Case(
        _run("TrainConfig.global_batch_size = 100000"), "exceeds the 1168 training"),
    "steps per epoch out of range": Case(
        _run("TrainConfig.steps_per_epoch = 1000"), "steps_per_epoch must be in [1, 18]"),
    "unknown precision": Case(
        _run("TrainConfig.precision = 'float8'"), "TrainConfig.precision must be one of"),
    "micro-batches that do not divide the batch": Case(
        _run("TrainConfig.micro_batches = 3"), "3 must divide the per-replica batch"),
    "unknown shard policy": Case(
        _run("InputConfig.auto_shard_policy = 'FILES'"), "auto_shard_policy must be one of"),
    "negative logging interval": Case(
        _run("TrackingConfig.log_every_n_steps = -1"), "log_every_n_steps must be >= 0"),
    "experiment name leaving the work directory": Case(
        _run("run_experiment.name = '../elsewhere'"), "run_experiment.name must be"),
    "binding without a value": Case(
        _run("TrainConfig.epochs = "), "Unable to parse value. in binding 'TrainConfig.epochs = '"),
    "unknown all-reduce": Case(
        _run("run_experiment.strategy = @mirrored_strategy",
             "mirrored_strategy.cross_device_ops = 'carrier_pigeon'"), "cross_device_ops"),
    # data files
    "CSV file missing": Case(_run(*CSV_DATA), "CSV file not found: data.csv"),
    "CSV with a word among numbers": Case(
        _run(*CSV_DATA), "line 4, column 'b': 'x' is not a number",
        _csv("a,b,label\n1,2,0\n\n3,x,1\n")),
    "CSV with a short row": Case(
        _run(*CSV_DATA), "line 2: 2 cells, the header has 3", _csv("a,b,label\n1,2\n")),
    "CSV without the label column": Case(
        _run(*CSV_DATA), "no column 'label'", _csv("a,b,class\n1,2,0\n")),
    "CSV with a header only": Case(_run(*CSV_DATA), "no rows below the header",
                                   _csv("a,b,label\n")),
    "CSV with fractional labels": Case(
        _run(*CSV_DATA), "data.csv, line 3, column 'label': '0.5' is not a class id",
        _csv("a,b,label\n1,2,0\n3,4,0.5\n5,6,1.7\n" + "7,8,1\n" * 20)),
    "CSV with an infinite cell": Case(
        _run(*CSV_DATA), "data.csv, line 4, column 'b': 'inf' is not a finite number",
        _csv("a,b,label\n1,2,0\n3,4,1\n5,inf,1\n" + "7,8,1\n" * 20)),
    "npz with fractional labels": Case(
        _run(*NPZ_DATA), "data.npz: y[1] = 0.2 is not a class id",
        _npz(x=np.zeros((100, 2), np.float32), y=np.r_[0, 0.2, np.ones(98)])),
    "npz with an infinite feature": Case(
        _run(*NPZ_DATA), "is not a finite number",
        _npz(x=np.r_[[[np.inf, 0]], np.zeros((99, 2))].astype(np.float32),
             y=np.arange(100) % 2)),
    "npz with missing features and no imputation": Case(
        _run(*NPZ_DATA), "missing values (NaN), e.g. example",
        _npz(x=np.r_[np.full((50, 2), np.nan), np.zeros((50, 2))].astype(np.float32),
             y=np.arange(100) % 2)),
    "CSV with a negative label": Case(
        _run(*CSV_DATA), "labels outside [0, 2)",
        _csv("a,b,label\n" + "".join(f"{i},{i},{i % 3 - 1}\n" for i in range(60)))),
    "npz with other keys": Case(_run(*NPZ_DATA), "expected x, y",
                                _npz(features=np.zeros((4, 2)))),
    "npz examples without features": Case(
        _run(*NPZ_DATA), "at least one feature",
        _npz(x=np.zeros(100, np.float32), y=np.arange(100) % 2)),
    "TFRecord directory without shards": Case(
        _run("run_experiment.data = @load_tfrecords", "load_tfrecords.directory = 'none'"),
        "no TFRecord shards in none"),
    "TFRecord manifest that is not JSON": Case(
        _run("run_experiment.data = @load_tfrecords", "load_tfrecords.directory = 'shards'"),
        "is not a manifest written by `lmt shard`", _bad_manifest),
    # the tracking store
    "store file that is not a database": Case(
        _run(), "cannot use the MLflow store", _file("notes.db"),
        {"MLFLOW_TRACKING_URI": "sqlite:///notes.db"}),
    "artifact location that is a file": Case(
        _run("TrackingConfig.artifact_root = 'artifacts'"), "is a file, not a directory",
        _file("artifacts")),
    "store in a directory that cannot exist": Case(
        _run(), "cannot use the MLflow store", _file("blocker"),
        {"MLFLOW_TRACKING_URI": "sqlite:///blocker/mlruns.db"}),
    "unreachable tracking server": Case(
        _run(), "MLflow tracking server http://127.0.0.1:1 is unreachable", None,
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}),
    "work directory that cannot be made": Case(
        _run("run_experiment.work_dir = 'blocker/work'"), "cannot create a run directory",
        _file("blocker")),
    # the command line
    "no experiment file": Case(["run"], "the following arguments are required: gin_file"),
    "unknown option": Case(["run", "exp.gin", "--epochs", "3"], "unrecognized arguments"),
    "port out of range": Case(["ui", "--port", "70000"], "port must be in 1..65535"),
    "port that is not a number": Case(["ui", "--port", "http"], "port must be a number"),
    "zero workers": Case(["launch", "--workers", "0", "exp.gin"], "--workers must be at least"),
    "negative timeout": Case(["launch", "--workers", "1", "--timeout", "-1", "exp.gin"],
                             "must not be negative"),
    "launching a missing file": Case(["launch", "--workers", "2", "nope.gin"],
                                     "gin file not found: nope.gin"),
    "--allow-changes without --resume": Case(["run", "exp.gin", "--allow-changes"],
                                             "--allow-changes only applies to --resume"),
    "resuming with nothing to resume": Case(["run", "exp.gin", "--resume"],
                                            "nothing to resume"),
    "run name with a path in it": Case(["run", "exp.gin", "--run-name", "a/../../b"],
                                       "--run-name must be"),
    "isolated launch with a tracking server": Case(
        ["launch", "--workers", "1", "exp.gin"], "add --network host", None,
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}),
    "zero shards": Case(["shard", "load_digits", "--shards", "0", "--output", "out"],
                        "--shards must be at least 1"),
    # the cluster
    "TF_CONFIG that is not JSON": Case(
        _run("run_experiment.strategy = @multi_worker_mirrored_strategy"),
        "TF_CONFIG is not valid JSON", None, {"TF_CONFIG": "{cluster"}),
    "TF_CONFIG with an unknown job": Case(
        _run("run_experiment.strategy = @multi_worker_mirrored_strategy"),
        "names job 'boss'", None,
        {"TF_CONFIG": json.dumps({"cluster": {"boss": ["127.0.0.1:1"]},
                                  "task": {"type": "boss", "index": 0}})}),
    "parameter servers without a cluster": Case(
        _run("run_experiment.strategy = @parameter_server_strategy"),
        "needs TF_CONFIG with at least one worker and one ps"),
    "SLURM cluster outside SLURM": Case(
        _run("run_experiment.strategy = @multi_worker_mirrored_strategy",
             "multi_worker_mirrored_strategy.cluster = 'slurm'"), "not inside a SLURM job"),
    "unknown collective implementation": Case(
        _run("run_experiment.strategy = @multi_worker_mirrored_strategy",
             "multi_worker_mirrored_strategy.communication = 'carrier_pigeon'"),
        "communication must be one of", None, {"TF_CONFIG": TWO_WORKERS}),
}


def test_the_table_is_at_least_thirty_distinct_inputs() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_user_mistake_is_one_line_exit_2_and_no_running_run(
        name: str, gin_file, in_tmp: Path, monkeypatch, capsys) -> None:
    case = CASES[name]
    gin_file(TINY)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.setup:
        case.setup(in_tmp)
    assert main(case.args) == EXIT_USER_ERROR
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("lmt: error: ") and case.expected in err[0], err[0]
    if (in_tmp / "mlruns.db").is_file() and "MLFLOW_TRACKING_URI" not in case.env:
        assert [r.info.status for r in all_runs(in_tmp) if r.info.status != "FAILED"] == []



def test_a_run_that_fails_before_training_is_failed_with_its_error(gin_file, in_tmp: Path,
                                                                   capsys) -> None:
    gin_file(TINY)
    # (A model builder's error comes before the run, from the pre-flight size check; a
    # technique's check of the strategy comes as the trainer builds, inside the run.)
    assert main(["run", "exp.gin", "--gin_param", "TrainConfig.local_steps = 2"]) == 2
    (run,) = all_runs(in_tmp)  # the model is built once the run has started
    assert run.info.status == "FAILED"
    assert "TrainConfig.local_steps cannot be used" in run.data.tags["lmt.error"]
    assert "test_loss" not in run.data.metrics


def test_a_model_builders_error_comes_before_any_run(gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", "--gin_param", "build_mlp.activation = 'wiggly'"]) == 2
    assert "lmt: error: run_experiment.model:" in capsys.readouterr().err
    assert all_runs(in_tmp) == []  # described (and refused) before the run started
