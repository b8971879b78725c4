"""Models: plain tf-keras builders that know nothing of gin, MLflow or the trainer."""
