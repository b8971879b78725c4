"""What gin can bind: lmt_tf's and Keras' configurables, registered here explicitly with
the type hints their bindings are checked against, and the gin root (bound as
``run_experiment``) that builds the ``Experiment``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import tf_keras as keras

from lmt_tf import transfer
from lmt_tf.checks import Annotated, Range, parameter_hints
from lmt_tf.data import clicklog, files, sources, text, tfrecord
from lmt_tf.data.pipeline import InputConfig
from lmt_tf.data.preprocessing import Preprocessing, fitting_builder
from lmt_tf.data.tokenization import Tokenizer
from lmt_tf.errors import ConfigError
from lmt_tf.experiment import Experiment
from lmt_tf.federated.config import FederatedConfig
from lmt_tf.federated.partition import PartitionConfig
from lmt_tf.federated.server_optimizers import ServerAdam, ServerAveraging, ServerMomentum
from lmt_tf.federated.transport import FlowerTLS
from lmt_tf.invocation import Configs, ExportConfig
from lmt_tf.models import cnn, dlrm, mlp, recommender, transformer
from lmt_tf.optim import schedules, sparse, transforms
from lmt_tf.runtime import strategy
from lmt_tf.stages import Export, Train
from lmt_tf.stages.clustering import Cluster
from lmt_tf.stages.distill import Distill
from lmt_tf.stages.evaluate import Evaluate
from lmt_tf.stages.federate import Federate
from lmt_tf.stages.prototypes import Prototypes
from lmt_tf.stages.prune import Prune
from lmt_tf.stages.quantize import QAT, TFLite
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.training.train_config import TrainConfig


def _fits_counts(builder: Callable[..., Any]) -> Callable[..., Any]:
    """``builder`` (build_dlrm, build_wide) fitting its count statistics (dense_mean,
    dense_std) on the training split, unless they are bound in gin: the mean and
    standard deviation of log1p(count) of its ``num_dense`` leading columns."""
    name = builder.__name__

    def setting(parameter: str) -> Any:
        try:
            return gin.query_parameter(f"{name}.{parameter}")
        except ValueError:  # not bound: the builder's default
            return inspect.signature(builder).parameters[parameter].default

    def fit(rows: Any) -> dict[str, Any]:
        if setting("dense_mean") is not None or setting("dense_std") is not None:
            return {}  # the user's own statistics
        mean, std = dlrm.dense_statistics(rows, setting("num_dense"))
        return {"dense_mean": mean, "dense_std": std}

    return fitting_builder(builder, fit)


_PROJECT = {
    "lmt": [TrainConfig, TrackingConfig, ExportConfig, InputConfig],
    "lmt.data": [sources.load_mnist, sources.load_fashion_mnist, sources.load_digits,
                 sources.load_breast_cancer, files.load_npz, files.load_csv,
                 sources.load_movielens, tfrecord.load_tfrecords, sources.few_shot,
                 text.load_reuters, text.load_20newsgroups, text.load_rotten_tomatoes,
                 text.load_text,
                 Preprocessing, Tokenizer, clicklog.load_clicklog, clicklog.ClickLogConfig],
    "lmt.optim": [transforms.ClipByValue, transforms.ClipByNorm, transforms.ClipByGlobalNorm,
                  transforms.AdaptiveGradientClipping, schedules.WarmupCosineDecay],
    "lmt.federated": [FederatedConfig, PartitionConfig, FlowerTLS],
    "lmt.models": [mlp.build_mlp, cnn.build_cnn, recommender.build_recommender,
                   transfer.build_transfer, transformer.build_transformer,
                   transformer.build_bag_of_embeddings,
                   _fits_counts(dlrm.build_dlrm), _fits_counts(dlrm.build_wide)],
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
    # lmt's row-sparse Keras optimizers for embedding tables (TrainConfig.embedding_optimizer).
    "lmt.optim": [sparse.SparseAdagrad, sparse.SparseFtrl],
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
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


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
