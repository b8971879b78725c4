"""Stages of an experiment: ``run_experiment`` runs them in order over one run context.
``DEFAULT_STAGES`` is what an experiment file that names none runs."""

from lmt_tf.stages.context import RunContext, Setup, Stage
from lmt_tf.stages.export import Export
from lmt_tf.stages.train import Train


def default_stages() -> tuple[Stage, ...]:
    """Train, then export: a plain training run."""
    return (Train(), Export())


__all__ = ["Export", "RunContext", "Setup", "Stage", "Train", "default_stages"]
