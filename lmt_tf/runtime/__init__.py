"""Runtime: TensorFlow start-up, devices, seeds and distribution strategies."""
