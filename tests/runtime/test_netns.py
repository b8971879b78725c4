"""A launched cluster cannot be reached from other hosts: its tasks' gRPC servers listen
on every interface, so lmt launch runs them in a network namespace of the job's own.

The test makes a namespace of its own with a second address (10.211.0.1), the stand-in
for a machine's network address, and runs `lmt launch` inside it; then it tries to
connect to every task's port through that address. All traffic stays inside namespaces
that the test created."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmt_tf.runtime.netns import unavailable
from tests.conftest import TINY

pytestmark = pytest.mark.slow
ADDRESS = "10.211.0.1"

PROBE = textwrap.dedent("""
    import json, re, socket, subprocess, sys, time
    lmt = [sys.executable, "-m", "lmt_tf.cli", "launch", *sys.argv[1:]]
    launch = subprocess.Popen(lmt, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ports, lines = [], []
    for line in launch.stdout:
        lines.append(line)
        ports += [int(p) for p in re.findall(r"started \\S+ at 127.0.0.1:(\\d+)", line)]
        if "MLflow run" in line:  # the chief's line: every server of the job is up
            break
    reached = {}
    for port in ports:
        for host in ("127.0.0.1", "ADDRESS"):
            with socket.socket() as s:
                s.settimeout(2)
                reached[f"{host}:{port}"] = s.connect_ex((host, port)) == 0
    launch.terminate()  # the launcher stops and reaps every task
    launch.communicate(timeout=60)
    print(json.dumps({"reached": reached, "output": "".join(lines)}))
""").replace("ADDRESS", ADDRESS)


def _in_test_namespace(args: list[str], cwd: Path) -> dict:
    # The stand-in address sits on the namespace's loopback interface: a server bound to
    # 127.0.0.1 does not answer on it, one bound to every interface does.
    setup = f'ip link set lo up && ip addr add {ADDRESS}/32 dev lo && exec "$0" "$@"'

    done = subprocess.run(["unshare", "--net", "--map-root-user", "sh", "-c", setup,
                           sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(unavailable() is not None or shutil.which("ip") is None
                    or subprocess.run(["unshare", "--net", "--map-root-user", "true"],
                                      capture_output=True).returncode != 0,
                    reason="needs network namespaces (unshare, nsenter, ip)")
@pytest.mark.parametrize("network", ["isolated", "host"])
def test_a_launched_cluster_is_reachable_only_from_inside(gin_file, in_tmp: Path,
                                                         network: str) -> None:
    exp = gin_file(TINY + "TrainConfig.epochs = 100000\n")
    result = _in_test_namespace(["--workers", "2", "--ps", "1", "--network", network,
                                 "--timeout", "120", exp], in_tmp)
    reached = result["reached"]
    assert len(reached) == 8, result["output"]  # chief, 2 workers, ps; two addresses each
    through_address = [ok for where, ok in reached.items() if where.startswith(ADDRESS)]
    if network == "host":  # the threat is real: every server listens on every interface
        assert all(through_address), result
    else:  # nothing answers outside the job's namespace, not even on loopback
        assert not any(reached.values()), result


_LAUNCHER = """
import time
from lmt_tf.runtime.netns import JobNamespace
namespace = JobNamespace()
print(namespace.command(["true"])[1].removeprefix("--target="), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(unavailable() is not None, reason="needs unshare and nsenter")
def test_the_namespace_holder_ends_with_a_launcher_killed_with_sigkill() -> None:
    import os
    import signal
    import time

    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        holder = Path(f"/proc/{int(launcher.stdout.readline())}/stat")
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while holder.exists() and holder.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the namespace outlived its launcher"
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
