"""lmt_tf: declarative experiments for large-scale model training on TensorFlow.

Importing this package selects tf-keras (Keras 2) for TensorFlow. This is the one place
that does so: ``TF_USE_LEGACY_KERAS`` must be set before TensorFlow is first imported,
because Keras 3 supports neither ParameterServerStrategy in ``model.fit`` nor TF-MOT.
The package root imports nothing heavy, so ``lmt --help`` stays fast.
"""

import os
import sys
import warnings

__version__ = "0.1.0"

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    warnings.warn(
        "tensorflow was imported before lmt_tf without TF_USE_LEGACY_KERAS=1; tf.keras may be "
        "Keras 3, which lmt_tf does not support. Import lmt_tf first.",
        stacklevel=2,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up banners (oneDNN, CUDA probing) are noise to a user; an
# explicit setting in the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
