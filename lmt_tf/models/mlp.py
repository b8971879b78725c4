"""A multi-layer perceptron classifier."""

from __future__ import annotations

from collections.abc import Sequence

import tf_keras as keras

from lmt_tf.checks import Annotated, Range
from lmt_tf.errors import ConfigError

Size = Annotated[int, Range(ge=1)]  # units, channels, rows: at least one


def build_mlp(input_shape: Sequence[Size], num_classes: Size,
              hidden_units: Sequence[Size] = (128,), activation: str = "relu",
              dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> keras.Model:
    """Flatten, then ``hidden_units`` dense layers, then a softmax over ``num_classes``.

    Args:
      input_shape: shape of one example, e.g. (28, 28).
      num_classes: output classes.
      hidden_units: width of each hidden layer.
      activation: Keras activation of the hidden layers.
      dropout: dropout rate after each hidden layer (0 disables it).

    Raises:
      ConfigError: for a non-positive width or a dropout outside [0, 1).
    """
    if any(int(u) < 1 for u in hidden_units):
        raise ConfigError(f"build_mlp.hidden_units must be positive, got {tuple(hidden_units)}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"build_mlp.dropout must be in [0, 1), got {dropout}")
    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = keras.layers.Flatten()(inputs)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(int(units), activation=activation, name=f"dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    # float32 output, whatever the layers' compute dtype.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name="mlp")
