"""Issue 11 (faults on real clusters): damaged and foreign files, two sweeps in one directory,
stale locks, failed shards, a disk that fills mid-sweep, and a numerics version change on resume.

Every case runs the command line as a user does, in subprocesses, and ends with a table equal to an
uninterrupted run's (same ``config_hash`` set and order, results to 1e-12, no duplicates) and no
Python traceback. Faults inside a sweep are injected from outside the package by
``tests/fault_hooks/sitecustomize.py``, which Python loads at start-up when it is on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

from kl_sweep.io import write_parquet
from kl_sweep.table import TIMING_COLUMNS
from kl_sweep.version import numerics_version

HOOKS = Path(__file__).resolve().parent / "fault_hooks"
HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
SWEEP = ["separation=0,2,4", "weight=0.5,0.9", "init_mu=-3,0,3", "divergence=forward,reverse"]
ROWS = 3 * 2 * 3 * 2
CHUNK = "hydra.sweeper.chunk_size=5"  # parts of at most five rows, where a test needs several parts
THIRDS = "hydra.sweeper.chunk_size=12"  # parts of 12 and 6 rows for each divergence
LOCK = ".lock"  # kl_sweep.lock.LOCK


def env(**hooks: str) -> dict[str, str]:
    """The environment of a user's shell, plus the fault hooks ``KL_SWEEP_TEST_<NAME>=value``."""
    out = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR" and not k.startswith("KL_SWEEP_")}
    out["PYTHONPATH"] = os.pathsep.join(
        [str(HOOKS), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    out.update({f"KL_SWEEP_TEST_{name.upper()}": value for name, value in hooks.items()})
    return out


def sweep_cmd(sweep_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kl_sweep",
        "-m",
        *SWEEP,
        *args,
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweeper.latest_link=null",
    ]


def run(cmd: list[str], **hooks: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**hooks), capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def sweep(sweep_dir: Path, *args: str, **hooks: str) -> subprocess.CompletedProcess:
    return run(sweep_cmd(sweep_dir, *args), **hooks)


def start(sweep_dir: Path, log: Path, *args: str, **hooks: str) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            sweep_cmd(sweep_dir, *args), cwd=ROOT, env=env(**hooks), stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.02)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and line.strip() != HINT]


def said(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, said(proc)[-3000:]
    return proc


def table(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(sweep_dir / "results.parquet")


def assert_complete(sweep_dir: Path, reference: pd.DataFrame, drop: tuple[str, ...] = ()) -> None:
    """The sweep's table equals the uninterrupted run's: hashes, order, results to 1e-12."""
    got = table(sweep_dir)
    assert got.config_hash.is_unique and len(got) == ROWS
    assert list(got.config_hash) == list(reference.config_hash)
    gone = [c for c in (*TIMING_COLUMNS, *drop) if c in got.columns]
    pd.testing.assert_frame_equal(
        got.drop(columns=gone), reference.drop(columns=gone), check_exact=False, rtol=1e-12, atol=0.0
    )


def fitted(proc: subprocess.CompletedProcess, done: int) -> None:
    assert f"{done} already done, {ROWS - done} to fit" in said(proc), said(proc)[-3000:]


def truncated_copy(source: Path, target: Path, size: int = 300) -> bytes:
    """The first ``size`` bytes of ``source``, as a copy cut off by a full disk or a lost node."""
    data = source.read_bytes()[:size]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("uninterrupted") / "sweep"
    ok(sweep(sweep_dir))
    assert len(table(sweep_dir)) == ROWS
    return sweep_dir


@pytest.fixture
def reference(uninterrupted) -> pd.DataFrame:
    return table(uninterrupted)


@pytest.fixture
def copy(uninterrupted, tmp_path) -> Path:
    """A finished sweep directory, to damage."""
    return Path(shutil.copytree(uninterrupted, tmp_path / "sweep", symlinks=True))


# ----------------------------------------------------------------------------------------------
# Damaged and foreign files: one line each, moved to damaged/ (never deleted), fitted again.
# ----------------------------------------------------------------------------------------------


def test_a_damaged_results_table_is_moved_aside_and_its_rows_fitted_again(copy, reference):
    results = copy / "results.parquet"
    cut = truncated_copy(results, results)
    # collect and analysis refuse it: one line naming the file, a non-zero exit
    for tool in (["kl_sweep.collect"], ["analysis"]):
        proc = run([sys.executable, "-m", *tool, str(copy)])
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2, said(proc)
        assert len(lines) == 1 and str(results) in lines[0] and "damaged results file" in lines[0], lines
    assert results.read_bytes() == cut  # they touch nothing
    proc = ok(sweep(copy))
    warned = [line for line in said(proc).splitlines() if "damaged results file" in line]
    assert len(warned) == 1 and str(results) in warned[0] and "damaged" in warned[0]
    assert (copy / "damaged" / "results.parquet").read_bytes() == cut  # moved aside, not deleted
    fitted(proc, 0)
    assert_complete(copy, reference)


def _split_into_parts(copy: Path, reference: pd.DataFrame) -> tuple[Path, bytes]:
    """The table as an interrupted sweep leaves it: results for 18 rows, parts for 18 more."""
    write_parquet(reference.iloc[:18], copy / "results.parquet")
    write_parquet(reference.iloc[18:27], copy / "parts" / "part-a.parquet")
    whole = write_parquet(reference.iloc[27:], copy / "whole.parquet")
    damaged = copy / "parts" / "part-b.parquet"
    cut = truncated_copy(whole, damaged)
    whole.unlink()
    return damaged, cut


def test_a_damaged_part_is_moved_aside_and_its_rows_fitted_again(copy, reference):
    damaged, cut = _split_into_parts(copy, reference)
    proc = run([sys.executable, "-m", "kl_sweep.collect", str(copy)])
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and str(damaged) in lines[0], said(proc)
    proc = ok(sweep(copy))
    assert f"damaged results file {damaged}" in said(proc)
    assert (copy / "damaged" / "parts__part-b.parquet").read_bytes() == cut
    fitted(proc, 27)
    assert_complete(copy, reference)


def test_foreign_files_are_moved_aside_and_do_not_count_as_results(copy, reference):
    write_parquet(reference.iloc[:30], copy / "results.parquet")
    foreign = copy / "parts" / "notes.parquet"  # a Parquet file, but not a results table
    write_parquet(pd.DataFrame({"a": [1, 2], "config_hash": ["x", "y"]}), foreign)
    junk = copy / ".shards" / "shard-00000.parquet"  # a shard file that is not Parquet at all
    junk.parent.mkdir()
    junk.write_text("left here by someone else\n")
    proc = ok(sweep(copy))
    assert f"damaged results file {foreign}: not a kl_sweep results table" in said(proc)
    assert f"damaged shard file {junk}" in said(proc)
    assert (copy / "damaged" / "parts__notes.parquet").is_file()
    assert (copy / "damaged" / ".shards__shard-00000.parquet").read_text() == "left here by someone else\n"
    fitted(proc, 30)
    assert_complete(copy, reference)


# ----------------------------------------------------------------------------------------------
# One sweep at a time per directory.
# ----------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_second_sweep_into_a_live_sweeps_directory_is_refused(tmp_path, reference):
    sweep_dir = tmp_path / "sweep"
    gate = tmp_path / "gate"  # the first sweep's shard fits once this file exists
    first = start(sweep_dir, tmp_path / "first.log", gate=str(gate))
    try:
        wait_for(sweep_dir / "0" / ".hydra" / "overrides.yaml", first)  # fitting (slowly) now
        time.sleep(0.3)
        before = snapshot(sweep_dir)
        second = sweep(sweep_dir)
        assert first.poll() is None, "the first sweep ended before the second was refused"
        assert snapshot(sweep_dir) == before  # the second wrote nothing
    finally:
        gate.touch()
        first.wait(timeout=120)
    lines = error_lines(second.stderr)
    assert second.returncode == 2 and len(lines) == 1, said(second)
    assert f"pid {first.pid} on {socket.gethostname()} since " in lines[0] and str(sweep_dir) in lines[0]
    assert "to fit" not in said(second)
    log = (tmp_path / "first.log").read_text()
    assert first.returncode == 0 and "0 already done, 36 to fit" in log, log[-3000:]
    assert not (sweep_dir / LOCK).exists()
    assert_complete(sweep_dir, reference)


def test_a_lock_left_by_a_killed_sweep_does_not_block_the_rerun(tmp_path, reference):
    sweep_dir = tmp_path / "sweep"
    killed = start(sweep_dir, tmp_path / "killed.log", gate=str(tmp_path / "never"))
    try:
        wait_for(sweep_dir / "0" / ".hydra" / "overrides.yaml", killed)
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    assert json.loads((sweep_dir / LOCK).read_text())["pid"] == killed.pid  # left behind
    proc = ok(sweep(sweep_dir))
    assert f"taking over the stale lock of pid {killed.pid} on {socket.gethostname()}" in said(proc)
    assert f"process {killed.pid} is not running" in said(proc)
    fitted(proc, 0)
    assert not (sweep_dir / LOCK).exists()
    assert_complete(sweep_dir, reference)


def _other_hosts_lock(sweep_dir: Path, age: float) -> None:
    sweep_dir.mkdir()
    holder = {"host": "node-17.cluster", "pid": 4242, "since": "2026-01-01T00:00:00Z", "token": "t"}
    (sweep_dir / LOCK).write_text(json.dumps(holder))
    when = time.time() - age
    os.utime(sweep_dir / LOCK, (when, when))


def test_another_hosts_lock_holds_while_it_beats_and_is_taken_over_when_it_stops(tmp_path):
    """Unit level: the heartbeat rule for a lock this host cannot check (another node's pid)."""
    from kl_sweep.lock import LockedError, SweepLock

    live, lost = tmp_path / "live", tmp_path / "lost"
    _other_hosts_lock(live, age=5)
    with pytest.raises(LockedError, match="pid 4242 on node-17.cluster since 2026-01-01T00:00:00Z"):
        SweepLock(live, stale_after=60).acquire()
    assert json.loads((live / LOCK).read_text())["pid"] == 4242  # left alone
    assert sorted(p.name for p in live.iterdir()) == [LOCK]  # and nothing else written
    _other_hosts_lock(lost, age=120)
    with SweepLock(lost, stale_after=60) as lock:
        assert json.loads((lost / LOCK).read_text())["token"] == lock.me.token
    assert not (lost / LOCK).exists()


# ----------------------------------------------------------------------------------------------
# A failed shard, a full disk.
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_failed_shards_under_joblib_leave_the_others_and_the_rerun_fits_the_rest(tmp_path, reference):
    """Of 4 shards, shard 1 raises MemoryError and shard 3's worker is SIGKILLed, each after its
    first part; the killed worker takes joblib's pool down, and the shards left are run one by one."""
    sweep_dir = tmp_path / "sweep"
    joblib = ["hydra/launcher=joblib", "hydra.sweeper.shards=4", CHUNK]
    proc = sweep(sweep_dir, *joblib, raise_shard="1", kill_shard="3")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, said(proc)[-3000:]
    assert "2 of 4 shard(s) failed" in lines[0], lines
    assert "shard 1 (job_num 9-17): injected by the test: out of memory" in lines[0], lines
    assert "shard 3 (job_num 27-35): its worker process died" in lines[0], lines
    kept = pd.concat([pd.read_parquet(p) for p in (sweep_dir / "parts").glob("*.parquet")])
    assert kept.config_hash.is_unique and set(range(9)) | set(range(18, 27)) <= set(kept.job_num)
    # shards 0 and 2 whole (18 rows), and the first part of shards 1 and 3: each shard's rows are
    # fitted group by group, and its first group (forward KL) has 4 of its 9 rows
    assert len(kept) == 18 + 4 + 4
    assert f"{ROWS - len(kept)} configuration(s) not fitted" in lines[0]
    rerun = ok(sweep(sweep_dir, *joblib))  # the same command, as the line says
    fitted(rerun, len(kept))
    assert_complete(sweep_dir, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs where one can be mounted (root); else None and the hook raises ENOSPC itself."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )
    yield where if mounted else None
    if mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_disk_that_fills_mid_sweep_leaves_whole_files_and_the_rerun_completes(
    tmp_path, small_disk, reference
):
    disk = small_disk or tmp_path
    sweep_dir, ballast = disk / "sweep", disk / "ballast"
    # the third part's write meets a full disk: the ballast file fills the tmpfs just before
    proc = sweep(sweep_dir, THIRDS, fill_disk=f"{ballast if small_disk else ''}:3")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, said(proc)[-3000:]
    assert "the disk is full (No space left on device)" in lines[0], lines
    assert "18 configuration(s) not fitted" in lines[0] and "free space, then rerun" in lines[0], lines
    assert not [p for p in sweep_dir.rglob("*") if p.name.endswith(".tmp")]  # no partial file
    parts = sorted((sweep_dir / "parts").glob("*.parquet"))
    assert len(parts) == 2 and sum(len(pd.read_parquet(p)) for p in parts) == 18
    ballast.unlink(missing_ok=True)  # space freed
    rerun = ok(sweep(sweep_dir, THIRDS))
    fitted(rerun, 18)
    assert_complete(sweep_dir, reference)


# ----------------------------------------------------------------------------------------------
# Rows of another numerics version.
# ----------------------------------------------------------------------------------------------

OLD = "0.0.1+0123456789ab"


@pytest.fixture
def upgraded(copy, reference, tmp_path) -> dict[str, Path]:
    """Three copies of a sweep whose reverse-KL rows an older numerics version fitted."""
    old = reference.copy()
    old.loc[old.divergence == "reverse", "numerics_version"] = OLD
    write_parquet(old, copy / "results.parquet")
    return {p: Path(shutil.copytree(copy, tmp_path / p, symlinks=True)) for p in ("stop", "keep", "refit")}


def test_a_version_change_on_resume_stops_by_default_and_refit_or_keep_work(upgraded, reference):
    assert reference.numerics_version.eq(numerics_version()).all()
    before = (upgraded["stop"] / "results.parquet").read_bytes()
    policies = {"stop": [], "keep": ["hydra.sweeper.on_version_change=keep"]}
    policies["refit"] = ["hydra.sweeper.on_version_change=refit"]
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(policies, pool.map(lambda p: sweep(upgraded[p], *policies[p]), policies)))

    stop = procs["stop"]
    lines = error_lines(stop.stderr)
    assert stop.returncode == 2 and len(lines) == 1, said(stop)
    assert f"18 rows in {upgraded['stop']} were fitted by numerics version {OLD}" in lines[0]
    assert "on_version_change=refit" in lines[0] and "=keep" in lines[0]
    assert (upgraded["stop"] / "results.parquet").read_bytes() == before
    assert not (upgraded["stop"] / "superseded").exists()

    fitted(ok(procs["keep"]), 36)
    kept = table(upgraded["keep"])
    assert (kept.numerics_version == OLD).sum() == 18  # labelled as what they are
    assert_complete(upgraded["keep"], reference, drop=("numerics_version",))

    fitted(ok(procs["refit"]), 18)
    assert (upgraded["refit"] / "superseded" / "results.parquet").read_bytes() == before
    assert_complete(upgraded["refit"], reference)
