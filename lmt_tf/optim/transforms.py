"""Gradient transforms, applied to the gradient aggregated over all replicas (the
gradient of one large batch) before the optimizer update. Each is a callable
``(gradients, variables) -> gradients``; a run applies them in the order configured."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import check, check_types

Gradients = list[tf.Tensor]


def _dense(gradients: Sequence[tf.Tensor | tf.IndexedSlices]) -> Gradients:
    return [tf.convert_to_tensor(g) for g in gradients]


def global_norm(gradients: Sequence[tf.Tensor]) -> tf.Tensor:
    """The L2 norm of all gradients together."""
    return tf.linalg.global_norm(_dense(gradients))


@dataclass
class _Clip:
    """A transform bounded by a positive ``limit``."""

    limit: float = 1.0

    def __post_init__(self) -> None:
        check_types(self)
        check(self.limit > 0, f"{type(self).__name__}.limit", f"must be > 0, got {self.limit}")


class ClipByValue(_Clip):
    """Clips every gradient element into [-limit, limit]."""

    def __call__(self, gradients: Gradients, variables: Sequence[tf.Variable]) -> Gradients:
        return [tf.clip_by_value(g, -self.limit, self.limit) for g in _dense(gradients)]


class ClipByNorm(_Clip):
    """Rescales each gradient tensor whose L2 norm exceeds ``limit`` to norm ``limit``."""

    def __call__(self, gradients: Gradients, variables: Sequence[tf.Variable]) -> Gradients:
        return [tf.clip_by_norm(g, self.limit) for g in _dense(gradients)]


class ClipByGlobalNorm(_Clip):
    """Rescales all gradients together when their global L2 norm exceeds ``limit``."""

    def __call__(self, gradients: Gradients, variables: Sequence[tf.Variable]) -> Gradients:
        return list(tf.clip_by_global_norm(_dense(gradients), self.limit)[0])


def unitwise_norm(x: tf.Tensor) -> tf.Tensor:
    """L2 norm per output unit: over all axes but the last (dense and conv kernels: one
    norm per output unit or channel); for vectors and scalars, the absolute values."""
    if x.shape.rank is None or x.shape.rank <= 1:
        return tf.abs(x)
    axes = list(range(x.shape.rank - 1))
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))


@dataclass
class AdaptiveGradientClipping:
    """Adaptive gradient clipping (Brock et al., 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization"): for each unit, a gradient whose norm exceeds
    ``clip`` times max(the weight's norm, ``eps``) is rescaled down to that.

    ``exclude_final_layer`` leaves the classifier layer unclipped, as the paper does.
    """

    clip: float = 0.01  # lambda: the largest gradient-to-weight norm ratio per unit
    eps: float = 1e-3  # weight norms below this count as eps (zero-initialised units)
    exclude_final_layer: bool = True
    excluded: tuple[str, ...] = ()  # variable names left alone (set by bind)

    def __post_init__(self) -> None:
        check_types(self)
        check(self.clip > 0, "AdaptiveGradientClipping.clip", f"must be > 0, got {self.clip}")
        check(self.eps > 0, "AdaptiveGradientClipping.eps", f"must be > 0, got {self.eps}")

    def bind(self, model: keras.Model) -> None:
        """Learns which variables belong to the final layer with weights."""
        if self.exclude_final_layer:
            final = [layer for layer in model.layers if layer.trainable_weights][-1]
            self.excluded = tuple(v.name for v in final.trainable_weights)

    def __call__(self, gradients: Gradients, variables: Sequence[tf.Variable]) -> Gradients:
        clipped = []
        for g, v in zip(_dense(gradients), variables, strict=True):
            if v.name in self.excluded:
                clipped.append(g)
                continue
            max_norm = self.clip * tf.maximum(unitwise_norm(tf.cast(v, g.dtype)), self.eps)
            # A factor per unit (min(1, max_norm / ||g||)), then one multiply: two passes
            # over the gradient instead of a full-size select. max(||g||, tiny) keeps the
            # division finite where the gradient is zero.
            scale = tf.minimum(1.0, max_norm / tf.maximum(unitwise_norm(g), 1e-6))
            clipped.append(g * scale)
        return clipped
