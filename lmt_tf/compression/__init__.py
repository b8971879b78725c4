"""Compression on the model-transform seam: pruning (TF-MOT), ..."""
