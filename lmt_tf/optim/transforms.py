"""Gradient transforms, applied to the gradient aggregated over all replicas (the
gradient of one large batch) before the optimizer update. Each is a callable
``(gradients, variables) -> gradients``; a run applies them in the order configured,
through ``apply_transforms``.

The clipping transforms are rescalings: each multiplies a gradient by factors that are
constant over every output unit, computed from norms. ``apply_transforms`` composes
consecutive rescalings into one multiply per gradient and computes each norm of the
gradients once, so a chain costs about as much as its most demanding member: the cost
of clipping is memory passes over the gradients, not arithmetic. Where the optimizer's
update is XLA-compiled, that one multiply moves into the update itself
(``train_step.UpdateFactors``), saving one more pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, Range, check_types
from lmt_tf.optim.technique import StepSpec, Technique

Gradients = list[tf.Tensor | tf.IndexedSlices]
Transform = Callable[[Gradients, Sequence[tf.Variable]], Gradients]


def summed(gradient: tf.Tensor | tf.IndexedSlices) -> tf.Tensor | tf.IndexedSlices:
    """A sparse gradient (an embedding lookup's) with each row once, its duplicates
    summed: the rows of the dense gradient that are not zero, so that norms and
    element-wise clipping see the dense gradient's values. A dense one as it is."""
    if not isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    rows, positions = tf.unique(gradient.indices)
    values = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, gradient.dense_shape)


def map_values(function: Callable[[tf.Tensor], tf.Tensor],
               gradient: tf.Tensor | tf.IndexedSlices) -> tf.Tensor | tf.IndexedSlices:
    """``function`` of a dense gradient, or of a sparse one's rows (kept sparse)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(function(gradient.values), gradient.indices,
                                gradient.dense_shape)
    return function(gradient)


def _values(gradient: tf.Tensor | tf.IndexedSlices) -> tf.Tensor:
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _dense(gradients: Sequence[tf.Tensor | tf.IndexedSlices]) -> Gradients:
    """Dense gradients as tensors, sparse ones (embedding tables') kept sparse, each row
    once (``summed``)."""
    return [summed(g) for g in gradients]


# Rows per block of a unit-norm reduction (see ``unitwise_norm``).
BLOCK_ROWS = range(32, 7, -1)


def unitwise_norm(x: tf.Tensor) -> tf.Tensor:
    """L2 norm per output unit: over all axes but the last (dense and conv kernels: one
    norm per output unit or channel), shaped to broadcast against ``x``; for vectors and
    scalars, the absolute values."""
    if x.shape.rank is None or x.shape.rank <= 1:
        return tf.abs(x)
    units = x.shape[-1]
    rows = x.shape[:-1].num_elements()
    block = next((b for b in BLOCK_ROWS if rows and rows % b == 0), None)
    if block is not None:
        # Norms of blocks of 8-32 rows, then of those: one pass over ``x``, as fast as
        # tf.nn.l2_loss. Reducing all rows at once (an axis-0 reduction) is 2-4 times
        # slower on CPU, and a square then a column sum makes three passes (on the
        # quickstart CNN's 1.6M-parameter dense kernel, one core: 0.39, 0.9 and 0.87 ms).
        partial = tf.math.reduce_euclidean_norm(tf.reshape(x, [rows // block, block, units]),
                                                axis=1)
        norms = tf.math.reduce_euclidean_norm(partial, axis=0)
    else:
        squares = tf.reshape(tf.square(x), [-1, units])
        norms = tf.sqrt(tf.linalg.matvec(squares, tf.ones([tf.shape(squares)[0]], x.dtype),
                                         transpose_a=True))
    return tf.reshape(norms, [1] * (x.shape.rank - 1) + [units])


class GradientNorms:
    """Gradients as raw tensors times factors that are constant over each output unit
    (``None`` is 1), and the norms of those products. A sparse gradient (``IndexedSlices``,
    an embedding table's) stays sparse: its norms are those of its rows.

    Norms of the raw gradients are computed once, when first asked for; a norm of a
    rescaled gradient follows from them (a unit's norm scales with its factor).
    ``unit_wise`` computes unit norms first, since tensor norms follow from those.
    """

    def __init__(self, gradients: Sequence[tf.Tensor], unit_wise: bool = False):
        self.raw = _dense(gradients)
        self.factors: list[tf.Tensor | None] = [None] * len(self.raw)
        self.unit_wise = unit_wise
        self._units: dict[int, tf.Tensor] = {}
        self._tensors: dict[int, tf.Tensor] = {}

    def _raw_unit(self, i: int) -> tf.Tensor:
        if i not in self._units:
            self._units[i] = unitwise_norm(_values(self.raw[i]))
        return self._units[i]

    def _raw_tensor(self, i: int) -> tf.Tensor:
        if i not in self._tensors:
            if self.unit_wise or i in self._units:
                self._tensors[i] = tf.norm(self._raw_unit(i))
            else:
                self._tensors[i] = tf.sqrt(2.0 * tf.nn.l2_loss(_values(self.raw[i])))
        return self._tensors[i]

    def unit(self, i: int) -> tf.Tensor:
        """Norms per output unit of gradient ``i`` (see ``unitwise_norm``)."""
        factor = self.factors[i]
        return self._raw_unit(i) if factor is None else factor * self._raw_unit(i)

    def tensor(self, i: int) -> tf.Tensor:
        """The L2 norm of gradient ``i``."""
        factor = self.factors[i]
        if factor is None:
            return self._raw_tensor(i)
        if factor.shape.rank == 0:
            return factor * self._raw_tensor(i)
        return tf.norm(factor * self._raw_unit(i))

    def global_norm(self) -> tf.Tensor:
        """The L2 norm of all gradients together."""
        return tf.norm(tf.stack([self.tensor(i) for i in range(len(self.raw))]))

    def raw_global_norm(self) -> tf.Tensor:
        """The L2 norm of all raw gradients together (the factors left out)."""
        return tf.norm(tf.stack([self._raw_tensor(i) for i in range(len(self.raw))]))

    def rescale(self, factors: Sequence[tf.Tensor | float | None]) -> None:
        """Multiplies gradient ``i`` by ``factors[i]`` (lazily: see ``gradients``)."""
        for i, factor in enumerate(factors):
            if factor is None:
                continue
            factor = tf.convert_to_tensor(factor, self.raw[i].dtype)
            old = self.factors[i]
            self.factors[i] = factor if old is None else old * factor

    def gradient(self, i: int) -> tf.Tensor | tf.IndexedSlices:
        """Gradient ``i`` rescaled (a sparse one: its rows)."""
        factor = self.factors[i]
        return self.raw[i] if factor is None else map_values(lambda g: g * factor,
                                                               self.raw[i])

    def gradients(self) -> Gradients:
        """The rescaled gradients: one multiply per rescaled tensor."""
        return [self.gradient(i) for i in range(len(self.raw))]


class Rescaling:
    """A transform that multiplies each gradient by factors constant over each output
    unit (one scalar for all, one per tensor, or one per unit)."""

    unit_wise = False  # whether its factors need norms per unit

    def factors(self, norms: GradientNorms,
                variables: Sequence[tf.Variable]) -> list[tf.Tensor | None]:
        """The factor for each gradient (``None``: unchanged), given their norms."""
        raise NotImplementedError

    def __call__(self, gradients: Gradients, variables: Sequence[tf.Variable]) -> Gradients:
        norms = GradientNorms(gradients, self.unit_wise)
        norms.rescale(self.factors(norms, variables))
        return norms.gradients()


def apply_transforms(transforms: Sequence[Transform], gradients: Gradients,
                     variables: Sequence[tf.Variable]) -> tuple[Gradients, tf.Tensor]:
    """Applies ``transforms`` in order.

    Returns:
        The transformed gradients and the global norm of ``gradients`` before them.
    """
    norms, norm = transform_lazily(transforms, gradients, variables)
    return norms.gradients(), norm


def transform_lazily(transforms: Sequence[Transform], gradients: Gradients,
                     variables: Sequence[tf.Variable]) -> tuple[GradientNorms, tf.Tensor]:
    """``apply_transforms`` with the last rescalings not yet multiplied in: the gradients
    as ``GradientNorms`` (raw tensors and their factors), so that the optimizer's update
    can multiply them where it reads the gradient (``train_step.UpdateFactors``)."""
    unit_wise = any(getattr(t, "unit_wise", False) for t in transforms)
    first = norms = GradientNorms(gradients, unit_wise)
    for transform in transforms:
        if isinstance(transform, Rescaling):
            norms.rescale(transform.factors(norms, variables))
        else:
            norms = GradientNorms(transform(norms.gradients(), variables), unit_wise)
    # Last, so that it reuses the norms the transforms computed.
    return norms, first.raw_global_norm()


@dataclass
class _Clip:
    """A transform bounded by a positive ``limit``."""

    limit: Annotated[float, Range(gt=0)] = 1.0

    def __post_init__(self) -> None:
        check_types(self)

    def _factor(self, norm: tf.Tensor) -> tf.Tensor:
        """limit / norm where the norm exceeds the limit, else exactly 1."""
        return self.limit / tf.maximum(norm, self.limit)


class ClipByValue(_Clip):
    """Clips every finite gradient element into [-limit, limit]. Non-finite elements stay
    as they are, as the norm-based transforms keep them: under loss scaling an
    overflowed step must look overflowed, so that the optimizer skips it and lowers the
    scale (clipped to +-limit it would be applied, and the scale would never drop)."""

    def __call__(self, gradients: Gradients, variables: Sequence[tf.Variable]) -> Gradients:
        return [map_values(lambda g: tf.where(tf.math.is_finite(g),
                                              tf.clip_by_value(g, -self.limit, self.limit), g),
                           g) for g in _dense(gradients)]


class ClipByNorm(_Clip, Rescaling):
    """Rescales each gradient tensor whose L2 norm exceeds ``limit`` to norm ``limit``."""

    def factors(self, norms: GradientNorms,
                variables: Sequence[tf.Variable]) -> list[tf.Tensor | None]:
        return [self._factor(norms.tensor(i)) for i in range(len(variables))]


class ClipByGlobalNorm(_Clip, Rescaling):
    """Rescales all gradients together when their global L2 norm exceeds ``limit``."""

    def factors(self, norms: GradientNorms,
                variables: Sequence[tf.Variable]) -> list[tf.Tensor | None]:
        norm = norms.global_norm()
        # As tf.clip_by_global_norm: a non-finite norm makes every gradient NaN (so a
        # loss-scaling optimizer skips the step) rather than silently zero.
        factor = tf.where(tf.math.is_finite(norm), self._factor(norm), float("nan"))
        return [factor] * len(variables)


@dataclass
class AdaptiveGradientClipping(Rescaling):
    """Adaptive gradient clipping (Brock et al., 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization"): for each unit, a gradient whose norm exceeds
    ``clip`` times max(the weight's norm, ``eps``) is rescaled down to that.

    ``exclude_final_layer`` leaves the classifier layer unclipped, as the paper does.
    """

    # lambda: the largest gradient-to-weight norm ratio per unit
    clip: Annotated[float, Range(gt=0)] = 0.01
    # weight norms below this count as eps (zero-initialised units)
    eps: Annotated[float, Range(gt=0)] = 1e-3
    exclude_final_layer: bool = True
    excluded: tuple[str, ...] = ()  # variable names left alone (set by bind)

    unit_wise = True

    def __post_init__(self) -> None:
        check_types(self)

    def bind(self, model: keras.Model) -> None:
        """Learns which variables belong to the final layer with weights."""
        if self.exclude_final_layer:
            final = [layer for layer in model.layers if layer.trainable_weights][-1]
            self.excluded = tuple(v.name for v in final.trainable_weights)

    def factors(self, norms: GradientNorms,
                variables: Sequence[tf.Variable]) -> list[tf.Tensor | None]:
        factors = []
        for i, v in enumerate(variables):
            if v.name in self.excluded:
                factors.append(None)
                continue
            weight_norm = unitwise_norm(tf.cast(v, norms.raw[i].dtype))
            max_norm = self.clip * tf.maximum(weight_norm, self.eps)
            # max(||g||, tiny) keeps the ratio finite where a unit's gradient is zero.
            factors.append(tf.minimum(1.0, max_norm / tf.maximum(norms.unit(i), 1e-6)))
        return factors


@dataclass
class GradientTransforms(Technique):
    """The clipping chain: transforms of the gradient aggregated over all replicas,
    before the update, in the order configured (the semantics of one large batch)."""

    gradient_transforms: tuple[Callable[..., Any], ...] = ()  # e.g. (@ClipByGlobalNorm(),)

    kept_for_students = True
    waits_for_all_gradients = True  # a global norm needs every gradient

    def __post_init__(self) -> None:
        if isinstance(self.gradient_transforms, list):  # gin writes [...] as a list
            self.gradient_transforms = tuple(self.gradient_transforms)

    def shape(self, step: StepSpec) -> None:
        step.transforms.extend(self.gradient_transforms)
