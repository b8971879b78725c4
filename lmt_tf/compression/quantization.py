"""Quantization-aware training with TF-MOT as a model transform: ``quantize_model`` puts
fake-quantization on weights and activations, so fine-tuning learns weights that keep
their accuracy in int8. The QAT model itself is what converts to an int8 TFLite model."""

from __future__ import annotations

import tensorflow_model_optimization as tfmot
import tf_keras as keras

from lmt_tf.errors import ConfigError
from lmt_tf.training.model_transforms import ModelTransform


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

    def wrap(self, model: keras.Model) -> keras.Model:
        quantize = tfmot.quantization.keras
        try:
            if self.preserve is None:
                return quantize.quantize_model(model)
            combine = tfmot.experimental.combine
            scheme = (combine.Default8BitPrunePreserveQuantizeScheme()
                      if self.preserve == "sparsity"
                      else combine.Default8BitClusterPreserveQuantizeScheme())
            annotated = quantize.quantize_annotate_model(model)
            return quantize.quantize_apply(annotated, scheme)
        except (ValueError, RuntimeError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"qat cannot quantize {model.name!r}: {first}") from e
