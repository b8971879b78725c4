"""Transfer learning: a model logged by an earlier run (or a SavedModel) with its head
replaced for a new task, part of it frozen; and the prototype classifier, the few-shot
baseline that trains nothing (the nearest class mean of the source's embeddings).

A text model carries its tokenizer to the new task: its embeddings were trained on its
vocabulary's ids, so the transferred model keeps the source's first layer, and the run
fits no tokenizer of its own (``preprocessing.tokenizing_builder``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.checks import Annotated, Range
from lmt_tf.data.preprocessing import PREPROCESSING_PREFIX, tokenizing_builder
from lmt_tf.data.tokenization import TOKENIZER_LAYERS
from lmt_tf.errors import ConfigError


@tokenizing_builder
def build_transfer(input_shape: Sequence[int], num_classes: int, source: str = "",
                   head: Annotated[int, Range(ge=1)] = 1, freeze: Sequence[str] = (),
                   tracking_uri: str | None = None) -> keras.Model:
    """The source model's layers, its trained weights included, without its last ``head``
    layers and without its preprocessing (this run fits its own), and a new softmax head
    for ``num_classes``. A text source keeps its tokenizer: the model takes documents,
    tokenized with the vocabulary the source was trained on.

    Args:
      input_shape: of one example, after this run's preprocessing (documents: ``()``).
      num_classes: classes of the new task.
      source: an earlier run's id or name, an MLflow model URI (``runs:/ID/model``,
        ``models:/m-...``) or a SavedModel directory.
      head: layers removed from the end of the source (its classifier).
      freeze: layers kept fixed, by name or name prefix (``conv`` freezes ``conv_0`` and
        ``conv_1``); the others fine-tune. ``TrainConfig.unfreeze_epochs`` and
        ``update_multipliers`` schedule them further.
      tracking_uri: the store of ``source`` (default: the store in force).

    Raises:
      ConfigError: for no source, a source model that is not a chain of layers (but a
        text model), a ``head`` that leaves nothing, an input the source cannot take
        (documents for a source without tokenizer, or the other way round), or a frozen
        name that matches no layer.
      LmtError: if nothing loadable is found under ``source``.
    """
    from lmt_tf.tracking.read import load_model

    if not source:
        raise ConfigError("build_transfer.source is not set: an earlier run's id or name, "
                          "a model URI or a SavedModel path")
    loaded = load_model(source, tracking_uri)
    layers = [layer for layer in loaded.layers if not isinstance(layer, keras.layers.InputLayer)]
    front = [layer for layer in layers if layer.name.startswith(PREPROCESSING_PREFIX)]
    body = layers[len(front):]
    if any(isinstance(layer, TOKENIZER_LAYERS) for layer in front):
        return _transfer_text(loaded, body, tuple(input_shape), num_classes, source, head,
                              freeze)
    if tuple(input_shape) == ():
        raise ConfigError(f"build_transfer.source {source} has no tokenizer (it takes inputs "
                          f"of shape {tuple(loaded.input_shape[1:])}), but the data is "
                          f"documents: transfer to text needs a source trained on text")
    _check_chain(loaded, source)
    if not 1 <= head < len(body):
        raise ConfigError(f"build_transfer.head must be in [1, {len(body) - 1}] for the "
                          f"{len(body)} layers of {source}, got {head}")
    # What the source's layers after its preprocessing take.
    takes = tuple(front[-1].output_shape[1:] if front else loaded.input_shape[1:])
    if tuple(input_shape) != takes:
        raise ConfigError(f"build_transfer.source {source} takes inputs of shape {takes}, "
                          f"but the data has examples of shape {tuple(input_shape)}")
    kept = body[:-head]
    _freeze(kept, freeze, source)
    inputs = keras.Input(tuple(input_shape), name="inputs")
    x = inputs
    for layer in kept:  # the same layer objects: the trained weights carry over
        x = layer(x)
    return keras.Model(inputs, _head(x, num_classes), name=f"transfer_{loaded.name}")


def _transfer_text(loaded: keras.Model, body: list[keras.layers.Layer],
                   input_shape: tuple[int, ...], num_classes: int, source: str, head: int,
                   freeze: Sequence[str]) -> keras.Model:
    """The text source's graph from its documents input, its tokenizer included, to the
    input of its last ``head`` layers, and a new head there. Its layers need not form a
    chain (attention masks and pooling read the token ids too): the graph is kept as the
    source built it.

    Raises:
      ConfigError: for data that is not documents, a ``head`` that leaves nothing or cuts
        where a layer takes several inputs, or a frozen name that matches no layer.
    """
    if input_shape != ():
        raise ConfigError(f"build_transfer.source {source} takes documents (its first layer "
                          f"tokenizes them), but the data has examples of shape "
                          f"{input_shape}")
    if not 1 <= head < len(body):
        raise ConfigError(f"build_transfer.head must be in [1, {len(body) - 1}] for the "
                          f"{len(body)} layers of {source}, got {head}")
    cut = body[-head]
    features = cut.input
    if isinstance(features, (list, tuple)) or len(cut.inbound_nodes) != 1:
        raise ConfigError(f"build_transfer.head {head} cuts {source} before its layer "
                          f"{cut.name!r}, which takes several inputs; the new head needs one")
    outputs = _head(features, num_classes)
    # The source's own input and layers up to the cut: the same objects, so its
    # tokenizer and its trained weights carry over; what is not upstream of the cut drops.
    model = keras.Model(loaded.inputs, outputs, name=f"transfer_{loaded.name}")
    _freeze([layer for layer in model.layers if layer in body], freeze, source)
    return model


def _head(features: tf.Tensor, num_classes: int) -> tf.Tensor:
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                              name="transfer_head")(features)


def _freeze(kept: list[keras.layers.Layer], freeze: Sequence[str], source: str) -> None:
    """Makes the kept layers named (or prefixed) in ``freeze`` untrainable, the others
    trainable.

    Raises:
      ConfigError: for a name in ``freeze`` that matches no kept layer.
    """
    names = [layer.name for layer in kept]
    unknown = [name for name in freeze if not any(n.startswith(name) for n in names)]
    if unknown:
        raise ConfigError(f"build_transfer.freeze names {unknown}, which match no kept layer "
                          f"of {source} ({', '.join(names)})")
    for layer in kept:
        layer.trainable = not any(layer.name.startswith(name) for name in freeze)


def _check_chain(model: keras.Model, source: str) -> None:
    """Each layer takes the output of the one before: the replay above is then exact."""
    previous = None
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            previous = layer
            continue
        inbound = layer.inbound_nodes[0].inbound_layers if layer.inbound_nodes else None
        if inbound is not previous or len(layer.inbound_nodes) != 1:
            raise ConfigError(f"build_transfer takes models that are a chain of layers; "
                              f"{source}'s layer {layer.name!r} is not fed by the layer "
                              f"before it")
        previous = layer


def embedding_model(model: keras.Model) -> keras.Model:
    """``model``'s layers but the last (its head): raw features in, embeddings (the head's
    input) out. A model whose head has one input tensor (a transformer, any model built
    once) is cut there; a chain of layers shared with another model (a transferred one)
    is replayed in order on a new input. The layers are shared, so the embeddings are the
    model's own."""
    head = model.layers[-1]
    if len(head.inbound_nodes) == 1 and not isinstance(head.input, (list, tuple)):
        return keras.Model(model.inputs, head.input)
    inputs = keras.Input(tuple(model.input_shape[1:]), name="inputs")
    x = inputs
    for layer in model.layers[:-1]:
        if not isinstance(layer, keras.layers.InputLayer):
            x = layer(x)
    return keras.Model(inputs, x)


def prototype_predictions(embed: keras.Model, train_x: np.ndarray, train_y: np.ndarray,
                          x: np.ndarray, num_classes: int) -> np.ndarray:
    """Class of the nearest class-mean embedding (Euclidean) for each example of ``x``
    (Snell et al., 2017, without training): the few-shot baseline.

    Raises:
      ConfigError: if a class has no training example.
    """
    support = embed.predict(train_x, verbose=0).reshape(len(train_x), -1)
    missing = sorted(set(range(num_classes)) - set(np.unique(train_y).tolist()))
    if missing:
        raise ConfigError(f"prototypes need an example of every class; none of {missing}")
    means = np.stack([support[train_y == c].mean(axis=0) for c in range(num_classes)])
    query = embed.predict(x, verbose=0).reshape(len(x), -1)
    distances = ((query[:, None, :] - means[None, :, :]) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1)
