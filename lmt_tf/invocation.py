"""What one invocation of an experiment is given: the experiment's config objects
(``Configs``, built from gin at the edge or passed by a script) and how this process
runs it (``RunOptions``, set by the CLI or a test, never by gin)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import tf_keras as keras

from lmt_tf.checks import check_types
from lmt_tf.data.pipeline import InputConfig
from lmt_tf.data.preprocessing import Preprocessing
from lmt_tf.federated.transport import FlowerTLS
from lmt_tf.tracking.config import TrackingConfig
from lmt_tf.training.train_config import TrainConfig


@dataclass
class ExportConfig:
    """What a finished run exports."""

    saved_model: bool = True  # write a SavedModel and log it as a run artifact
    mlflow_model: bool = True  # log an MLflow pyfunc model serving the SavedModel

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class Configs:
    """The config objects of one experiment; gin builds them from the bindings at the
    edge (``config.py``), a test or a script passes them directly."""

    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    input: InputConfig = field(default_factory=InputConfig)
    preprocess: Preprocessing = field(default_factory=Preprocessing)


@dataclass(frozen=True)
class FlowerRole:
    """This process's part in a Flower deployment (``lmt federate``)."""

    address: str  # host:port the server listens on (server) or connects to (client)
    client: int | None = None  # the client id this process serves; None: the server
    tls: FlowerTLS | None = None  # its TLS files, checked; None: plaintext


@dataclass
class RunOptions:
    """How one invocation runs an experiment; set by the CLI or a test, not by gin."""

    config_files: Sequence[str] = ()  # the gin files as given, logged as artifacts
    bindings: Sequence[str] = ()  # the --gin_param bindings as given
    resume: bool = False  # continue the latest run of this experiment (or run_name)
    run_name: str | None = None  # the run directory's name; None: experiment + time
    allow_changes: bool = False  # let a resume change bindings (recorded beside the config)
    dry_run: bool = False  # describe what would run, train nothing
    # Federated deployment on Flower: the server's or a client's side of it.
    flower: FlowerRole | None = None
    callbacks: Sequence[keras.callbacks.Callback] = ()  # extra Keras callbacks (training)
    echo: Callable[[str], None] = print  # progress output
    # What the config edge knows of the configuration, for the run's record: every
    # binding flattened ({'TrainConfig.epochs': '3'}), the resolved config as text, and
    # (after the run) the config that was actually used.
    params: Mapping[str, str] = field(default_factory=dict)
    config_text: str = ""
    operative_config: Callable[[], str] = str
    operative_params: Callable[[], Mapping[str, str]] = dict  # the same, flattened
