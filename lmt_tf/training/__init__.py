"""Training: the Trainer (strategy scope, model.fit, evaluation), callbacks, checkpoints."""
