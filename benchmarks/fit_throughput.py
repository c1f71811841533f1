"""Fits per second of the batched core against a per-configuration loop over the same fit.

Reverse KL, Adam, quadrature estimator, B = 10,000 configurations (separation 0-8, weight
0.5-0.9, init_mu -4..4). The loop fits a random subsample one configuration at a time through the
same code (B = 1) and is extrapolated to B; both run in this process. Target: ratio >= 100.

    python benchmarks/fit_throughput.py [--batch 10000] [--loop-sample 40]
"""

from __future__ import annotations

import argparse
import time

import torch

from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam


def make_problem(n: int, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    sep = torch.rand(n, generator=gen, dtype=torch.float64) * 8
    weight = 0.5 + 0.4 * torch.rand(n, generator=gen, dtype=torch.float64)
    init_mu = torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 4
    ones = torch.ones(n, dtype=torch.float64)
    return Problem(
        Mixture.two_component(sep, weight, 0 * ones, ones),
        init_mu,
        ones,
        0.05 * ones,
        torch.full((n,), 5000, dtype=torch.long),
        1e-8 * ones,
    )


def subset(p: Problem, idx: torch.Tensor) -> Problem:
    return Problem(
        p.mixture[idx], p.init_mu[idx], p.init_sigma2[idx], p.lr[idx], p.max_steps[idx], p.tol[idx]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--loop-sample", type=int, default=40)
    args = parser.parse_args()
    settings = Settings(DIVERGENCES["reverse"], Quadrature(), Adam())
    problem = make_problem(args.batch)
    fit(subset(problem, torch.arange(16)), settings)  # warm-up

    tic = time.perf_counter()
    batched = fit(problem, settings)
    t_batch = time.perf_counter() - tic

    sample = torch.randperm(args.batch, generator=torch.Generator().manual_seed(1))[: args.loop_sample]
    tic = time.perf_counter()
    for i in sample:  # the baseline: one configuration at a time
        fit(subset(problem, i.view(1)), settings)
    t_loop = (time.perf_counter() - tic) / len(sample) * args.batch

    converged = (batched.status == Status.CONVERGED).float().mean().item()
    print(
        f"batched : {args.batch} fits in {t_batch:.2f} s = {args.batch / t_batch:,.0f} fits/s "
        f"({converged:.1%} converged)"
    )
    print(
        f"loop    : {len(sample)} fits timed, {t_loop:.1f} s extrapolated to {args.batch} "
        f"= {args.batch / t_loop:,.0f} fits/s"
    )
    print(f"ratio   : {t_loop / t_batch:.0f}x (target >= 100x)")


if __name__ == "__main__":
    main()
