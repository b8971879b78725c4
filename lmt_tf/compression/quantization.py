"""Quantization-aware training with TF-MOT as a model transform: ``quantize_model`` puts
fake-quantization on weights and activations, so fine-tuning learns weights that keep
their accuracy in int8. The QAT model itself is what converts to an int8 TFLite model."""

from __future__ import annotations

import functools
from typing import Any

import tf_keras as keras

from lmt_tf.compression import tfmot
from lmt_tf.data.preprocessing import PREPROCESSING_PREFIX
from lmt_tf.errors import ConfigError
from lmt_tf.optim.model_transforms import ModelTransform


class QuantizationAware(ModelTransform):
    """Wraps every supported layer for 8-bit quantization-aware training (TF-MOT's
    default scheme). With ``preserve`` = ``sparsity`` (PQAT) or ``clusters`` (CQAT) the
    fake-quantized weights keep the zeros or the cluster centroids of an earlier prune or
    cluster stage."""

    def __init__(self, preserve: str | None = None):
        if preserve not in (None, "sparsity", "clusters"):
            raise ConfigError(f"qat.preserve must be None, 'sparsity' or 'clusters', "
                              f"got {preserve!r}")
        self.preserve = preserve

    def scheme(self) -> Any:
        """The TF-MOT quantize scheme: default 8-bit, or its PQAT or CQAT variant."""
        combine = tfmot().experimental.combine
        return (tfmot().quantization.keras.default_8bit.Default8BitQuantizeScheme()
                if self.preserve is None
                else combine.Default8BitPrunePreserveQuantizeScheme()
                if self.preserve == "sparsity"
                else combine.Default8BitClusterPreserveQuantizeScheme())

    def check(self, model: keras.Model) -> None:
        """Raises ConfigError naming every layer of ``model`` that the scheme cannot
        quantize (TF-MOT would stop at the first, after whatever trained before it).
        Let through as TF-MOT takes them: BatchNormalization (folded into a Conv or Dense
        before it) and Lambda (left float, with TF-MOT's warning)."""
        registry = self.scheme().get_quantize_registry()
        unsupported: dict[str, list[str]] = {}
        let_through = (keras.layers.InputLayer, keras.layers.BatchNormalization,
                       keras.layers.Lambda)
        for layer in model.layers:
            if (isinstance(layer, let_through)
                    or layer.name.startswith(PREPROCESSING_PREFIX)
                    or registry.supports(layer)):
                continue
            unsupported.setdefault(type(layer).__name__, []).append(layer.name)
        if unsupported:
            named = ", ".join(f"{_some(names)} ({kind})" for kind, names in unsupported.items())
            raise ConfigError(f"qat cannot quantize {model.name!r}: TF-MOT "
                              f"{tfmot().__version__}'s 8-bit QAT has no quantization for "
                              f"{named}; for an int8 model of it use post-training "
                              f"quantization (tflite.modes = ['int8'])")

    def wrap(self, model: keras.Model) -> keras.Model:
        self.check(model)
        quantize = tfmot().quantization.keras
        try:
            front = [layer.name for layer in model.layers
                     if layer.name.startswith(PREPROCESSING_PREFIX)]

            def annotate(layer: keras.layers.Layer) -> keras.layers.Layer:
                if layer.name not in front:
                    return layer
                config = no_quantization(quantize_output=layer.name == front[-1])
                return quantize.quantize_annotate_layer(layer, config)

            annotated = quantize.quantize_annotate_model(
                keras.models.clone_model(model, clone_function=annotate))
            with quantize.quantize_scope({"NoQuantization": type(no_quantization()),
                                          **_preprocessing_layers()}):
                wrapped = quantize.quantize_apply(annotated, self.scheme())
            if front:
                _raw_input_unquantized(wrapped)
            return wrapped
        except (ValueError, RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"qat cannot quantize {model.name!r}: {first}") from e


@functools.cache
def _no_quantization_class() -> type:
    """Defined on first use: its base class is TF-MOT's, imported only when needed."""

    class NoQuantization(tfmot().quantization.keras.QuantizeConfig):
        """Leaves a preprocessing layer in float: it works on raw features, whose ranges one
        int8 scale would not hold (a tabular feature in thousands beside one in hundredths).
        The last of them quantizes its output, the model's real input, as TF-MOT's default
        scheme quantizes a model input (8 bits, asymmetric, moving-average range)."""

        def __init__(self, quantize_output: bool = False):
            self.quantize_output = quantize_output

        def get_weights_and_quantizers(self, layer: keras.layers.Layer) -> list:
            return []

        def get_activations_and_quantizers(self, layer: keras.layers.Layer) -> list:
            return []

        def set_quantize_weights(self, layer: keras.layers.Layer, weights: list) -> None:
            pass

        def set_quantize_activations(self, layer: keras.layers.Layer, activations: list) -> None:
            pass

        def get_output_quantizers(self, layer: keras.layers.Layer) -> list:
            if not self.quantize_output:
                return []
            return [tfmot().quantization.keras.quantizers.MovingAverageQuantizer(
                num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]

        def get_config(self) -> dict:
            return {"quantize_output": self.quantize_output}

    return NoQuantization


def _some(names: list[str], shown: int = 3) -> str:
    """Up to ``shown`` names, and how many more."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def no_quantization(quantize_output: bool = False) -> Any:
    """A ``NoQuantization`` config (see ``_no_quantization_class``)."""
    return _no_quantization_class()(quantize_output)


def _raw_input_unquantized(model: keras.Model) -> None:
    """TF-MOT puts a QuantizeLayer on every model input; in front of the preprocessing it
    passes the raw features through (its documented ``quantizer=None``)."""
    from tensorflow_model_optimization.python.core.quantization.keras.quantize_layer import (
        QuantizeLayer,
    )

    for layer in model.layers:
        inbound = layer.inbound_nodes[0].inbound_layers if layer.inbound_nodes else []
        if isinstance(layer, QuantizeLayer) and isinstance(inbound, keras.layers.InputLayer):
            layer.quantizer = None


def _preprocessing_layers() -> dict[str, type]:
    from lmt_tf.data.preprocessing import LAYERS

    return {cls.__name__: cls for cls in LAYERS}
