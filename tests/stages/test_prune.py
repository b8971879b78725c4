"""The prune stage: the achieved sparsity equals the target per layer; 2:4 holds in every
group of four; the stripped model goes on to export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras

from lmt_tf.cli import main
from lmt_tf.errors import ConfigError
from lmt_tf.stages import Export, Train
from lmt_tf.stages.prune import Prune
from tests.conftest import TINY, all_runs
from tests.stages import run_stages


def _run(stages, strategy=None, **options):
    return run_stages(stages, strategy=strategy, **options)


def _kernels(model: keras.Model) -> dict[str, np.ndarray]:
    return {layer.name: layer.kernel.numpy() for layer in model.layers
            if hasattr(layer, "kernel")}


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
@pytest.mark.parametrize("target", [0.5, 0.8])
def test_sparsity_per_layer_equals_the_target(in_tmp: Path, strategy: str,
                                              target: float) -> None:
    from lmt_tf.runtime.strategy import default_strategy, mirrored_strategy

    make = default_strategy if strategy == "default" else lambda: mirrored_strategy(2)
    result = _run([Train(), Prune(final_sparsity=target, epochs=1, frequency=1), Export()],
                  make)
    for name, kernel in _kernels(result.model).items():
        # TF-MOT keeps round(size * (1 - sparsity)) weights of each kernel.
        expected_zeros = kernel.size - round(kernel.size * (1 - target))
        assert int(np.sum(kernel == 0)) == expected_zeros, name
    exported = keras.models.load_model(str(result.run_dir / "export" / "saved_model"),
                                       compile=False)
    for name, kernel in _kernels(exported).items():
        np.testing.assert_array_equal(kernel, _kernels(result.model)[name])
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["prune/sparsity/dense_0"] == pytest.approx(target, abs=1e-3)
    assert 0 < run.data.metrics["prune/test_accuracy"] <= 1
    # Zeros compress: at 80% sparsity the gzipped weights are a fraction of the dense ones.
    assert run.data.metrics["prune/gzip_ratio"] > (2.0 if target == 0.8 else 1.2)
    assert "test_accuracy" in run.data.metrics  # the train stage keeps its plain names


def test_two_of_every_four_input_weights_at_most(in_tmp: Path) -> None:
    result = _run([Train(), Prune(m_by_n=(2, 4), epochs=1)])
    for name, kernel in _kernels(result.model).items():
        groups = kernel.T.reshape(kernel.shape[1], -1, 4)  # 4 consecutive inputs per output
        assert int((groups != 0).sum(axis=-1).max()) <= 2, name
        assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01), name


def test_pruning_from_gin(gin_file, in_tmp: Path) -> None:
    gin_file(TINY + "run_experiment.stages = [@train(), @prune(), @export()]\n"
                    "prune.final_sparsity = 0.5\nprune.epochs = 1\nprune.layers = ['dense_0']\n"
                    "ExportConfig.mlflow_model = False\n")
    assert main(["run", "exp.gin"]) == 0
    (run,) = all_runs(in_tmp)
    assert run.data.metrics["prune/sparsity/dense_0"] == pytest.approx(0.5, abs=1e-3)
    assert "prune/sparsity/predictions" not in run.data.metrics


@pytest.mark.parametrize("kwargs, message", [
    ({"final_sparsity": 1.0}, "prune.final_sparsity must be in (0, 1)"),
    ({"schedule": "linear"}, "prune.schedule must be one of"),
    ({"m_by_n": (4, 2)}, "prune.m_by_n must be (m, n) with 0 < m < n"),
    ({"epochs": 0}, "prune.epochs must be >= 1, got 0"),
])
def test_bad_prune_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Prune(**kwargs)


def test_a_layer_that_is_not_there_fails_the_run_before_training(in_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=r"prune.layers names \['conv_9'\], not layers"):
        _run([Train(), Prune(layers=("conv_9",)), Export()])
    (run,) = all_runs(in_tmp)  # checked before the first stage runs: nothing trained
    assert run.info.status == "FAILED" and "loss" not in run.data.metrics


def test_a_run_killed_after_pruning_resumes_with_the_pruned_model(in_tmp: Path) -> None:
    from tests.conftest import mlflow_client
    from tests.stages.test_stages import _Interrupted

    stages = [Train(), Prune(final_sparsity=0.5, epochs=1, frequency=1)]
    with pytest.raises(KeyboardInterrupt):
        _run([*stages, _Interrupted(fail=True), Export()])
    resumed = _run([*stages, _Interrupted(fail=False), Export()], resume=True)
    for name, kernel in _kernels(resumed.model).items():
        assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01), name
    client = mlflow_client(in_tmp)
    (run,) = all_runs(in_tmp)
    assert run.info.status == "FINISHED" and run.info.run_id == resumed.run_id
    # Pruning ran once: its test metrics were logged once.
    assert len(client.get_metric_history(run.info.run_id, "prune/test_accuracy")) == 1
