"""The cluster stage: at most the configured number of distinct values per clustered
kernel; clusters kept through cluster-preserving QAT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmt_tf.errors import ConfigError
from lmt_tf.stages import Train
from lmt_tf.stages.clustering import Cluster
from lmt_tf.stages.quantize import QAT
from tests.conftest import all_runs
from tests.stages.test_quantize import _run


@pytest.mark.parametrize("clusters", [4, 16])
def test_each_clustered_kernel_holds_at_most_the_clusters(in_tmp: Path, clusters: int) -> None:
    result = _run([Train(), Cluster(clusters=clusters, epochs=1)])
    for layer in ("dense_0", "predictions"):
        kernel = result.model.get_layer(layer).kernel.numpy()
        assert 2 <= np.unique(kernel).size <= clusters, layer
    (run,) = all_runs(in_tmp)
    assert run.data.metrics["cluster/distinct_values/dense_0"] <= clusters
    assert run.data.metrics["cluster/test_accuracy"] > 0.5


def test_cluster_preserving_qat_keeps_the_clusters(in_tmp: Path) -> None:
    result = _run([Train(), Cluster(clusters=8, epochs=1), QAT(epochs=1, preserve="clusters")])
    (run,) = all_runs(in_tmp)
    assert run.data.metrics["qat/test_accuracy"] > 0.5
    # The QAT model's float kernels still take at most 8 values (before fake quantization).
    kernels = [w.numpy() for w in result.model.weights if w.name.endswith("kernel:0")]
    assert kernels and all(np.unique(k).size <= 8 for k in kernels)


def test_bad_cluster_settings() -> None:
    with pytest.raises(ConfigError, match="cluster.clusters must be >= 2, got 1"):
        Cluster(clusters=1)
    with pytest.raises(ConfigError, match="cluster.init must be one of"):
        Cluster(init="kmeans")
