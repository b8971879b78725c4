"""Weight clustering with TF-MOT as a model transform: ``cluster_weights`` ties each
kernel's weights to a few shared centroids while fine-tuning; ``strip_clustering`` leaves
a plain model whose kernels hold at most that many distinct values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tf_keras as keras

from lmt_tf.compression import tfmot
from lmt_tf.errors import ConfigError
from lmt_tf.optim.model_transforms import ModelTransform

INITIALISATIONS = ("kmeans_plus_plus", "linear", "density_based", "random")


def _clustering() -> Any:
    return tfmot().clustering.keras


class Clustering(ModelTransform):
    """Clusters the kernels of ``layers`` (all clusterable layers if empty) into
    ``clusters`` centroids, initialised as ``init`` says."""

    def __init__(self, clusters: int, init: str = "kmeans_plus_plus",
                 layers: Sequence[str] = ()):
        if init not in INITIALISATIONS:
            raise ConfigError(f"cluster.init must be one of {INITIALISATIONS}, got {init!r}")
        self.clusters, self.init, self.layers = clusters, init, tuple(layers)
        self.clustered: list[str] = []

    def wrap(self, model: keras.Model) -> keras.Model:
        chosen = set(clustered_kernels(model, self.layers, self.clusters))
        init = getattr(_clustering().CentroidInitialization, self.init.upper())

        def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
            if layer.name not in chosen:
                return layer  # the same layer objects: the trained weights carry over
            return _clustering().cluster_weights(layer, number_of_clusters=self.clusters,
                                                 cluster_centroids_init=init)

        self.clustered = sorted(chosen)
        return keras.models.clone_model(model, clone_function=clone)

    def strip(self, wrapped: keras.Model) -> keras.Model:
        return _clustering().strip_clustering(wrapped)


def clustered_kernels(model: keras.Model, layers: Sequence[str] = (),
                      clusters: int = 2) -> dict[str, int]:
    """The layers of ``model`` that clustering ``layers`` (empty: every layer with a
    kernel) into ``clusters`` centroids clusters, with their kernels' sizes.

    Raises:
      ConfigError: for a name that is not a layer with a kernel, or a kernel with fewer
        weights than centroids (k-means++ cannot place more centroids than points).
    """
    kernels = {layer.name: layer.kernel.shape.num_elements() for layer in model.layers
               if layer.weights and hasattr(layer, "kernel")}
    unknown = sorted(set(layers) - set(kernels))
    if unknown or not kernels:
        raise ConfigError(f"cluster.layers names {unknown or 'nothing'} to cluster in "
                          f"{model.name!r} (layers with a kernel: "
                          f"{', '.join(kernels) or 'none'})")
    chosen = {name: size for name, size in kernels.items() if name in (layers or kernels)}
    smallest = min(chosen, key=chosen.get)
    if clusters > chosen[smallest]:
        raise ConfigError(f"cluster.clusters must be at most the {chosen[smallest]} weights "
                          f"of the smallest clustered kernel ({smallest}), got {clusters}")
    return chosen


def distinct_values(model: keras.Model, layers: Sequence[str]) -> dict[str, int]:
    """How many distinct values the kernel of each of ``layers`` holds."""
    return {name: int(np.unique(model.get_layer(name).kernel.numpy()).size) for name in layers}
