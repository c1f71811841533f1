"""Stochastic VI rows a second (issue 25): kl-sweep's batched runs against Pyro's SVI one row at a time.

A row is a (configuration, seed) pair: reverse KL, ``estimator=mc estimator.resample=true``,
``num_samples`` = 16, Adam at lr 0.05, ``--steps`` updates (2,000 in the issue's target), the
separation 0-8 in ``--rows / 100`` configurations of 100 seeds each. Both sides run in this process:

- kl-sweep: :func:`kl_sweep.table.run_rows` on each batch size of ``--batches`` (the exact minima,
  the placement and the result table included), rows a second and the time 10^5 rows would take;
- Pyro: :func:`tests/pyro_peer.pyro_runs` with one replica, ``--pyro-rows`` rows one at a time
  (as a practitioner runs them), seconds a row and the extrapolated time for 10^5 rows;
- the ratio of the two rates. The issue's target: 10^5 rows in at most 2 minutes;
- the same rows on the torch path (``KL_SWEEP_NATIVE=0``: autograd through the registry's Monte
  Carlo estimate, all rows a step at a time), ``--torch-rows`` of them, and the kernel's speed-up.

    python benchmarks/stochastic_throughput.py [--steps 2000] [--batches 1000 10000 100000] [--pyro-rows 3]
        [--torch-rows 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kl_sweep.table import run_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pyro_peer import pyro_runs  # noqa: E402
from test_stochastic import rows, shared  # noqa: E402

TARGET_ROWS, TARGET_SECONDS = 100_000, 120.0


def make_rows(n: int, steps: int) -> pd.DataFrame:
    configs = max(1, n // 100)
    separation = np.repeat(np.linspace(0.0, 8.0, configs), 100)[:n]
    seed = np.tile(np.arange(100), configs)[:n]
    return rows(1, separation=separation, seed=seed, **{"optimizer.max_steps": steps})  # start 0.5, lr 0.05


SHARED = shared(**{"estimator.num_samples": 16})  # reverse KL, reparam, Adam, constant lr, last half averaged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--pyro-rows", type=int, default=3)
    parser.add_argument("--torch-rows", type=int, default=10_000, help="0: skip the torch path")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps, 16 samples")

    pyro_seconds = []
    for i in range(args.pyro_rows):  # one row at a time, as a practitioner runs them
        tic = time.perf_counter()
        pyro_runs(
            separation=8.0 * i / max(args.pyro_rows - 1, 1),
            weight=0.6,
            init_mu=0.5,
            replicas=1,
            steps=args.steps,
            num_samples=16,
            rng_seed=i,
        )
        pyro_seconds.append(time.perf_counter() - tic)
    pyro_rate = 1.0 / float(np.median(pyro_seconds))
    print(
        f"Pyro SVI, one row at a time: {np.median(pyro_seconds):.2f} s a row (median of {args.pyro_rows}); "
        f"10^5 rows would take {TARGET_ROWS / pyro_rate / 3600:.1f} h"
    )

    rates = {}
    for n in args.batches:
        table = make_rows(n, args.steps)
        tic = time.perf_counter()
        out = run_rows(table, SHARED)
        seconds = time.perf_counter() - tic
        rate = rates[n] = n / seconds
        assert len(out) == n
        print(
            f"kl-sweep, {n:>7,} rows in one batch: {seconds:7.1f} s, {rate:8,.0f} rows/s; 10^5 rows: "
            f"{TARGET_ROWS / rate:6.0f} s (target {TARGET_SECONDS:.0f} s: "
            f"{'met' if TARGET_ROWS / rate <= TARGET_SECONDS else 'NOT met'}); "
            f"x{rate / pyro_rate:,.0f} Pyro's rate; "
            f"converged {(out.status == 'converged').mean():.3f}"
        )
    if args.torch_rows:
        n = args.torch_rows
        table = make_rows(n, args.steps)
        os.environ["KL_SWEEP_NATIVE"] = "0"
        tic = time.perf_counter()
        run_rows(table, SHARED)
        seconds = time.perf_counter() - tic
        del os.environ["KL_SWEEP_NATIVE"]
        kernel = rates.get(n)
        versus = f"; the kernel at the same size is x{kernel * seconds / n:.2f} faster" if kernel else ""
        print(f"torch path, {n:>7,} rows in one batch: {seconds:7.1f} s, {n / seconds:8,.0f} rows/s{versus}")


if __name__ == "__main__":
    main()
