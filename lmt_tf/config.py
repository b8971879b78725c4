"""gin at the edge: the one place where configurables are registered, config files and
bindings are parsed, the bound parameters are read back as flat params, and the gin
root (bound as ``run_experiment``) builds the ``Experiment`` that the plain root takes;
``run_parsed`` uses it as the invocation asks.

Nothing else imports gin: library modules' functions, config dataclasses and stages are
registered here explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import logging
import os
import re
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gin
import tf_keras as keras

from lmt_tf import transfer
from lmt_tf.checks import Annotated, Range, Returned, check_value, parameter_hints
from lmt_tf.data import sources, tfrecord
from lmt_tf.data.pipeline import InputConfig
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.errors import ConfigError
from lmt_tf.experiment import Experiment, RunResult, describe_run, prepare, run
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import PartitionConfig
from lmt_tf.federated.server_optimizers import ServerAdam, ServerAveraging, ServerMomentum
from lmt_tf.federated.transport import FlowerTLS
from lmt_tf.invocation import Configs, ExportConfig, RunOptions
from lmt_tf.models import cnn, mlp, recommender
from lmt_tf.optim import transforms
from lmt_tf.runtime import strategy
from lmt_tf.stages import Export, Train
from lmt_tf.stages.clustering import Cluster
from lmt_tf.stages.distill import Distill
from lmt_tf.stages.evaluate import Evaluate
from lmt_tf.stages.federate import Federate, serve_flower_client
from lmt_tf.stages.prototypes import Prototypes
from lmt_tf.stages.prune import Prune
from lmt_tf.stages.quantize import QAT, TFLite
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.training.sidecar import evaluate_beside
from lmt_tf.training.train_config import TrainConfig

_PROJECT = {
    "lmt": [TrainConfig, TrackingConfig, ExportConfig, InputConfig],
    "lmt.data": [sources.load_mnist, sources.load_fashion_mnist, sources.load_digits,
                 sources.load_breast_cancer, sources.load_npz, sources.load_csv,
                 sources.load_movielens, tfrecord.load_tfrecords, sources.few_shot,
                 Preprocessing],
    "lmt.optim": [transforms.ClipByValue, transforms.ClipByNorm, transforms.ClipByGlobalNorm,
                  transforms.AdaptiveGradientClipping],
    "lmt.federated": [FederatedConfig, PartitionConfig, FlowerTLS],
    "lmt.models": [mlp.build_mlp, cnn.build_cnn, recommender.build_recommender,
                   transfer.build_transfer],
    "lmt.strategies": [strategy.default_strategy, strategy.one_device_strategy,
                       strategy.mirrored_strategy, strategy.multi_worker_mirrored_strategy,
                       strategy.parameter_server_strategy],
}
_KERAS = {
    "keras.optimizers": [keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW,
                         keras.optimizers.RMSprop, keras.optimizers.Adagrad],
    "keras.optimizers.schedules": [keras.optimizers.schedules.ExponentialDecay,
                                   keras.optimizers.schedules.CosineDecay,
                                   keras.optimizers.schedules.PiecewiseConstantDecay],
    "keras.callbacks": [keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau],
}
# Stages are bound by their lower-case names: run_experiment.stages = [@train(), @export()]
_STAGES = {"train": Train, "prune": Prune, "cluster": Cluster, "qat": QAT, "tflite": TFLite,
           "distill": Distill, "federate": Federate, "evaluate": Evaluate,
           "prototypes": Prototypes, "export": Export}
# Server optimizers are bound by their algorithms' names (@FedAvgM()), not by their
# classes' names, which leave those to Flower's strategies.
_SERVER_OPTIMIZERS = [ServerAveraging, ServerMomentum, ServerAdam]
_registered: list[str] = []  # every registered name, for "did you mean" hints
# Every registered configurable by its gin selector: the name messages call it by and the
# type hints (with their declared ranges) of its parameters, which each binding must fit.
_TYPED: dict[str, tuple[str, dict[str, Any]]] = {}

# The project root of a source checkout: experiments include fragments as 'gin/...'.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@gin.configurable("run_experiment")
def experiment(name: str | None = None,
               data: Callable[[], Any] = gin.REQUIRED,
               model: Callable[..., keras.Model] = gin.REQUIRED,
               strategy: Callable[[], Any] = strategy.default_strategy,
               seed: Annotated[int, Range(ge=0)] = 0,
               work_dir: str = "lmt_work",
               stages: Sequence[Any] | None = None) -> Experiment:
    """The gin root, bound as ``run_experiment.*``: the experiment the parsed bindings
    describe (see ``experiment.Experiment``), with the config objects built from them
    (``TrainConfig.epochs = 3``, ...)."""
    configs = Configs(train=configured(TrainConfig), tracking=configured(TrackingConfig),
                      export=configured(ExportConfig), input=configured(InputConfig),
                      preprocess=configured(Preprocessing))
    return Experiment(data, model, name, strategy, seed, work_dir, stages, configs)


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


# What an experiment must set, and where a user finds one to include.
_REQUIRED = {"data": "'gin/data/digits.gin'", "model": "'gin/models/mlp.gin'"}


def check_complete(config_files: Sequence[str]) -> None:
    """Raises ConfigError unless the parsed config is a whole experiment: one that sets
    ``run_experiment.data`` and ``run_experiment.model`` (a fragment such as
    'gin/models/mlp.gin' parses, but does not run).

    Raises:
      ConfigError: naming the files and what they leave unset.
    """
    missing = []
    for parameter, example in _REQUIRED.items():
        try:
            gin.query_parameter(f"run_experiment.{parameter}")
        except ValueError:
            missing.append(f"run_experiment.{parameter} (e.g. include {example})")
    if not missing:
        return
    files = ", ".join(config_files) or "the bindings"
    if not gin.config_str().strip():
        raise ConfigError(f"{files} binds nothing: an experiment sets at least "
                          f"{' and '.join(missing)}")
    raise ConfigError(f"{files} is not a complete experiment: it does not set "
                      f"{' or '.join(missing)}")


def register() -> None:
    """Registers lmt_tf's and Keras's configurables with gin (idempotent)."""
    if _registered:
        return
    _registered.append("run_experiment")  # the gin root, registered where it is defined
    _TYPED[f"{__name__}.run_experiment"] = ("run_experiment",
                                            parameter_hints(experiment.__wrapped__))
    named = [(stage, name, "lmt.stages") for name, stage in _STAGES.items()]
    named += [(optimizer, optimizer.name, "lmt.federated") for optimizer in _SERVER_OPTIMIZERS]
    named += [(item, item.__name__, module) for module, items in _PROJECT.items()
              for item in items]
    for item, name, module in named:
        gin.external_configurable(item, name=name, module=module)
        _registered.extend([name, f"{module}.{name}"])
        _TYPED[f"{module}.{name}"] = (name, parameter_hints(item))
    for module, items in _KERAS.items():
        for item in items:
            gin.external_configurable(item, module=module)
            _registered.extend([item.__name__, f"{module}.{item.__name__}"])
            _TYPED[f"{module}.{item.__name__}"] = (f"{module}.{item.__name__}",
                                                   _keras_hints(item))


def _keras_hints(cls: type) -> dict[str, Any]:
    """Keras' classes have no type hints: a parameter whose default is a bool, a number
    or a string takes one of the same kind (a learning rate also a schedule)."""
    hints: dict[str, Any] = {}
    for parameter in inspect.signature(cls).parameters.values():
        default = parameter.default
        kind = next((k for k in (bool, float, str) if isinstance(default, k)
                     or (k is float and isinstance(default, int))), None)
        if kind is not None:
            hints[parameter.name] = kind
    if "learning_rate" in hints:
        hints["learning_rate"] = (float | keras.optimizers.schedules.LearningRateSchedule
                                  | Callable[..., Any])
    return hints


def configurables() -> dict[str, dict[str, Any]]:
    """Every registered configurable, by the name messages call it by, with the type
    hints of its parameters that its bindings are checked against."""
    register()
    return dict(_TYPED.values())


def _check_bindings() -> None:
    """Checks every binding of a registered configurable against its parameter's type
    hint and declared range (``checks.check_value``): one mechanism for every stage,
    config dataclass, data source, model builder, strategy and transform, before any
    of them is called.

    Raises:
      ConfigError: naming ``configurable.parameter``, the value and what is allowed.
    """
    # gin has no public way to list every binding (get_bindings takes one configurable
    # in the current scope), and a scoped binding is a binding too.
    for (scope, selector), arguments in gin.config._CONFIG.items():  # noqa: SLF001
        if selector not in _TYPED:
            continue
        name, hints = _TYPED[selector]
        for parameter, value in arguments.items():
            judged = _judged(value)
            if parameter in hints and judged is not gin.REQUIRED:
                check_value(judged, hints[parameter],
                            f"{scope + '/' if scope else ''}{name}.{parameter}",
                            _shown(value, judged))


def _judged(value: Any) -> Any:
    """A bound value as it will reach its configurable, as far as the parse knows it: a
    macro's value, a reference to a configurable (@build_mlp) that configurable, a call
    of one (@FederatedConfig()) what it returns, known by its type."""
    if isinstance(value, gin.config.ConfigurableReference):
        target = value.configurable.wrapped
        if target is gin.config.macro:
            return _judged(gin.query_parameter("%" + value.scoped_selector.rsplit("/", 1)[0]))
        if not value.evaluate:
            return target
        if isinstance(target, type):
            return Returned(target)
        with contextlib.suppress(Exception):  # a hint that does not resolve: unknown
            returns = typing.get_type_hints(target).get("return")
            return Returned(returns if isinstance(returns, type) else None)
        return Returned(None)
    if isinstance(value, list | tuple):
        return type(value)(_judged(v) for v in value)
    if isinstance(value, dict):
        return {k: _judged(v) for k, v in value.items()}
    return value


def _shown(value: Any, judged: Any) -> str:
    """A bound value as the user wrote it (a macro with its value)."""
    if isinstance(value, gin.config.ConfigurableReference) and not isinstance(
            judged, Returned) and value.configurable.wrapped is gin.config.macro:
        return f"{value!r} = {judged!r}"
    return repr(value)


def configured(cls: type) -> object:
    """An instance of the registered config dataclass ``cls`` with its gin bindings."""
    return gin.get_configurable(cls)()


def configurable(name: str) -> Callable[..., Any]:
    """The registered configurable called ``name`` (``@`` optional), with its bindings.

    Raises:
      ConfigError: for an unknown name, with close matches.
    """
    name = name.removeprefix("@")
    try:
        return gin.get_configurable(name)
    except ValueError as e:
        close = difflib.get_close_matches(name, _registered, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"no configurable named {name!r}{hint}") from e


def parse(config_files: Sequence[str], bindings: Sequence[str]) -> None:
    """Parses gin files and ``a.b = v`` bindings into a fresh, finalised gin config.

    Includes are looked up beside each file, one directory up, in the working directory
    and in the project root.

    Raises:
      ConfigError: for a missing file, a syntax error, an unknown configurable or a
        parameter the configurable does not take; the message is one line.
    """
    register()
    gin.clear_config()
    for file in config_files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"gin file not found: {file}")
        for prefix in (path.resolve().parent, path.resolve().parent.parent):
            gin.add_config_file_search_path(str(prefix))
    gin.add_config_file_search_path(str(PROJECT_ROOT))
    quiet = _NotFoundFilter()
    logging.getLogger().addFilter(quiet)
    reading = _Includes()
    try:
        with _plain_files_only(reading):
            gin.parse_config_files_and_bindings(list(config_files), list(bindings),
                                                finalize_config=True)
    except _IncludeCycle:
        raise ConfigError(reading.cycle) from None
    except RecursionError:  # nesting beyond Python's stack without a cycle
        raise ConfigError(f"{', '.join(config_files)}: includes nested too deeply") from None
    except SyntaxError as e:  # gin's parse errors: say which file or binding
        where = f"{e.filename}, line {e.lineno}" if e.filename else \
            f"binding {bindings[e.lineno - 1]!r}" if e.lineno and e.lineno <= len(bindings) \
            else "a binding"
        raise ConfigError(f"{e.msg} in {where}") from e
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(_one_line(e)) from e
    finally:
        logging.getLogger().removeFilter(quiet)
    _check_bindings()


@contextlib.contextmanager
def _plain_files_only(reading: _Includes) -> Iterator[None]:
    """Parses with gin's plain file reader only, through ``reading``. gin 0.5's other
    reader takes an include such as 'experiments/x.gin' for a Python package path and
    crashes (TypeError) when `experiments` is importable as a namespace package, i.e.
    whenever the project root is on sys.path; lmt_tf's includes are files, never package
    resources."""
    readers = gin.config._FILE_READERS  # noqa: SLF001 (no public way to choose readers)
    saved = list(readers)
    readers[:] = [(reading.open if r[0] is open else r[0], r[1]) for r in saved
                  if r[0].__module__ != "gin.resource_reader"]
    try:
        yield
    finally:
        readers[:] = saved


class _IncludeCycle(RecursionError):
    """A gin file that includes itself, directly or through others."""


class _Includes:
    """The gin files being read, each inside the ones that include it: a file that
    includes itself is refused when it is opened the second time, not after gin has
    recursed a thousand times."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # as shown in messages
        self._paths: list[str] = []  # as opened
        self.cycle = ""

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[Any]:
        relative = os.path.relpath(path)
        shown = path if relative.startswith("..") else relative
        start = next((i for i, other in enumerate(self._paths)
                      if os.path.samefile(path, other)), None)
        if start is not None:
            chain = " -> ".join([*self.stack[start:], shown])
            self.cycle = f"gin file {self.stack[start]} includes itself ({chain})"
            raise _IncludeCycle(self.cycle)
        self.stack.append(shown)
        self._paths.append(path)
        try:
            with open(path) as file:
                yield file
        finally:
            self.stack.pop()
            self._paths.pop()


class _NotFoundFilter(logging.Filter):
    """gin logs an error for every search path an include is not found under, even when
    a later one holds it; a missing include still raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found")


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    unknown = re.search(r"No configurable matching (?:reference )?'@?([\w.]+)'", text)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), _registered, n=3)
        if close:
            text += f" (did you mean {' or '.join(close)}?)"
    return text


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
