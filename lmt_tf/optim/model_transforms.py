"""Model transforms: the one seam through which a technique changes how a model trains.

A transform ``wrap``s the model inside the strategy's scope, before it is compiled (a
training wrapper with its own train step, or layers swapped for pruning or
quantization wrappers), names the ``callbacks`` it needs from ``fit``, and ``strip``s
what it added, giving back the model to evaluate and export. ``apply`` runs a chain of
them and remembers it with the model it returns; ``inference_model`` and
``transform_callbacks`` read that chain back, so nothing downstream names a wrapper.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import tf_keras as keras


class ModelTransform:
    """The identity; subclasses override what they change."""

    def wrap(self, model: keras.Model) -> keras.Model:
        """The model that trains, built from ``model`` (in the strategy's scope)."""
        return model

    def callbacks(self, wrapped: keras.Model) -> list[keras.callbacks.Callback]:
        """Callbacks that training ``wrapped`` needs."""
        return []

    def strip(self, wrapped: keras.Model) -> keras.Model:
        """``wrapped`` without what ``wrap`` added: the model to evaluate and export."""
        return wrapped


# Each model that ``apply`` returned -> the chain that made it: (transform, its output).
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply(model: keras.Model, transforms: Sequence[ModelTransform]) -> keras.Model:
    """``model`` wrapped by each transform in turn (call inside the strategy's scope)."""
    chain = []
    for transform in transforms:
        model = transform.wrap(model)
        chain.append((transform, model))
    if chain:
        _APPLIED[model] = tuple(chain)
    return model


def inference_model(model: keras.Model) -> keras.Model:
    """The model that ``apply`` started from, every transform stripped in reverse order;
    a model no transform made is returned as it is."""
    for transform, _ in reversed(_APPLIED.get(model, ())):
        model = transform.strip(model)
    return model


def transform_callbacks(model: keras.Model) -> list[keras.callbacks.Callback]:
    """The callbacks every transform of ``model``'s chain needs, in chain order."""
    return [callback for transform, output in _APPLIED.get(model, ())
            for callback in transform.callbacks(output)]
