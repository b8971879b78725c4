"""Everything an lmt process prints goes through redaction: its own lines, lines other
libraries print (MLflow's "View run ... at" link) and the traceback of a bug; a password
is never shown, in a URI (also one a file path collapsed) or on its own."""

from __future__ import annotations

import sys
from pathlib import Path

from lmt_tf import commands
from lmt_tf.cli import main
from lmt_tf.process import EXIT_FAILED
from lmt_tf.tracking.credentials import RedactedStream
from tests.conftest import TINY

SECRET = "S3cretPW"
SERVER = f"http://alice:{SECRET}@127.0.0.1:1"


def test_a_password_in_a_value_lmt_echoes_is_not_printed(gin_file, in_tmp: Path,
                                                          capsys) -> None:
    gin_file(TINY + "run_experiment.data = @load_csv\n")
    assert main(["run", "exp.gin", "--gin_param",
                 f"load_csv.path = 'https://bob:{SECRET}@example.org/data.csv'"]) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "bob:***@" in err


def test_whatever_a_command_prints_is_redacted(in_tmp: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)

    def talkative(args) -> int:
        # MLflow's own link when a run ends, the password on its own, a line of a child's
        # output: nothing of lmt's making.
        sys.stdout.write(f"🏃 View run r at: {SERVER}/#/experiments/1/runs/2\n")
        print(f"decoded: {SECRET}", flush=True)
        sys.stderr.writelines([f"[trial:0] {SERVER}\n"])
        return 0

    monkeypatch.setattr(commands, "compare", talkative)
    assert main(["compare"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert "View run r at: http://alice:***@127.0.0.1:1/#/" in out and "decoded: ***" in out
    assert "[trial:0] http://alice:***@127.0.0.1:1" in err


def test_the_traceback_of_a_bug_is_redacted(in_tmp: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)

    def broken(args) -> int:
        raise RuntimeError(f"API request to {SERVER}/api/2.0/mlflow/runs/log-batch failed")

    monkeypatch.setattr(commands, "compare", broken)
    assert main(["compare"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and SECRET not in err
    assert err.strip().splitlines()[-1] == ("RuntimeError: API request to "
                                            "http://alice:***@127.0.0.1:1/api/2.0/mlflow/"
                                            "runs/log-batch failed")
    assert not isinstance(sys.stderr, RedactedStream)  # as it was, once lmt returns
