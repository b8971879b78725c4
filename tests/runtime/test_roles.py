"""TF_CONFIG parsing and roles."""

from __future__ import annotations

import json
import socket

import pytest

from lmt_tf.errors import LmtError
from lmt_tf.runtime.roles import check_own_port, current_role, parse_tf_config

CLUSTER = {"chief": ["h:1"], "worker": ["h:2", "h:3"], "ps": ["h:4"]}


def _config(task_type: str, index: int, cluster=CLUSTER) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("task_type, index, chief", [
    ("chief", 0, True), ("worker", 0, False), ("worker", 1, False), ("ps", 0, False)])
def test_roles_with_a_chief(task_type: str, index: int, chief: bool) -> None:
    _, role = parse_tf_config(_config(task_type, index))
    assert (role.task_type, role.task_id, role.is_chief) == (task_type, index, chief)
    assert role.tags() == {"lmt.cluster.workers": 3, "lmt.cluster.ps": 1}


def test_worker_zero_is_chief_without_a_chief_task() -> None:
    cluster = {"worker": ["h:1", "h:2"]}
    assert parse_tf_config(_config("worker", 0, cluster))[1].is_chief
    assert not parse_tf_config(_config("worker", 1, cluster))[1].is_chief


def test_no_tf_config_is_a_single_chief() -> None:
    assert current_role({}).is_chief and current_role({}).workers == 0


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"cluster": CLUSTER}), "'task' object"),
    (_config("worker", 2), "worker:2 is out of range: the cluster has 2 worker"),
    (_config("master", 0), "task type 'master'"),
    (_config("worker", -1), "non-negative"),
    (json.dumps({"cluster": {"trainer": ["h:1"]}, "task": {"type": "worker"}}), "job 'trainer'"),
])
def test_bad_tf_config(text: str, message: str) -> None:
    with pytest.raises(LmtError, match=message):
        parse_tf_config(text)


def test_own_port_in_use_is_reported() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = _config("worker", 1, {"worker": ["127.0.0.1:1", f"127.0.0.1:{port}"]})
        with pytest.raises(LmtError, match=f"worker:1 listens on 127.0.0.1:{port}.*in use"):
            check_own_port({"TF_CONFIG": config})
    check_own_port({"TF_CONFIG": config})  # free again: no error
