"""Thread budget and its split among shards (kl_sweep.threads and the sweeper's shard_threads)."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from hydra_plugins.kl_sweep_sweeper._core import shard_threads
from kl_sweep import threads
from kl_sweep.sweep import run_shard, write_shard
from kl_sweep.workers import asks_for_joblib, might_ask_for_joblib

BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def test_budget_is_the_affinity_mask_unless_omp_num_threads_says_otherwise(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert threads.available_cores() == 3
    assert threads.thread_budget({}) == 3
    assert threads.thread_budget({"OMP_NUM_THREADS": "1"}) == 1
    assert threads.thread_budget({"OMP_NUM_THREADS": "8"}) == 8  # an explicit choice is kept
    assert threads.thread_budget({"OMP_NUM_THREADS": "zero"}) == 3  # not a number: ignored
    assert threads.thread_budget({"OMP_NUM_THREADS": "0"}) == 3


@pytest.mark.parametrize(
    "target, n_jobs, shards, expected",
    [
        (BASIC, None, 4, 6),  # shards run one after another: each gets every core
        (JOBLIB, -1, 2, 3),  # two side by side share the six cores
        (JOBLIB, -1, 8, 1),  # more shards than cores: one thread each
        (JOBLIB, 2, 8, 3),  # only two run at once
        (SUBMITIT_LOCAL, None, 3, 2),
        (SLURM, None, 4, None),  # each job uses the cores its node gives it
    ],
)
def test_shards_share_the_budget_among_those_that_run_at_once(monkeypatch, target, n_jobs, shards, expected):
    import joblib

    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    monkeypatch.setattr(joblib, "effective_n_jobs", lambda n: 6 if n == -1 else n)
    launcher = {"_target_": target} if n_jobs is None else {"_target_": target, "n_jobs": n_jobs}
    assert shard_threads(OmegaConf.create({"hydra": {"launcher": launcher}}), shards) == expected


def test_a_shard_fits_with_the_threads_its_spec_gives(tmp_path):
    rows = pd.DataFrame(
        {
            "separation": [3.0],
            "weight": [0.75],
            "center": [0.0],
            "component_var": [1.0],
            "init_mu": [1.0],
            "init_sigma2": [1.0],
            "optimizer.lr": [0.05],
            "optimizer.max_steps": [20_000],
            "optimizer.tol": [1e-8],
            "group": [0],
            "job_num": [0],
            "config_hash": ["0" * 16],
        }
    )
    shared = {
        "divergence.name": "reverse",
        "estimator.name": "quadrature",
        "optimizer.name": "adam",
        "polish": True,
    }
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        spec = write_shard(tmp_path / "shard.parquet", rows, [shared], "s", tmp_path, 16, threads=1)
        assert run_shard(spec) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-m", "separation=1,2", "hydra/launcher=joblib"], True),
        (["--multirun", "hydra/launcher=joblib", "hydra.sweeper.shards=2"], True),
        (["separation=1", "hydra/launcher=joblib"], False),  # a single run: no workers
        (["-m", "separation=1,2"], False),  # the basic launcher fits in this process
        (["-m", "hydra/launcher=submitit_local"], False),
        (["-m", "hydra/launcher=joblib", "separation=[1"], False),  # malformed: the pre-flight says so
    ],
)
def test_the_command_line_starts_the_forkserver_only_for_joblib_sweeps(argv, expected):
    assert asks_for_joblib(argv) is expected
    # The check before the command line's imports lets through every joblib sweep, and no
    # command line without "joblib" or without -m.
    assert might_ask_for_joblib(argv) is (expected or argv[0] == "-m" and "joblib" in " ".join(argv))


def test_without_a_forkserver_workers_start_as_loky_starts_them(monkeypatch):
    """A forkserver that cannot start (no Unix sockets in a sandbox) leaves loky's own start method."""
    from multiprocessing import forkserver

    from joblib.externals.loky.backend.context import get_start_method

    from kl_sweep import workers

    def refuse() -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(workers, "_running", None)
    monkeypatch.setattr(workers, "_used", False)
    monkeypatch.setattr(forkserver, "ensure_running", refuse)
    before = get_start_method()
    assert workers.use_forkserver() is False
    assert get_start_method() == before != "forkserver"
    assert workers._running is False and workers._used is False
