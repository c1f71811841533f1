"""Ending a process without tearing its interpreter down (kl_sweep.shutdown), as the command line
and joblib's forkserver do: exit handlers still run, the streams are flushed, the status is kept."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT


def run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A Python program that writes its marks into ``tmp_path``."""
    program = "import atexit, os, sys, threading, time\nfrom pathlib import Path\n"
    program += f"OUT = Path({str(tmp_path)!r})\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


# Module teardown deletes __main__'s globals: this object's __del__ leaves a mark when it happens.
TEARDOWN = """
class Teardown:
    def __del__(self):
        (OUT / "teardown").write_text("ran")
keep = Teardown()
atexit.register(lambda: (OUT / "handler").write_text("ran"))
"""


@pytest.mark.parametrize(
    "body, status, stderr",
    [
        ("pass", 0, ""),
        ("sys.exit(3)", 3, ""),
        ("sys.exit('no such thing')", 1, "no such thing"),
    ],
)
def test_run_then_exit_keeps_the_status_the_handlers_and_the_output(tmp_path, body, status, stderr):
    code = (
        TEARDOWN
        + f"""
from kl_sweep.shutdown import run_then_exit
def entry():
    sys.stdout.write("unflushed")  # no newline: still in the buffer when the process ends
    {body}
run_then_exit(entry)
"""
    )
    done = run(code, tmp_path)
    assert done.returncode == status, done.stderr
    assert done.stdout == "unflushed"
    assert done.stderr.strip() == stderr
    assert (tmp_path / "handler").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()  # the teardown was skipped


def test_a_plain_exit_does_tear_down(tmp_path):
    """The control for the test above: without run_then_exit, the mark of the teardown is left."""
    done = run(TEARDOWN + "sys.exit(0)\n", tmp_path)
    assert done.returncode == 0
    assert (tmp_path / "teardown").read_text() == "ran"


def test_run_then_exit_waits_for_a_running_thread_as_python_does(tmp_path):
    code = """
from kl_sweep.shutdown import run_then_exit
def late():
    time.sleep(0.3)
    (OUT / "thread").write_text("done")
def entry():
    threading.Thread(target=late).start()
run_then_exit(entry)
"""
    done = run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread").read_text() == "done"


def test_an_error_propagates_with_its_traceback(tmp_path):
    done = run("from kl_sweep.shutdown import run_then_exit\nrun_then_exit(lambda: 1 / 0)\n", tmp_path)
    assert done.returncode == 1
    assert "ZeroDivisionError" in done.stderr


def test_exit_quickly_applies_to_its_process_not_to_the_ones_it_forks(tmp_path):
    code = """
atexit.register(lambda: (OUT / f"before-{os.getpid()}").write_text("ran"))
from kl_sweep.shutdown import exit_quickly
exit_quickly()
atexit.register(lambda: (OUT / f"after-{os.getpid()}").write_text("ran"))
child = os.fork()
if child == 0:
    sys.exit(0)  # a forked process exits as usual: every handler runs
os.waitpid(child, 0)
(OUT / "pids").write_text(f"{os.getpid()} {child}")
"""
    done = run(code, tmp_path)
    assert done.returncode == 0, done.stderr
    parent, child = (tmp_path / "pids").read_text().split()
    assert (tmp_path / f"after-{parent}").exists()  # registered later: runs first
    assert not (tmp_path / f"before-{parent}").exists()  # registered earlier: skipped
    assert (tmp_path / f"after-{child}").exists() and (tmp_path / f"before-{child}").exists()
