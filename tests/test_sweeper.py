"""The kl_sweep sweeper: discovery, grammar, one table, validation, shards, resume, other sweepers."""

import os
import signal
import subprocess
import sys
import time
from collections import OrderedDict

import pandas as pd
import pytest
import yaml
from conftest import ROOT

from kl_sweep.collect import read_sweep
from kl_sweep.config import DIVERGENCE_NAMES
from kl_sweep.sweep import product
from kl_sweep.table import COLUMNS, TIMING_COLUMNS

SMOKE = 60  # configurations in conf/experiment/smoke.yaml


def sweep(cli, sweep_dir, *args, check=True):
    proc = cli("-m", *args, f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.latest_link=null")
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def table(sweep_dir):
    return pd.read_parquet(sweep_dir / "results.parquet")


def same_results(a, b):
    drop = [c for c in TIMING_COLUMNS if c in a.columns]
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop), check_exact=True)


def test_discovery_in_process():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [p.__name__ for p in Plugins.instance().discover(Sweeper)]
    assert "KLSweepSweeper" in names


def test_discovery_from_another_directory(tmp_path):
    code = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper;"
        "print([p.__name__ for p in Plugins.instance().discover(Sweeper)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert "KLSweepSweeper" in out.stdout


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"a": [1, 2], "b": ["x", "y", "z"]}, [(1, "x"), (1, "y"), (1, "z"), (2, "x"), (2, "y"), (2, "z")]),
        ({"a": [0.5]}, [(0.5,)]),
        (
            {"a": [1, 2], "b": ["x"], "c": [True, False]},
            [(1, "x", True), (1, "x", False), (2, "x", True), (2, "x", False)],
        ),
        ({"a": [], "b": [1]}, []),
    ],
)
def test_product_matches_the_basic_sweepers_order(values, expected):
    frame = product(OrderedDict(values))
    assert [tuple(r) for r in frame.itertuples(index=False)] == expected


@pytest.mark.parametrize(
    "override, values",
    [
        ("separation=1,2,3", [1.0, 2.0, 3.0]),
        ("separation=range(0,1,0.25)", [0.0, 0.25, 0.5, 0.75]),
        ("separation=range(3)", [0.0, 1.0, 2.0]),
        ("separation=choice(5,7)", [5.0, 7.0]),
        ("separation=4", [4.0]),
        ("optimizer.max_steps=10,20", [10, 20]),
        ("divergence=forward,reverse", ["forward", "reverse"]),
        ("estimator=choice(quadrature,grid)", ["quadrature", "grid"]),
        ("polish=true,false", ["True", "False"]),
    ],
)
def test_override_grammar(override, values):
    from hydra_plugins.kl_sweep_sweeper._core import _values, parse_overrides

    ((key, parsed),) = parse_overrides({}, [override], None).items()
    assert _values(key, parsed) == values


def test_the_main_use_writes_one_table(cli, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "separation=range(0,8,2)",
        "weight=0.5,0.9",
        "init_mu=range(-2,3,2)",
        "divergence=forward,reverse",
    ]
    proc = cli("-m", *args, f"hydra.sweep.dir={out}", f"hydra.sweeper.latest_link={tmp_path / 'latest'}")
    assert proc.returncode == 0, proc.stderr
    t = table(out)
    assert len(t) == 4 * 2 * 3 * 2
    assert list(t.columns) == COLUMNS + ["sweep_id", "job_num"]
    assert t.config_hash.is_unique and t.sweep_id.nunique() == 1
    assert t.job_num.tolist() == list(range(len(t)))
    # Basic-sweeper order: the last override varies fastest.
    assert t.divergence.tolist()[:4] == ["forward", "reverse", "forward", "reverse"]
    assert t.init_mu.tolist()[:6] == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0]
    assert (t.status == "converged").all()
    fwd = t[t.divergence == "forward"]
    var = 1 + fwd.separation**2 * fwd.weight * (1 - fwd.weight)
    assert ((fwd.sigma2 - var).abs() / var).max() < 1e-8
    assert (out / "multirun.yaml").is_file() and yaml.safe_load((out / "multirun.yaml").read_text())["hydra"]
    assert (tmp_path / "latest").resolve() == out.resolve()
    assert (
        not list(out.glob("*/results.parquet"))
        and not (out / "parts").exists()
        or not list((out / "parts").iterdir())
    )


def test_a_configuration_listed_twice_is_fitted_once(cli, tmp_path):
    """separation=1 and 1.0 are one configuration (the schema types it): one row, its first job."""
    out = tmp_path / "sweep"
    sweep(cli, out, "separation=1,1.0,2", "init_mu=0,1", "hydra.sweeper.shards=2")
    t = table(out)
    assert t.job_num.tolist() == [0, 1, 4, 5]
    assert t.separation.tolist() == [1.0, 1.0, 2.0, 2.0] and t.init_mu.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert t.config_hash.is_unique


def test_config_params_with_the_command_line_winning(cli, tmp_path):
    out = tmp_path / "sweep"
    sweep(cli, out, "experiment=smoke", "separation=1,2")
    t = table(out)
    assert sorted(t.separation.unique()) == [1.0, 2.0]
    assert len(t) == 2 * 2 * 3 * 2  # separation from the CLI x weight, init_mu, divergence from the preset


def test_glob_over_a_config_group(cli, tmp_path):
    out = tmp_path / "sweep"
    sweep(cli, out, "divergence=glob(*)", "separation=3", "init_mu=0,2")
    assert sorted(table(out).divergence.unique()) == sorted(DIVERGENCE_NAMES)


def test_one_bad_value_among_thousands_stops_everything(cli, tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(cli, out, "separation=range(0,40,0.01)", "weight=0.5,0.9,1.2", check=False)
    assert proc.returncode != 0
    assert "weight=1.2" in proc.stderr and "strictly between 0 and 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_an_empty_sweep_is_refused(cli, tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(cli, out, "separation=range(0,0)", check=False)
    assert proc.returncode != 0 and "separation" in proc.stderr and not out.exists()


def test_results_do_not_depend_on_chunk_size_or_shards(cli, tmp_path):
    sweep(cli, tmp_path / "one", "experiment=smoke")
    sweep(cli, tmp_path / "chunks", "experiment=smoke", "hydra.sweeper.chunk_size=7")
    sweep(cli, tmp_path / "joblib", "experiment=smoke", "hydra/launcher=joblib", "hydra.sweeper.shards=4")
    one = table(tmp_path / "one")
    assert len(one) == SMOKE
    same_results(one, table(tmp_path / "chunks"))
    same_results(one, table(tmp_path / "joblib"))
    assert len(list((tmp_path / "joblib").glob("[0-9]*"))) == 4  # four Hydra jobs


def test_submitit_local_shards(cli, tmp_path):
    sweep(cli, tmp_path / "one", "experiment=smoke")
    sweep(
        cli,
        tmp_path / "sub",
        "experiment=smoke",
        "hydra/launcher=submitit_local",
        "hydra.sweeper.shard_size=40",
    )
    same_results(table(tmp_path / "one"), table(tmp_path / "sub"))


def test_ray_launcher_where_installed(cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="the ray extra is not installed")
    sweep(cli, tmp_path / "one", "experiment=smoke")
    sweep(cli, tmp_path / "ray", "experiment=smoke", "hydra/launcher=ray", "hydra.sweeper.shards=2")
    same_results(table(tmp_path / "one"), table(tmp_path / "ray"))


def test_a_sweep_killed_midway_resumes_without_redoing_work(tmp_path):
    """SIGKILL once part files exist; the rerun fits only the missing rows and the table matches."""
    args = [
        "separation=range(0,8,0.5)",
        "weight=0.5,0.9",
        "init_mu=range(-4,4.5,1)",
        "divergence=forward,reverse",
    ]
    n = 16 * 2 * 9 * 2
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "kl_sweep",
        "-m",
        *args,
        "hydra.sweeper.chunk_size=48",
        "hydra.sweeper.latest_link=null",
    ]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(
        [*cmd, f"hydra.sweep.dir={killed}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "parts").glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_sweep(killed))
    assert 0 < done_before < n, "the kill should land mid-sweep"
    rerun = subprocess.run(
        [*cmd, f"hydra.sweep.dir={killed}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done_before} already done, {n - done_before} to fit" in rerun.stderr + rerun.stdout
    subprocess.run([*cmd, f"hydra.sweep.dir={full}"], cwd=ROOT, env=env, check=True, capture_output=True)
    resumed, uninterrupted = table(killed), table(full)
    assert len(resumed) == n and resumed.config_hash.is_unique
    same_results(resumed, uninterrupted)


def test_basic_sweeper_and_collect_give_the_same_table(cli, tmp_path):
    args = ["separation=1,5", "weight=0.6", "init_mu=-2,2", "divergence=forward,reverse"]
    sweep(cli, tmp_path / "ours", *args)
    proc = cli("-m", "hydra/sweeper=basic", *args, f"hydra.sweep.dir={tmp_path / 'basic'}")
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "basic").glob("*/results.parquet"))
    assert len(jobs) == 8 and all(len(pd.read_parquet(p)) == 1 for p in jobs)
    collected = subprocess.run(
        [sys.executable, "-m", "kl_sweep.collect", str(tmp_path / "basic")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert collected.returncode == 0, collected.stderr
    ours, basic = table(tmp_path / "ours"), table(tmp_path / "basic")
    keep = [c for c in COLUMNS if c not in TIMING_COLUMNS] + ["job_num"]
    same_results(ours[keep], basic[keep])


def test_optuna_minimises_the_returned_loss(cli, tmp_path):
    out = tmp_path / "optuna"
    proc = cli(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.sampler.seed=0",
        "divergence=reverse",
        "separation=4",
        "init_mu=interval(-3,3)",
        f"hydra.sweep.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())["best_value"]
    collected = read_sweep(out)
    assert len(collected) >= 2
    assert best == pytest.approx(collected.loss.min(), rel=1e-12)


def test_collect_refuses_a_missing_or_empty_directory(tmp_path):
    for target in (tmp_path / "absent", tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "kl_sweep.collect", str(target)], capture_output=True, text=True, cwd=ROOT
        )
        assert proc.returncode == 2 and str(target) in proc.stderr and "Traceback" not in proc.stderr


def test_an_unwritable_sweep_directory_fails_before_fitting(cli, tmp_path):
    # /proc refuses new entries even to root, so this holds whoever runs the tests.
    target = "/proc/kl_sweep_test_sweep"
    proc = cli("-m", "experiment=smoke", f"hydra.sweep.dir={target}", "hydra.sweeper.latest_link=null")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "not writable" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(target)


def test_a_file_in_the_way_of_the_sweep_directory_fails_before_fitting(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = sweep(cli, blocker / "sweep", "experiment=smoke", check=False)
    assert proc.returncode != 0 and "not a directory" in proc.stderr and "Traceback" not in proc.stderr


def test_a_huge_sweep_is_refused_before_it_is_enumerated(cli, tmp_path):
    out = tmp_path / "sweep"
    # Refused from the range's length (arithmetic), before a billion values are listed.
    proc = sweep(cli, out, "separation=range(0,1,1e-9)", "weight=0.5,0.6", check=False)
    assert proc.returncode == 2 and "at least 1,000,000,000 configurations" in proc.stderr
    assert "max_configurations" in proc.stderr and not out.exists()


def test_progress_is_log_lines_off_a_terminal_and_a_bar_on_one(cli, tmp_path):
    proc = sweep(cli, tmp_path / "plain", "experiment=smoke")
    assert (
        f"{SMOKE}/{SMOKE} configurations" in proc.stderr + proc.stdout
        and "s left" in proc.stderr + proc.stdout
    )
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    cmd = [sys.executable, "-m", "kl_sweep", "-m", "experiment=smoke", f"hydra.sweep.dir={tmp_path / 'tty'}"]
    cmd.append("hydra.sweeper.latest_link=null")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the child exits
            break
        if not chunk:
            break
        seen += chunk
    child.wait()
    os.close(leader)
    assert child.returncode == 0
    assert f"{SMOKE}/{SMOKE}".encode() in seen and b"cfg/s" in seen  # tqdm's bar: done/total, rate


@pytest.mark.parametrize(
    ("rows", "shards", "shard_size"),
    [(36, 4, None), (5000, 2, None), (163_200, 2, None), (10, 3, None), (7000, 9, 800)],
)
def test_shards_are_dealt_equal_blocks_round_robin(rows, shards, shard_size):
    """Every row in exactly one shard; shard sizes within one block of each other; a large sweep's
    shards each take blocks from the whole grid (a like mix of its costs); a small one is cut into
    contiguous ranges."""
    import numpy as np

    from hydra_plugins.kl_sweep_sweeper._core import DEAL_BLOCK, _job_span, _split

    frame = pd.DataFrame({"job_num": np.arange(rows)})
    pieces = _split(frame, shards, shard_size)
    jobs = np.concatenate([p["job_num"].to_numpy() for p in pieces])
    assert sorted(jobs.tolist()) == list(range(rows))
    n = -(-rows // shard_size) if shard_size else shards
    assert len(pieces) == n
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= DEAL_BLOCK
    for p in pieces:
        assert p["job_num"].is_monotonic_increasing
    if rows <= n * DEAL_BLOCK:
        assert all(" in " not in _job_span(p) for p in pieces)  # contiguous, in order
        assert [p["job_num"].iloc[0] for p in pieces] == sorted(p["job_num"].iloc[0] for p in pieces)
    else:
        for p in pieces:  # blocks from across the grid, not one stretch of it
            assert p["job_num"].max() - p["job_num"].min() > rows // 2
            assert " blocks" in _job_span(p)


@pytest.mark.parametrize("run", [1, 16, 64, 340, 1024])
def test_shards_get_a_like_mix_whatever_the_grids_period(run):
    """Costly and cheap rows in alternating runs of ``run`` rows (the divergence axis inside the
    start axis): each of two or three shards gets close to half of each, with no aliasing between
    the dealing and the period."""
    import numpy as np

    from hydra_plugins.kl_sweep_sweeper._core import _split

    rows = 163_200
    frame = pd.DataFrame({"job_num": np.arange(rows), "costly": (np.arange(rows) // run) % 2 == 1})
    for shards in (2, 3):
        shares = [p["costly"].mean() for p in _split(frame, shards, None)]
        assert max(abs(x - 0.5) for x in shares) < 0.02, (shards, shares)


@pytest.mark.slow
def test_the_sweepers_own_process_does_not_load_torch_when_workers_fit(cli, tmp_path):
    """With joblib shards, the process that plans the sweep and assembles its table never imports
    torch (about 1.5 s of its start-up); the workers that fit get it from the forkserver they are
    forked from, which imports it once, while the sweeper plans."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    # Every process reports at exit whether it holds torch; one that imports torch says so at once
    # (the workers are stopped, not shut down, when the shards are done: no exit handlers).
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "out = os.environ['KL_SWEEP_TEST_MODULES']\n"
        "def _report():\n"
        "    with open(os.path.join(out, str(os.getpid())), 'w') as f:\n"
        "        f.write(f\"{os.getppid()}\\n{'torch' in sys.modules}\")\n"
        "atexit.register(_report)\n"
        "class _Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            open(os.path.join(out, f'{os.getpid()}.torch'), 'w').close()\n"
        "sys.meta_path.insert(0, _Watch())\n"
    )
    reports = tmp_path / "reports"
    reports.mkdir()
    sweep_dir = tmp_path / "sweep"
    # A budget of 4 threads: each of the 2 shards fits on 2, set from its shard file. A forked worker
    # does not get the thread variables loky sets for the workers it starts itself.
    env = {"PYTHONPATH": str(hooks), "KL_SWEEP_TEST_MODULES": str(reports), "OMP_NUM_THREADS": "4"}
    proc = cli(
        "-m", "experiment=smoke", "hydra/launcher=joblib", "hydra.sweeper.shards=2",
        f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.latest_link=null", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(table(sweep_dir)) == SMOKE
    assert (proc.stdout + proc.stderr).count("configurations/s on 2 thread(s)") == 2, proc.stderr[-3000:]
    seen = {p.name: p.read_text().split("\n") for p in reports.iterdir() if not p.name.endswith(".torch")}
    main = [pid for pid, (parent, _) in seen.items() if int(parent) == os.getpid()]  # the workers' parent
    assert len(main) == 1 and seen[main[0]][1] == "False", seen
    importers = [p.name.split(".")[0] for p in reports.glob("*.torch")]
    # One process imported torch, though two shards fitted: the forkserver that joblib's workers are
    # forked from (kl_sweep.workers). Workers started as fresh interpreters would make two.
    assert len(importers) == 1 and importers[0] != main[0], (importers, seen)
