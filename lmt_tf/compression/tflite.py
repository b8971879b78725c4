"""TFLite export with post-training quantization, and measurement of a ``.tflite`` model
in the LiteRT interpreter: its accuracy is measured there, never assumed from Keras."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from lmt_tf.data.preprocessing import PREPROCESSING_PREFIX
from lmt_tf.data.tokenization import TOKENIZER_LAYERS, SequenceTokenizer
from lmt_tf.errors import ConfigError

# float: no quantization. dynamic: int8 weights, float activations. float16: float16
# weights. int8: int8 weights and activations throughout (calibrated on a
# representative dataset), float input and output; a tabular preprocessing front and
# attention's masked softmax stay float (see ``float_scopes``).
MODES = ("float", "dynamic", "float16", "int8")


def convert(model: keras.Model, mode: str, representative: np.ndarray | None = None) -> bytes:
    """``model`` as a TFLite flatbuffer, quantized as ``mode`` says.

    Args:
      model: a Keras model (a QAT model converts to int8 with any mode but ``float``).
      mode: one of ``MODES``.
      representative: model-ready inputs (float32, or token ids) to calibrate ``int8``
        activations.

    Raises:
      ConfigError: for an unknown mode, or ``int8`` without representative inputs.
    """
    if mode not in MODES:
        raise ConfigError(f"tflite.modes: {mode!r} is not one of {MODES}")
    converter = tf.lite.TFLiteConverter.from_keras_model(float32_model(model))
    if mode != "float":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if representative is None or not len(representative):
            raise ConfigError("tflite int8 needs representative inputs to calibrate with")

        dtype = _input_dtype(model)

        def samples() -> Iterator[list[np.ndarray]]:
            for x in representative:
                yield [x[None].astype(dtype)]

        converter.representative_dataset = samples
        scopes = float_scopes(model)
        if scopes:
            # Selective quantization: TFLite's documented way to keep named ops float.
            # The debugger calibrates once; the ops are named as in its calibrated model
            # (another conversion may name them otherwise: softmax_2 for softmax). It runs
            # tf.lite.Interpreter inside, which warns of its own deprecation, and
            # converts with float inputs, for which it warns that no input statistics
            # were given: neither is the user's to act on.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*tf.lite.Interpreter is deprecated")
                warnings.filterwarnings("ignore", "Statistics for quantized inputs")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter, debug_dataset=samples)
                debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                    denylisted_nodes=_in_scopes(_op_names(debugger.calibrated_model),
                                                scopes))
                return debugger.get_nondebug_quantized_model()
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        # Token ids are integers: there is no input range to give them.
        warnings.filterwarnings("ignore", "Statistics for quantized inputs")
        return converter.convert()


def _input_dtype(model: keras.Model) -> np.dtype:
    """What the model takes: float32 features, or integer token ids."""
    dtype = tf.as_dtype(model.inputs[0].dtype)
    return np.dtype(dtype.as_numpy_dtype if dtype.is_integer else np.float32)


def tokenizer(model: keras.Model) -> keras.layers.Layer | None:
    """``model``'s tokenizer: its layer that takes documents (words or WordPiece ids, or
    a bag of words); None if ``model`` takes no text."""
    found = [layer for layer in model.layers if isinstance(layer, TOKENIZER_LAYERS)]
    if not found:
        return None
    (layer,) = found
    return layer


def after_tokenizer(model: keras.Model) -> keras.Model | None:
    """The network behind ``model``'s tokenizer, on what the tokenizer makes: a model whose
    input is (batch, sequence_length) int64 ids padded with 0 (words, WordPiece), or
    (batch, vocabulary + 1) float32 TF-IDF vectors (a bag of words), and the same layers
    and weights after the tokenizer. String ops are not TFLite builtins, so this is what
    converts; the padding is inert (attention and pooling mask it). None if ``model``
    takes no text."""
    tokenize = tokenizer(model)
    if tokenize is None:
        return None
    # The tokenizer's output in this model's graph: a layer shared with the models it
    # was cloned from (pruning, clustering) has a node in each.
    (output,) = [tokenize.get_output_at(i) for i in range(len(tokenize.inbound_nodes))
                 if tokenize.get_input_at(i) is model.inputs[0]]
    name = "token_ids" if isinstance(tokenize, SequenceTokenizer) else "tf_idf"
    ids = keras.Input((tokenize.width,), dtype=tokenize.dtype, name=name)
    body = keras.Model(output, model.output)
    return keras.Model(ids, body.call(ids), name=model.name)


def tokenized(model: keras.Model, documents: np.ndarray, batch: int = 1024) -> np.ndarray:
    """``documents`` as ``model``'s own tokenizer makes them, the input of
    ``after_tokenizer(model)``: ids padded with 0 to its sequence length (int64), or
    TF-IDF vectors (float32)."""
    tokenize = tokenizer(model)
    out = np.zeros((len(documents), tokenize.width), np.dtype(tokenize.dtype))
    for start in range(0, len(documents), batch):
        chunk = np.asarray(documents[start:start + batch])
        ids = tokenize(tf.constant(chunk.astype(bytes))).numpy()
        out[start:start + len(chunk), :ids.shape[1]] = ids
    return out


def float32_model(model: keras.Model) -> keras.Model:
    """``model`` with every layer computing in float32: a model trained under a mixed
    precision policy (float16 compute, float32 variables) cloned under float32, with its
    weights. The converter would otherwise carry the float16 casts into the flatbuffer;
    the ``float16`` mode is the way to ask for float16 weights."""
    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model

    def in_float32(layer: keras.layers.Layer) -> keras.layers.Layer:
        return type(layer).from_config({**layer.get_config(), "dtype": "float32"})

    clone = keras.models.clone_model(model, clone_function=in_float32)
    clone.set_weights(model.get_weights())
    return clone


def float_scopes(model: keras.Model) -> list[str]:
    """The name scopes of the ops that an int8 model of ``model`` keeps float.

    - Its tabular preprocessing layers (``/preprocess_scale/``, ...). Activations are
      quantized with one scale per tensor, so quantizing the raw input would give every
      feature the scale of the widest (on the breast-cancer data, areas in the thousands
      next to ratios below 0.3: 41% test accuracy against 93% in float). Images have one
      range for all pixels, so a ``Rescaling`` front is quantized; so is a QAT model,
      whose fake quantization already starts after its preprocessing.
    - The masked softmax of each ``MultiHeadAttention`` (``/block0_attention/softmax``):
      Keras adds -1e9 to the scores of padded keys, and one int8 scale for that sum
      rounds every real score to the same value (the R8 transformer: 14.8% test accuracy
      in int8 against 96.4% in float).
    """
    front = [f"/{layer.name}/" for layer in model.layers
             if layer.name.startswith(PREPROCESSING_PREFIX)
             and not isinstance(layer, keras.layers.Rescaling)]
    attention = [f"/{layer.name}/softmax" for layer in model.layers
                 if isinstance(layer, keras.layers.MultiHeadAttention)]
    return front + attention


def float_front(model: keras.Model) -> list[str]:
    """The TFLite ops (by output tensor name, in a float conversion) of ``model``'s tabular
    preprocessing layers, which an int8 model keeps float (see ``float_scopes``)."""
    front = [scope for scope in float_scopes(model) if PREPROCESSING_PREFIX in scope]
    return _in_scopes(_op_names(convert(model, "float")), front) if front else []


def _op_names(model: bytes) -> list[str]:
    """The output tensor name of every op of a ``.tflite`` model."""
    runner = interpreter(model)
    return [runner._get_tensor_details(index, 0)["name"]
            for op in runner._get_ops_details() for index in op["outputs"]]


def _in_scopes(names: list[str], scopes: list[str]) -> list[str]:
    # A fused op's name lists each op it fused: "mlp/preprocess_scale/truediv;...".
    return [name for name in names
            if any(scope in part for part in name.split(";") for scope in scopes)]


@dataclass(frozen=True)
class TFLiteMeasurement:
    """What the LiteRT interpreter measured of one ``.tflite`` model."""

    accuracy: float  # over the examples given
    latency_ms: float  # mean per example at batch 1
    bytes: int  # size of the flatbuffer


def interpreter(model: bytes, batch: int = 1):
    """A LiteRT interpreter for ``model`` with its input resized to ``batch``."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model, num_threads=1)
    (entry,) = runner.get_input_details()
    runner.resize_tensor_input(entry["index"], [batch, *entry["shape"][1:]])
    runner.allocate_tensors()
    return runner


def predict(model: bytes, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Outputs of the ``.tflite`` model for model-ready inputs ``x``, in batches."""
    outputs = []
    for start in range(0, len(x), batch):
        runner = interpreter(model, min(batch, len(x) - start))
        (entry,) = runner.get_input_details()
        runner.set_tensor(entry["index"], x[start:start + batch].astype(entry["dtype"]))
        runner.invoke()
        outputs.append(runner.get_tensor(runner.get_output_details()[0]["index"]).copy())
    return np.concatenate(outputs)


def measure(model: bytes, x: np.ndarray, y: np.ndarray,
            latency_examples: int = 100) -> TFLiteMeasurement:
    """Accuracy over (``x``, ``y``) and latency at batch 1, in the LiteRT interpreter."""
    accuracy = float(np.mean(np.argmax(predict(model, x), axis=-1) == y))
    runner = interpreter(model, 1)
    (entry,) = runner.get_input_details()
    index = entry["index"]
    samples = x[:latency_examples].astype(entry["dtype"])
    runner.set_tensor(index, samples[:1])
    runner.invoke()  # the first call allocates; not timed
    start = time.perf_counter()
    for sample in samples:
        runner.set_tensor(index, sample[None])
        runner.invoke()
    latency = (time.perf_counter() - start) / len(samples) * 1000
    return TFLiteMeasurement(accuracy, latency, len(model))


def inner_dtypes(model: bytes) -> dict[str, str]:
    """The dtype of every tensor of ``model`` with more than 16 elements (weights and
    activations) except its input and output: a full-integer model has only int8 ones
    (and int32 biases) there."""
    runner = interpreter(model, 1)
    ends = {d["index"] for d in runner.get_input_details() + runner.get_output_details()}
    return {d["name"]: np.dtype(d["dtype"]).name for d in runner.get_tensor_details()
            if d["index"] not in ends and int(np.prod(d["shape"])) > 16}
