"""Data: sources that return train/validation/test splits, and tf.data input pipelines."""
