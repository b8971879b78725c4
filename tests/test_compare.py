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
    assert header.split(" | ")[2:4] == ["status", "SGD.learning_rate"]
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


def _logged_runs(in_tmp: Path, experiment: str, statuses: dict[str, str]) -> None:
    """Runs made directly in the store: each logs val_accuracy for two epochs, then
    ends with its status."""
    client = mlflow_client(in_tmp)
    experiment_id = client.create_experiment(experiment)
    for name, status in statuses.items():
        run = client.create_run(experiment_id, run_name=name)
        for step, value in ((1, 0.5), (2, 0.75)):
            client.log_metric(run.info.run_id, "val_accuracy", value, step=step)
        client.log_param(run.info.run_id, "SGD.learning_rate", name)
        client.set_terminated(run.info.run_id, status)


def test_runs_that_did_not_finish_show_their_status_and_no_final_metric(
        in_tmp: Path, capsys) -> None:
    _logged_runs(in_tmp, "exp", {"done": "FINISHED", "killed": "KILLED", "failed": "FAILED"})
    assert main(["compare", "--experiment", "exp", "--output", "r"]) == 0
    assert "2 did not finish (their last values are marked †)" in capsys.readouterr().out
    lines = (in_tmp / "r" / "compare.md").read_text().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines
             if line.startswith("| ")]
    header, rows = table[0], {row[0]: row for row in table[2:]}
    assert header[:3] == ["run", "id", "status"]
    assert {name: row[2] for name, row in rows.items()} == \
        {"done": "FINISHED", "killed": "KILLED", "failed": "FAILED"}
    # The last epoch of a run that finished is its result; of one that did not, it is
    # marked as what it is.
    column = header.index("val_accuracy")
    assert rows["done"][column] == "0.75"
    assert rows["killed"][column] == rows["failed"][column] == "0.75 †"
    assert any(line.startswith("† the last value logged by a run that did not finish")
               for line in lines)
    assert "0.75 †" in (in_tmp / "r" / "compare.html").read_text()


def test_a_report_named_after_an_experiment_stays_under_lmt_compare(in_tmp: Path) -> None:
    """An MLflow experiment name may hold '/' and '..': the report's directory is made
    from it, not placed by it."""
    outside = in_tmp.parent / "escaped"
    for name in ("../escaped", str(outside), "a/../../escaped"):
        _logged_runs(in_tmp, name, {"one": "FINISHED", "two": "FINISHED"})
        assert main(["compare", "--experiment", name]) == 0
    reports = sorted(p.relative_to(in_tmp) for p in in_tmp.rglob("compare.md"))
    assert len(reports) == 3 and all(p.parts[0] == "lmt_compare" and len(p.parts) == 3
                                     for p in reports)
    assert not outside.exists()
