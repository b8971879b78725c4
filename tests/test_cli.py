"""The lmt command: fast help, and one clear line with exit status 2 for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmt_tf.cli import main
from lmt_tf.process import EXIT_USER_ERROR
from tests.conftest import PROJECT_ROOT, TINY, all_runs


def test_help_does_not_import_tensorflow() -> None:
    code = ("import sys; from lmt_tf.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TF' if 'tensorflow' in sys.modules else 'no TF')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "run" in out.stdout and "ui" in out.stdout
    assert out.stdout.strip().endswith("no TF")


BAD_INPUT = {
    "missing gin file": (["missing.gin"], "gin file not found: missing.gin"),
    "unknown configurable": (["exp.gin", "--gin_param", "Trainer.epochs = 3"],
                             "No configurable matching 'Trainer'"),
    "misspelt parameter": (["exp.gin", "--gin_param", "TrainConfig.epocs = 3"], "epocs"),
    "wrong type": (["exp.gin", "--gin_param", "TrainConfig.epochs = 'three'"],
                   "TrainConfig.epochs must be an integer, got 'three'"),
    "unknown dataset": (["exp.gin", "--gin_param", "run_experiment.data = @load_mnsit"],
                        "load_mnsit"),
    "missing data directory": (["exp.gin", "--gin_param",
                                "run_experiment.data = @load_fashion_mnist",
                                "--gin_param", "load_fashion_mnist.data_dir = 'no/such/dir'"],
                               "Fashion-MNIST directory not found: no/such/dir"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_no_running_run(
        case: str, gin_file, in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gin_file(TINY)
    args, expected = BAD_INPUT[case]
    status = main(["run", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_USER_ERROR
    assert len(err) == 1, err
    assert err[0].startswith("lmt: error: ") and expected in err[0], err[0]
    assert [r.info.status for r in all_runs(in_tmp) if r.info.status == "RUNNING"] == []


def test_unknown_name_suggests_the_close_one(gin_file, capsys) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", "--gin_param", "run_experiment.model = @build_mpl"]) == 2
    assert "did you mean build_mlp" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs_an_experiment(in_tmp: Path) -> None:
    """The installed `lmt` command end to end in its own process."""
    (in_tmp / "exp.gin").write_text(TINY)
    lmt = Path(sys.executable).parent / "lmt"
    done = subprocess.run([str(lmt), "run", "exp.gin", "--gin_param", "TrainConfig.epochs=1"],
                          capture_output=True, text=True, timeout=300, cwd=in_tmp)
    assert done.returncode == 0, done.stderr
    assert "FINISHED" in done.stdout and "#/experiments/" in done.stdout
    # No TensorFlow start-up banner reaches the user.
    assert "cuda" not in done.stderr.lower() and "onednn" not in done.stderr.lower()
    assert "INFO mlflow" not in done.stderr  # no database-migration chatter either
    runs = all_runs(in_tmp)
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.mark.slow
def test_console_script_error_exit_status(in_tmp: Path) -> None:
    (in_tmp / "exp.gin").write_text(TINY)
    lmt = Path(sys.executable).parent / "lmt"
    done = subprocess.run(
        [str(lmt), "run", "exp.gin", "--gin_param", "run_experiment.data = @load_fashion_mnist",
         "--gin_param", "load_fashion_mnist.data_dir = 'nowhere'"],
        capture_output=True, text=True, timeout=300, cwd=in_tmp)
    assert done.returncode == EXIT_USER_ERROR
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("lmt: error:")]


def test_dry_run_describes_without_training(gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin", "--dry-run", "--gin_param",
                 "run_experiment.strategy = @mirrored_strategy"]) == 0
    out = capsys.readouterr().out
    assert ("MirroredStrategy, 2 replica(s) on CPU:0, CPU:1; global batch 64 = 32 per "
            "replica") in out
    assert "train 1,168, validation 270, test 359" in out
    assert "2,410 parameters" in out  # 64*32+32 + 32*10+10
    assert "TrainConfig.epochs = 2" in out
    assert all_runs(in_tmp) == [] and not (in_tmp / "lmt_work").exists()


def test_project_root_is_where_gin_fragments_are() -> None:
    assert (PROJECT_ROOT / "gin" / "data" / "mnist.gin").is_file()
