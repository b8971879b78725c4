"""Compression on the model-transform seam: pruning (TF-MOT), ..."""


def tfmot():
    """TF-MOT, imported on first use: importing it imports Keras 3 (about 1.6 s), which a
    run without a compression stage never needs."""
    import tensorflow_model_optimization

    return tensorflow_model_optimization
