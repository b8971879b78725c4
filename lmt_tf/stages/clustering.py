"""The ``cluster`` stage: fine-tune the current model while TF-MOT clusters its kernels'
weights into a few shared values; the stripped model goes on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tf_keras as keras

from lmt_tf.checks import Annotated, OneOf, Range, check_arguments
from lmt_tf.compression.clustering import (
    INITIALISATIONS,
    Clustering,
    clustered_kernels,
    distinct_values,
)
from lmt_tf.stages.context import RunContext
from lmt_tf.stages.fine_tune import Epochs, FineTune


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

    def __init__(self, clusters: Annotated[int, Range(ge=2)] = 16,
                 init: Annotated[str, OneOf(*INITIALISATIONS)] = "kmeans_plus_plus",
                 epochs: Epochs = 1, layers: Sequence[str] = ()):
        check_arguments(self.name, type(self), locals())
        super().__init__(epochs)
        self.clusters, self.init, self.layers = clusters, init, tuple(layers)

    def check(self, context: RunContext) -> None:
        # The layers and their sizes, known before any training.
        clustered_kernels(context.model, self.layers, self.clusters)

    def describe(self) -> str:
        return f"cluster ({self.clusters} centroids, {self.init}, {self.epochs} epoch(s))"

    def transform(self, context: RunContext) -> Clustering:
        return Clustering(self.clusters, self.init, self.layers)

    def report(self, context: RunContext, transform: Any, trained: keras.Model,
               log: Any) -> str:
        values = distinct_values(context.model, transform.clustered)
        log({f"distinct_values/{n}": v for n, v in values.items()}, self.epochs)
        return f"at most {max(values.values())} distinct values per kernel"
