"""lmt compare: one curve per run in valid PNGs, a table of exactly the params that
differ, the report logged to a parent run; bad input."""

from __future__ import annotations

from pathlib import Path

from lmt_tf.cli import main
from lmt_tf.compare import select_runs, write_report
from tests.conftest import TINY, all_runs, mlflow_client

PNG = b"\x89PNG\r\n\x1a\n"


def _three_runs(gin_file) -> None:
    gin_file(TINY)
    for rate in ("0.05", "0.1", "0.2"):
        assert main(["run", "exp.gin", "--gin_param",
                     f"keras.optimizers.SGD.learning_rate = {rate}"]) == 0


def test_compare_plots_one_curve_per_run_and_lists_the_params_that_differ(
        gin_file, in_tmp: Path, capsys) -> None:
    _three_runs(gin_file)
    assert main(["compare", "--experiment", "exp", "--output", "report"]) == 0
    assert "lmt compare: 3 runs; 1 param differs" in capsys.readouterr().out
    uri = f"sqlite:///{in_tmp / 'mlruns.db'}"
    client = mlflow_client(in_tmp)
    runs = select_runs(client, uri, experiment="exp")
    report = write_report(client, runs, in_tmp / "again")
    assert report.params == ["SGD.learning_rate"]  # nothing else differs
    names = [r.info.run_name for r in runs]
    assert {"loss", "accuracy", "val_loss"} <= set(report.plots)
    for metric, path in report.plots.items():
        assert path.read_bytes()[:8] == PNG
        assert report.curves[metric] == names  # one line per run
    table = (in_tmp / "report" / "compare.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    assert header.split(" | ")[2] == "SGD.learning_rate"
    assert "test_accuracy" in header and table.count("\n| exp-") == 3
    assert "<table>" in (in_tmp / "report" / "compare.html").read_text()


def test_a_report_on_the_children_of_a_run_is_logged_to_it(gin_file, in_tmp: Path) -> None:
    _three_runs(gin_file)
    client = mlflow_client(in_tmp)
    children = all_runs(in_tmp)
    parent = client.create_run(children[0].info.experiment_id, run_name="sweep")
    for child in children:
        client.set_tag(child.info.run_id, "mlflow.parentRunId", parent.info.run_id)
    assert main(["compare", "--parent", parent.info.run_id, "--output", "r"]) == 0
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/compare.md", "compare/compare.html", "compare/curve_loss.png"} <= logged


def test_bad_comparisons_are_one_line_errors(gin_file, in_tmp: Path, capsys) -> None:
    gin_file(TINY)
    assert main(["run", "exp.gin"]) == 0
    assert main(["compare", "--experiment", "exp"]) == 2
    assert "found 1 run(s) to compare; need at least two" in capsys.readouterr().err
    assert main(["compare", "--experiment", "nope"]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err
    assert main(["compare"]) == 2
    assert "name the runs to compare" in capsys.readouterr().err
    run_id = all_runs(in_tmp)[0].info.run_id
    assert main(["compare", run_id, run_id, "--metric", "nonsense"]) == 2
    assert "no run has the metric(s) nonsense" in capsys.readouterr().err
