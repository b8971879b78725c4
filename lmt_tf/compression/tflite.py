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
from lmt_tf.errors import ConfigError

# float: no quantization. dynamic: int8 weights, float activations. float16: float16
# weights. int8: int8 weights and activations throughout (calibrated on a
# representative dataset), float input and output; a tabular preprocessing front stays
# float (see ``float_front``).
MODES = ("float", "dynamic", "float16", "int8")


def convert(model: keras.Model, mode: str, representative: np.ndarray | None = None) -> bytes:
    """``model`` as a TFLite flatbuffer, quantized as ``mode`` says.

    Args:
      model: a Keras model (a QAT model converts to int8 with any mode but ``float``).
      mode: one of ``MODES``.
      representative: model-ready inputs (float32) to calibrate ``int8`` activations.

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

        def samples() -> Iterator[list[np.ndarray]]:
            for x in representative:
                yield [x[None].astype(np.float32)]

        converter.representative_dataset = samples
        front = float_front(model)
        if front:
            # Selective quantization: TFLite's documented way to keep named ops float.
            # The debugger runs tf.lite.Interpreter inside, which warns of its own
            # deprecation, and converts with float inputs, for which it warns that no
            # input statistics were given: neither is the user's to act on.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*tf.lite.Interpreter is deprecated")
                warnings.filterwarnings("ignore", "Statistics for quantized inputs")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=converter, debug_dataset=samples,
                    debug_options=tf.lite.experimental.QuantizationDebugOptions(
                        denylisted_nodes=front))
                return debugger.get_nondebug_quantized_model()
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


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


def float_front(model: keras.Model) -> list[str]:
    """The TFLite ops (by output tensor name) of ``model``'s tabular preprocessing layers,
    which an int8 model keeps float. Activations are quantized with one scale per tensor,
    so quantizing the raw input would give every feature the scale of the widest (on the
    breast-cancer data, areas in the thousands next to ratios below 0.3: 41% test
    accuracy against 93% in float). Images have one range for all pixels, so a
    ``Rescaling`` front is quantized; so is a QAT model, whose fake quantization already
    starts after its preprocessing."""
    layers = [layer.name for layer in model.layers
              if layer.name.startswith(PREPROCESSING_PREFIX)
              and not isinstance(layer, keras.layers.Rescaling)]
    if not layers:
        return []
    runner = interpreter(convert(model, "float"))
    names = [runner._get_tensor_details(index, 0)["name"]
             for op in runner._get_ops_details() for index in op["outputs"]]
    # A fused op's name lists each op it fused: "mlp/preprocess_scale/truediv;...".
    return [name for name in names
            if any(f"/{layer}/" in part for part in name.split(";") for layer in layers)]


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
        part = x[start:start + batch].astype(np.float32)
        runner = interpreter(model, len(part))
        runner.set_tensor(runner.get_input_details()[0]["index"], part)
        runner.invoke()
        outputs.append(runner.get_tensor(runner.get_output_details()[0]["index"]).copy())
    return np.concatenate(outputs)


def measure(model: bytes, x: np.ndarray, y: np.ndarray,
            latency_examples: int = 100) -> TFLiteMeasurement:
    """Accuracy over (``x``, ``y``) and latency at batch 1, in the LiteRT interpreter."""
    accuracy = float(np.mean(np.argmax(predict(model, x), axis=-1) == y))
    runner = interpreter(model, 1)
    index = runner.get_input_details()[0]["index"]
    samples = x[:latency_examples].astype(np.float32)
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
