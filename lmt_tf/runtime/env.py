"""TensorFlow start-up: a quiet first import, logical CPU devices and seeds."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import lmt_tf  # noqa: F401  (selects tf-keras before TensorFlow is imported)
from lmt_tf.errors import ConfigError


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null: the CUDA probe of the GPU-capable wheel
    writes there from C++ before absl logging is initialised, past TF_CPP_MIN_LOG_LEVEL."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow() -> None:
    """Imports TensorFlow once, hiding its start-up banners unless the user asked for
    TensorFlow's logs (TF_CPP_MIN_LOG_LEVEL set below 3). Import errors still surface."""
    if "tensorflow" in sys.modules:
        return
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3") != "3":
        import tensorflow  # noqa: F401

        return
    with _stderr_silenced():
        import tensorflow  # noqa: F401


def configure_cpu_devices(count: int) -> list[str]:
    """Splits the host CPU into ``count`` logical devices and returns their names.

    Must run before TensorFlow initialises its runtime (before the first op). If the
    runtime is already up with at least ``count`` logical CPUs (a test session that split
    the CPU first), the first ``count`` of them are used.

    Raises:
      ConfigError: if ``count`` < 1, or the runtime is already up with fewer CPUs.
    """
    import tensorflow as tf

    if count < 1:
        raise ConfigError(f"num_cpu_devices must be >= 1, got {count}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    # Once the runtime is up this raises RuntimeError: then use what exists, if enough.
    with contextlib.suppress(RuntimeError):
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < count:
        raise ConfigError(
            f"{count} logical CPU devices requested, but TensorFlow is already running with "
            f"{len(devices)}; the split must happen before the first TensorFlow op"
        )
    return devices[:count]


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow (weights, dropout) in one call."""
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
