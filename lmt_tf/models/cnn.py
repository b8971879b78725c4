"""The convolutional network of the FedAvg paper (McMahan et al., 2017) for MNIST."""

from __future__ import annotations

from collections.abc import Sequence

import tf_keras as keras

from lmt_tf.checks import Annotated, Range
from lmt_tf.errors import ConfigError

Size = Annotated[int, Range(ge=1)]  # units, channels, rows: at least one


def build_cnn(input_shape: Sequence[Size], num_classes: Size,
              filters: Sequence[Size] = (32, 64), kernel_size: Size = 5,
              dense_units: Size = 512) -> keras.Model:
    """Conv(5x5, 32)-MaxPool(2)-Conv(5x5, 64)-MaxPool(2)-Dense(512)-softmax by default.

    Args:
      input_shape: (height, width) or (height, width, channels) of one image.
      num_classes: output classes.
      filters: channels of each 'same'-padded ReLU convolution, each followed by 2x2
        max-pooling.
      kernel_size: side of the square convolution kernels.
      dense_units: width of the ReLU dense layer before the softmax.

    Raises:
      ConfigError: for an input that is not an image or non-positive sizes.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) not in (2, 3):
        raise ConfigError(f"build_cnn needs image input (H, W) or (H, W, C), got {shape}")
    if min((*filters, kernel_size, dense_units)) < 1:
        raise ConfigError("build_cnn.filters, kernel_size and dense_units must be positive")
    inputs = keras.Input(shape=shape, name="inputs")
    x = keras.layers.Reshape((*shape, 1))(inputs) if len(shape) == 2 else inputs
    for i, channels in enumerate(filters):
        x = keras.layers.Conv2D(int(channels), kernel_size, padding="same", activation="relu",
                                name=f"conv_{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name="cnn")
