"""End-to-end sweep throughput and memory, measured through the command line.

1. 10,000 configurations (both divergences, Adam, quadrature) with the kl_sweep sweeper: wall time
   of the whole command (start-up included). Target: at most 10 s on a 2-core machine.
2. The same grid through Hydra's basic sweeper and launcher, one job per configuration: a
   subsample of jobs is timed at two sizes, so start-up cancels out of the per-job time, which is
   then multiplied by 10,000. Target: the kl_sweep path at least 300x faster.
3. The study mix (both divergences, separation 0-10, weight 0.5-0.95, init_mu -5..5) at 10^4,
   10^5 and 10^6 configurations, through ``hydra/launcher=joblib hydra.sweeper.shards=C`` (C the
   cores this process may use, one single-threaded shard each): wall time, microseconds a
   configuration (the cost should be linear) and peak RSS (the largest process, from the kernel's
   rusage). Targets: 10^6 in at most 120 s on 2 cores, peak RSS at most 2 GiB.

    python benchmarks/sweep_throughput.py [--jobs 20 70] [--skip-million]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from kl_sweep.threads import available_cores

ROOT = Path(__file__).resolve().parent.parent
# 50 separations x 5 weights x 20 starts x 2 divergences = 10,000 configurations.
GRID_10K = [
    "separation=range(0,8,0.16)",
    "weight=0.5,0.6,0.7,0.8,0.9",
    "init_mu=range(-4.75,5.25,0.5)",
    "divergence=forward,reverse",
]


# n x 10 x 50 x 2 configurations for n = 10, 100, 1000 separations.
def grid_mix(step: float) -> list[str]:
    return [
        f"separation=range(0,10,{step})",
        "weight=range(0.5,1,0.05)",
        "init_mu=range(-5,5,0.2)",
        "divergence=forward,reverse",
    ]


def run(args: list[str], sweep_dir: Path, ours: bool = True) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python -m kl_sweep -m ARGS``, in a fresh process."""
    cmd = [sys.executable, "-m", "kl_sweep", "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    if ours:
        cmd.append("hydra.sweeper.latest_link=null")
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    return wall, rss


def basic_subsample(n: int) -> list[str]:
    """The first n configurations of the 10k grid, as explicit lists for the basic sweeper."""
    seps = [f"{0.16 * i:.2f}" for i in range(max(1, n // 10))]
    return [f"separation={','.join(seps)}", "weight=0.5,0.9", "init_mu=-2,0,2,4,-4", "divergence=reverse"][:4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs=2, default=[20, 70], help="basic-sweeper subsample sizes")
    parser.add_argument("--skip-million", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall, _ = run(GRID_10K, tmp / "ours")
        rows = len(pd.read_parquet(tmp / "ours" / "results.parquet", columns=["config_hash"]))
        print(f"kl_sweep sweeper : {rows} configurations in {wall:.2f} s wall (target <= 10 s)")

        timings = []
        for n in args.jobs:
            overrides = basic_subsample(n)
            jobs = 1
            for o in overrides:
                jobs *= len(o.split("=", 1)[1].split(","))
            t, _ = run(["hydra/sweeper=basic", *overrides], tmp / f"basic{n}", ours=False)
            timings.append((jobs, t))
            print(f"basic sweeper    : {jobs} jobs in {t:.2f} s wall")
        (n1, t1), (n2, t2) = timings
        per_job = (t2 - t1) / (n2 - n1)
        basic_total = per_job * rows
        print(
            f"basic sweeper    : {per_job * 1e3:.0f} ms per job -> "
            f"{basic_total:.0f} s for {rows} (extrapolated)"
        )
        print(f"ratio            : {basic_total / wall:.0f}x (target >= 300x)")

        cores = available_cores()
        shards = ["hydra/launcher=joblib", f"hydra.sweeper.shards={cores}"]
        for step in (1, 0.1) if args.skip_million else (1, 0.1, 0.01):
            wall, rss = run([*grid_mix(step), *shards], tmp / f"mix{step}")
            rows = len(pd.read_parquet(tmp / f"mix{step}" / "results.parquet", columns=["config_hash"]))
            target = " (target <= 120 s, <= 2 GiB)" if rows == 10**6 else ""
            print(
                f"study mix        : {rows:>9,} configurations in {wall:6.1f} s wall on {cores} joblib "
                f"shard(s) = {wall / rows * 1e6:6.1f} us each, peak RSS {rss / 2**30:.2f} GiB{target}"
            )


if __name__ == "__main__":
    os.environ.pop("HYDRA_FULL_ERROR", None)
    main()
