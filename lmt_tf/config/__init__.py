"""gin at the edge, its only home: configurables are registered (``registry``), config
files and bindings are parsed and checked (``reading``), the bound parameters are read
back as flat params, and ``run_parsed`` sets up the experiment the bindings describe and
uses it as the invocation asks.

Nothing else imports gin: library modules' functions, config dataclasses and stages are
registered in ``registry`` explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import gin

from lmt_tf.config.reading import check_complete, parse
from lmt_tf.config.registry import (
    PROJECT_ROOT,
    configurable,
    configurables,
    configured,
    experiment,
    register,
)
from lmt_tf.experiment import RunResult, describe_run, prepare, run
from lmt_tf.invocation import RunOptions
from lmt_tf.stages.federate import serve_flower_client
from lmt_tf.training.sidecar import evaluate_beside


def run_parsed(options: RunOptions | None = None) -> RunResult | None:
    """Sets up the experiment of the parsed config and uses it as ``options`` ask: a run
    (``experiment.run``), or a dry run, a Flower client or a side-car evaluator (by
    TF_CONFIG), each owned by its module. The run's record gets what gin knows of the
    configuration (flattened params, the resolved and, afterwards, the operative config).

    Returns:
      The run's result; None for a dry run, a Flower client or an evaluator.
    """
    options = options or RunOptions()
    check_complete(options.config_files)
    options = dataclasses.replace(options, params=bound_params(),
                                  config_text=gin.config_str(),
                                  operative_config=gin.operative_config_str,
                                  operative_params=operative_params)
    setup = prepare(experiment(), options)
    if options.dry_run:
        describe_run(setup, options)
        return None
    if options.flower is not None and options.flower.client is not None:
        serve_flower_client(setup, options)
        return None
    if setup.role.task_type == "evaluator":
        built = setup.trainer.build_model(setup.model_fn, setup.splits)
        evaluate_beside(setup.trainer, built, setup.splits.validation, setup.work_dir,
                        setup.name, options.run_name, options.resume, options.echo)
        return None
    return run(setup, options)


def experiment_name(config_files: Sequence[str]) -> str:
    """The MLflow experiment a run of the parsed config logs to (as ``session`` names it):
    ``TrackingConfig.experiment_name``, else ``run_experiment.name``, else the first
    file's stem."""
    for key in ("TrackingConfig.experiment_name", "run_experiment.name"):
        with contextlib.suppress(ValueError):
            value = gin.query_parameter(key)
            if value:
                return str(value)
    return Path(config_files[0]).stem


def bound_params() -> dict[str, str]:
    """Every binding in the current gin config, flattened: ``{'TrainConfig.epochs': '3'}``.

    Read back from ``gin.config_str()``, so values are in gin syntax (``@build_cnn``).
    """
    return flat_params(gin.config_str())


def operative_params() -> dict[str, str]:
    """Every parameter of every configurable called so far, defaults included
    (``{'Adam.beta_1': '0.9'}``), from ``gin.operative_config_str()``."""
    return flat_params(gin.operative_config_str())


def flat_params(text: str) -> dict[str, str]:
    """``key = value`` statements of gin config text as a flat dict (a value that spans
    lines joined into one)."""
    params: dict[str, str] = {}
    statement = ""
    for line in text.splitlines() + [""]:
        if line.startswith((" ", "\t")):  # continuation of a long value
            statement += " " + line.strip()
            continue
        if " = " in statement:
            key, value = statement.split(" = ", 1)
            params[key.strip()] = " ".join(value.split())
        skip = not line or line.startswith(("#", "import ", "from "))
        statement = "" if skip else line.removesuffix("\\").rstrip()
    return params


__all__ = ["PROJECT_ROOT", "bound_params", "check_complete", "configurable", "configurables",
           "configured", "experiment", "experiment_name", "flat_params", "operative_params",
           "parse", "register", "run_parsed"]
