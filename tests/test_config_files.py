"""Every .gin file of the project parses against the registered configurables."""

from __future__ import annotations

import re
from pathlib import Path

import gin
import pytest

from lmt_tf import config
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
