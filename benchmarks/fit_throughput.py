"""Fits per second of the batched core, against a fixed autograd baseline and a per-configuration loop.

Reverse KL, Adam, quadrature estimator, B = 10,000 configurations (separation 0-8, weight
0.5-0.9, init_mu -4..4), all in this process:

- core: the batched ``kl_sweep.core.fit`` on all B rows (whole fits in the native kernel,
  ``kl_sweep.core.fit.fused``). The 4x target: >= 10,000 fits/s on this project's 2-core machine.
- stepwise: the same with ``Settings.fused=False``: the torch state machine, one batched step at a
  time (the kernel's derivatives): what the kernel's fused fit adds.
- baseline: ``baseline_autograd.py``, the same fit written once in plain batched autograd; it
  imports nothing from ``kl_sweep``, so it does not get faster when the core does. It runs on the
  same B rows (``--baseline-batch`` times it on the first rows only, extrapolated per fit: a
  smaller batch spreads its per-step overhead over fewer rows and understates its throughput).
  Its fits are checked against the core's (the same minima to 1e-6: reported, not asserted).
- loop: the core on a random subsample, one configuration at a time (B = 1), extrapolated to B;
  both the fused fit (then a call costs mostly its Python overhead) and the stepwise path (the
  torch loop the >= 100x target was set against).

    python benchmarks/fit_throughput.py [--batch 10000] [--baseline-batch 10000] [--loop-sample 40]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from baseline_autograd import fit_reverse

from kl_sweep.allocator import keep_freed_memory
from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam

#: Both fits converged to points this close (in mu and in sigma^2): the same minimum.
AGREE = 1e-6
#: Farther apart than this: different minima (in between: the same minimum, polished differently).
APART = 1e-3


def make_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(separation, weight, init_mu), each [n]."""
    gen = torch.Generator().manual_seed(seed)
    sep = torch.rand(n, generator=gen, dtype=torch.float64) * 8
    weight = 0.5 + 0.4 * torch.rand(n, generator=gen, dtype=torch.float64)
    init_mu = torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 4
    return sep, weight, init_mu


def make_problem(sep: torch.Tensor, weight: torch.Tensor, init_mu: torch.Tensor) -> Problem:
    ones = torch.ones_like(sep)
    return Problem(
        Mixture.two_component(sep, weight, 0 * ones, ones),
        init_mu,
        ones,
        0.05 * ones,
        torch.full(sep.shape, 5000, dtype=torch.long),
        1e-8 * ones,
    )


def subset(p: Problem, idx: torch.Tensor) -> Problem:
    return Problem(
        p.mixture[idx], p.init_mu[idx], p.init_sigma2[idx], p.lr[idx], p.max_steps[idx], p.tol[idx]
    )


def main() -> None:
    keep_freed_memory()  # as the app does: freed temporaries stay in the process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--baseline-batch", type=int, default=10_000)
    parser.add_argument("--loop-sample", type=int, default=40)
    args = parser.parse_args()
    B, nb = args.batch, min(args.baseline_batch, args.batch)
    settings = Settings(DIVERGENCES["reverse"], Quadrature(), Adam())
    inputs = make_inputs(B)
    problem = make_problem(*inputs)
    fit(subset(problem, torch.arange(16)), settings)  # warm-up
    fit_reverse(*(x[:16] for x in inputs))
    print(f"threads : {torch.get_num_threads()} torch threads")

    tic = time.perf_counter()
    batched = fit(problem, settings)
    t_batch = time.perf_counter() - tic

    stepwise = replace(settings, fused=False)
    tic = time.perf_counter()
    fit(problem, stepwise)
    t_stepwise = time.perf_counter() - tic

    tic = time.perf_counter()
    mu_b, sigma2_b, _, conv_b = fit_reverse(*(x[:nb] for x in inputs))
    t_base_run = time.perf_counter() - tic
    t_base = t_base_run / nb * B

    sample = torch.randperm(B, generator=torch.Generator().manual_seed(1))[: args.loop_sample]
    t_loop = {}
    for name, how in (("fused", settings), ("stepwise", stepwise)):
        tic = time.perf_counter()
        for i in sample:  # one configuration at a time
            fit(subset(problem, i.view(1)), how)
        t_loop[name] = (time.perf_counter() - tic) / len(sample) * B

    conv_core = batched.status == Status.CONVERGED
    both = conv_core[:nb] & conv_b
    zero = torch.zeros_like(conv_b, dtype=torch.float64)
    d_mu = (batched.mu[:nb] - mu_b).abs()
    d_sigma2 = (batched.sigma2[:nb] - sigma2_b).abs()
    agree = both & (d_mu <= AGREE) & (d_sigma2 <= AGREE)
    apart = both & ((d_mu > APART) | (d_sigma2 > APART))
    print(
        f"core    : {B} fits in {t_batch:.2f} s = {B / t_batch:,.0f} fits/s "
        f"({conv_core.float().mean().item():.1%} converged; target >= 10,000 fits/s on 2 cores)"
    )
    print(
        f"baseline: {nb} fits in {t_base_run:.2f} s, {t_base:.1f} s extrapolated to {B} "
        f"= {B / t_base:,.0f} fits/s ({conv_b.float().mean().item():.1%} converged)"
    )
    print(f"ratio   : core/baseline {t_base / t_batch:.2f}x")
    print(
        f"stepwise: {B} fits in {t_stepwise:.2f} s = {B / t_stepwise:,.0f} fits/s (fused=False); "
        f"core/stepwise {t_stepwise / t_batch:.2f}x"
    )
    print(
        f"agree   : {int(agree.sum())}/{nb} rows ({agree.float().mean().item():.2%}) both converged "
        f"within {AGREE:g} in mu and sigma^2; {int(apart.sum())} in different minima (> {APART:g} "
        f"apart), {int((~both).sum())} not both converged; max |d mu| "
        f"{torch.where(both, d_mu, zero).max().item():.1e}, max |d sigma^2| "
        f"{torch.where(both, d_sigma2, zero).max().item():.1e}"
    )
    for name, t in t_loop.items():
        print(
            f"loop    : {name}, {len(sample)} fits timed, {t:.1f} s extrapolated to {B} "
            f"= {B / t:,.0f} fits/s; "
            f"batched/loop {t / t_batch:.0f}x" + (" (target >= 100x)" if name == "stepwise" else "")
        )


if __name__ == "__main__":
    main()
