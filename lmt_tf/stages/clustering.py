"""The ``cluster`` stage: fine-tune the current model while TF-MOT clusters its kernels'
weights into a few shared values; the stripped model goes on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tf_keras as keras

from lmt_tf.checks import check
from lmt_tf.compression.clustering import Clustering, distinct_values
from lmt_tf.stages.context import RunContext
from lmt_tf.stages.fine_tune import FineTune


class Cluster(FineTune):
    """Weight clustering (TF-MOT ``cluster_weights``) while fine-tuning for ``epochs``.

    Args:
      clusters: centroids per kernel (16 gives 4-bit indices).
      init: centroid initialisation: kmeans_plus_plus, linear, density_based, random.
      epochs: fine-tuning epochs.
      layers: names of the layers to cluster; empty: every layer with a kernel.
    """

    name = "cluster"
    measures_size = True

    def __init__(self, clusters: int = 16, init: str = "kmeans_plus_plus", epochs: int = 1,
                 layers: Sequence[str] = ()):
        super().__init__(epochs)
        check(isinstance(clusters, int) and clusters >= 2, "cluster.clusters",
              f"must be an integer >= 2, got {clusters!r}")
        self.clusters, self.init, self.layers = clusters, init, tuple(layers)
        Clustering(clusters, init, layers)  # checks ``init`` now, before any training

    def describe(self) -> str:
        return f"cluster ({self.clusters} centroids, {self.init}, {self.epochs} epoch(s))"

    def transform(self, context: RunContext) -> Clustering:
        return Clustering(self.clusters, self.init, self.layers)

    def report(self, context: RunContext, transform: Any, trained: keras.Model,
               log: Any) -> str:
        values = distinct_values(context.model, transform.clustered)
        log({f"distinct_values/{n}": v for n, v in values.items()}, self.epochs)
        return f"at most {max(values.values())} distinct values per kernel"
