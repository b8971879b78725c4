"""Every .gin file of the project parses against the registered configurables."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import gin
import pytest

from lmt_tf import config
from lmt_tf.checks import OneOf, Range
from lmt_tf.errors import ConfigError
from tests.conftest import PROJECT_ROOT

GIN_FILES = sorted(
    str(p.relative_to(PROJECT_ROOT))
    for folder in ("gin", "experiments")
    for p in (PROJECT_ROOT / folder).rglob("*.gin")
)


def test_there_are_gin_files() -> None:
    assert "experiments/quickstart.gin" in GIN_FILES
    assert any(f.startswith("gin/strategies/") for f in GIN_FILES)


@pytest.mark.parametrize("name", GIN_FILES)
def test_gin_file_parses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT_ROOT)
    config.parse([name], [])
    assert gin.config_str().strip(), f"{name} binds nothing"


@pytest.mark.parametrize("name", GIN_FILES)
def test_every_number_has_a_comment(name: str) -> None:
    """Each number bound in a config file carries a comment with its unit or source."""
    for number, line in enumerate(Path(PROJECT_ROOT / name).read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        value = re.sub(r"'[^']*'|\"[^\"]*\"", "", code.split("=", 1)[1]) if "=" in code else ""
        if any(ch.isdigit() for ch in value):
            assert "#" in line, f"{name}:{number}: number without a comment: {line!r}"


def test_bound_params_flatten_every_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT_ROOT)
    config.parse(["experiments/quickstart.gin"], ["TrainConfig.epochs = 3"])
    params = config.bound_params()
    assert params["TrainConfig.epochs"] == "3"
    assert params["run_experiment.model"] == "@build_cnn"
    assert params["build_cnn.filters"] == "(32, 64)"
    assert params["load_mnist.validation_size"] == "5000"


def test_kubernetes_tfjob_runs_an_experiment_file_that_parses(monkeypatch) -> None:
    import yaml

    monkeypatch.chdir(PROJECT_ROOT)
    job = yaml.safe_load((PROJECT_ROOT / "experiments/k8s/mnist_tfjob.yaml").read_text())
    assert job["kind"] == "TFJob"
    (container,) = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert container["name"] == "tensorflow"
    command = container["command"]
    assert command[:2] == ["lmt", "run"]
    bindings = [command[i + 1] for i, arg in enumerate(command) if arg == "--gin_param"]
    config.parse([command[2]], bindings)
    assert config.bound_params()["run_experiment.strategy"] == "@multi_worker_mirrored_strategy"
    # A restarted pod continues this job's own run (and the first start makes it).
    from lmt_tf.cli import _parser

    args = _parser().parse_args(command[1:])
    assert args.resume and args.run_name == job["metadata"]["name"]

    # Only the job's own pods reach its gRPC port.
    policy = yaml.safe_load(
        (PROJECT_ROOT / "experiments/k8s/mnist_networkpolicy.yaml").read_text())
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    own = {"training.kubeflow.org/job-name": job["metadata"]["name"]}
    assert policy["spec"]["podSelector"]["matchLabels"] == own
    (rule,) = policy["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [own]
    assert [p["port"] for p in rule["ports"]] == [p["containerPort"] for p in container["ports"]]


def test_includes_resolve_with_the_project_on_sys_path(tmp_path: Path, monkeypatch) -> None:
    """Run from elsewhere with the project root importable: `experiments` is then a
    namespace package, which gin's package-resource reader would crash on."""

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    config.parse([str(PROJECT_ROOT / "experiments" / "mnist_accumulate.gin")], [])
    assert config.bound_params()["TrainConfig.micro_batches"] == "4"


# Every configurable config.py registers, with the type hints its bindings are checked
# against. lmt_tf's own must type every parameter; Keras' are typed from their defaults.
CONFIGURABLES = config.configurables()
TYPED = [(name, parameter) for name, hints in sorted(CONFIGURABLES.items())
         for parameter in hints]


def _members(hint: Any) -> list[Any]:
    """The types a hint admits at its top level, constraints and unions unwrapped."""
    if typing.get_origin(hint) is Annotated:
        return _members(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(hint) for m in _members(arg)]
    return [hint]


def _wrong(hint: Any) -> str:
    """A gin value of the wrong type for ``hint``: a word, or where words are allowed, a
    list of a number."""
    return "[1.5]" if str in _members(hint) else "'wrong'"


def test_every_registered_configurable_is_walked_and_types_every_parameter() -> None:
    from lmt_tf.stages.context import Stage

    names = set(CONFIGURABLES)
    assert {"run_experiment", "train", "prune", "tflite", "evaluate", "load_csv",
            "Preprocessing", "build_mlp", "mirrored_strategy", "ClipByNorm", "FedAdam",
            "FederatedConfig", "TrainConfig", "keras.optimizers.SGD"} <= names
    for name in names:  # each is a configurable gin knows by that name
        config.configurable(name)
    untyped = [f"{name}.{parameter}" for name, hints in CONFIGURABLES.items()
               if not name.startswith("keras.") for parameter, hint in hints.items()
               if hint is Any]
    assert untyped == []  # a configurable added without hints fails here
    stages = [config.configurable(name) for name in names]
    assert sum(isinstance(s, type) and issubclass(s, Stage) for s in stages) >= 10


@pytest.mark.parametrize("name, parameter", TYPED, ids=[f"{n}.{p}" for n, p in TYPED])
def test_a_wrong_typed_binding_of_any_configurable_is_one_error_naming_it(
        name: str, parameter: str) -> None:
    value = _wrong(CONFIGURABLES[name][parameter])
    with pytest.raises(ConfigError) as error:
        config.parse([], [f"{name}.{parameter} = {value}"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{name}.{parameter} must be "), message
    assert f"got {value}" in message


def _constrained(hint: Any) -> list[Range | OneOf]:
    """The constraints declared at the top level of ``hint`` (beside None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [c for arg in typing.get_args(hint) for c in _constrained(arg)]
    if typing.get_origin(hint) is Annotated:
        return [m for m in typing.get_args(hint)[1:] if isinstance(m, Range | OneOf)]
    return []


def _outside(constraint: Range | OneOf, integer: bool) -> str:
    """A gin value of the right type that the constraint refuses."""
    if isinstance(constraint, OneOf):
        return "'none of these'"
    step = 1 if integer else 0.5
    value = (constraint.ge - step if constraint.ge is not None
             else constraint.gt if constraint.gt is not None
             else constraint.le + step if constraint.le is not None else constraint.lt)
    return repr(int(value) if integer else float(value))


RANGED = [(name, parameter, constraint)
          for name, hints in sorted(CONFIGURABLES.items())
          for parameter, hint in hints.items() for constraint in _constrained(hint)]


def test_ranges_are_declared_beside_the_parameters() -> None:
    declared = {f"{n}.{p}" for n, p, _ in RANGED}
    assert {"prune.final_sparsity", "distill.alpha", "distill.temperature",
            "tflite.representative_examples", "cluster.clusters", "Preprocessing.k",
            "load_csv.test_fraction", "build_mlp.dropout", "run_experiment.seed",
            "mirrored_strategy.cross_device_ops", "ClipByNorm.limit"} <= declared


@pytest.mark.parametrize("name, parameter, constraint", RANGED,
                         ids=[f"{n}.{p}" for n, p, _ in RANGED])
def test_a_binding_outside_its_declared_range_is_one_error_naming_it(
        name: str, parameter: str, constraint: Range | OneOf) -> None:
    integer = int in _members(CONFIGURABLES[name][parameter])
    value = _outside(constraint, integer)
    with pytest.raises(ConfigError) as error:
        config.parse([], [f"{name}.{parameter} = {value}"])
    assert str(error.value).startswith(f"{name}.{parameter} must be "), str(error.value)
    assert str(constraint) in str(error.value) and f"got {value}" in str(error.value)


def test_bindings_of_the_right_type_and_range_pass() -> None:
    config.parse([], [
        "prune.final_sparsity = 0.5", "prune.m_by_n = [2, 4]", "tflite.modes = ['int8']",
        "evaluate.noise_levels = (0, 0.5)", "Preprocessing.clip_quantiles = [0.05, 0.95]",
        "federate.config = @FederatedConfig()", "FederatedConfig.server_optimizer = @FedAvgM()",
        "TrainConfig.gradient_transforms = [@ClipByNorm()]", "S = 0.25",
        "distill.alpha = %S", "keras.optimizers.Adam.learning_rate = "
        "@keras.optimizers.schedules.ExponentialDecay()", "TrainConfig.optimizer = @build_mlp",
        "distill.teacher = None"])


@pytest.mark.parametrize("files, message", [
    ({"exp.gin": ""}, "exp.gin binds nothing: an experiment sets at least "
                      "run_experiment.data"),
    ({"exp.gin": "include 'gin/models/mlp.gin'\n"},
     "exp.gin is not a complete experiment: it does not set run_experiment.data"),
    ({"exp.gin": "include 'gin/data/digits.gin'\n"},
     "exp.gin is not a complete experiment: it does not set run_experiment.model"),
])
def test_a_gin_file_that_is_not_an_experiment_is_named_with_what_it_lacks(
        tmp_path: Path, monkeypatch, files: dict[str, str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        Path(name).write_text(text)
    config.parse(["exp.gin"], [])  # a fragment parses ...
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.check_complete(["exp.gin"])  # ... but is no experiment


def test_the_bindings_may_complete_an_experiment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("exp.gin").write_text("include 'gin/data/digits.gin'\n")
    config.parse(["exp.gin"], ["run_experiment.model = @build_mlp"])
    config.check_complete(["exp.gin"])


@pytest.mark.parametrize("files, message", [
    ({"a.gin": "include 'a.gin'\n"}, "gin file a.gin includes itself (a.gin -> a.gin)"),
    ({"a.gin": "include 'b.gin'\n", "b.gin": "TrainConfig.epochs = 2  # passes\n"
                                              "include 'c.gin'\n",
      "c.gin": "include 'b.gin'\n"},
     "gin file b.gin includes itself (b.gin -> c.gin -> b.gin)"),
])
def test_a_gin_file_that_includes_itself_is_one_line_at_once(
        tmp_path: Path, monkeypatch, files: dict[str, str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        Path(name).write_text(text)
    with pytest.raises(ConfigError) as error:
        config.parse(["a.gin"], [])
    assert str(error.value) == message


def test_a_file_included_twice_side_by_side_is_no_cycle(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("common.gin").write_text("TrainConfig.epochs = 2  # passes\n")
    Path("a.gin").write_text("include 'common.gin'\ninclude 'common.gin'\n")
    config.parse(["a.gin"], [])
