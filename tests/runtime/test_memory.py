"""Sizes as users write them, the cap a task runs under, and a process tree's peak."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmt_tf.errors import LmtError
from lmt_tf.process import TASK_MEMORY_ENV
from lmt_tf.runtime.memory import (
    format_size,
    machine_memory,
    parse_size,
    process_tree,
    task_cap,
    tree_hwm,
    vm_hwm,
)


@pytest.mark.parametrize("text, size", [("2G", 2 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29),
                                        ("4096", 4096), ("64KiB", 64 << 10), ("1T", 1 << 40),
                                        (" 3 GB ", 3 << 30)])
def test_sizes_are_powers_of_1024(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2X", "", "0", "-1G", "G", "1.2.3M"])
def test_a_bad_size_is_one_line_naming_it(text: str) -> None:
    with pytest.raises(LmtError) as error:
        parse_size(text)
    assert str(error.value) == (f"--task-memory must be a size such as 2G, 512M or 1.5G "
                                f"(K, M, G, T: powers of 1024), got {text!r}")


def test_sizes_read_back() -> None:
    assert [format_size(s) for s in (12, 4300, 512 << 20, 8 << 30, 3 << 40)] == [
        "12 B", "4.2 KB", "512.0 MB", "8.0 GB", "3.0 TB"]


def test_the_cap_is_the_launchers_else_the_machines() -> None:
    assert task_cap({TASK_MEMORY_ENV: str(3 << 30)}).bytes == 3 << 30
    assert task_cap({TASK_MEMORY_ENV: str(3 << 30)}).source == "--task-memory"
    machine = task_cap({})
    assert machine == machine_memory()
    total = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < machine.bytes <= total
    with pytest.raises(LmtError, match=TASK_MEMORY_ENV):
        task_cap({TASK_MEMORY_ENV: "much"})


def test_the_peak_of_a_process_tree_counts_its_children() -> None:
    """A shell whose child holds 200 MB: the tree's peak holds them."""
    child = "x = bytearray(200 << 20); import time; print('ready', flush=True); time.sleep(30)"
    tree = subprocess.Popen(["/bin/sh", "-c", f'{sys.executable} -c "{child}"; true'],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert tree.stdout.readline().strip() == "ready"
        members = process_tree(tree.pid)
        assert len(members) == 2 and vm_hwm(tree.pid) < 100 << 20
        assert tree_hwm(tree.pid) > 200 << 20
    finally:
        for pid in reversed(process_tree(tree.pid)):  # the child, then the shell
            os.kill(pid, signal.SIGKILL)
        tree.wait()
    assert tree_hwm(tree.pid) is None  # gone
