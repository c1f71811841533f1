import contextlib
import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy import integrate

from kl_sweep.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent

#: Every divergence, with orders for those that take one: a < 0, inside (0, 1) and a > 1.
MEMBERS = [
    ("forward", None),
    ("reverse", None),
    ("hellinger", None),
    ("jensen_shannon", None),
    ("chi2", None),
    ("alpha", -0.5),
    ("alpha", 0.3),
    ("alpha", 1.5),
    ("renyi", 0.5),
    ("renyi", 2.0),
]

torch.set_default_dtype(torch.float64)
keep_freed_memory()  # as the entry points do: fits reuse their temporaries (kl_sweep.allocator)


@functools.cache
def scipy_kl(divergence: str, separation, weight, component_var, mu, sigma2, center=0.0) -> float:
    """KL by adaptive scipy quadrature, split at the means and the crossing: an independent method."""
    m1, m2 = center - separation / 2, center + separation / 2
    lw1, lw2 = math.log(weight), math.log1p(-weight)
    c = -0.5 * math.log(2 * math.pi * component_var)
    cq = -0.5 * math.log(2 * math.pi * sigma2)

    def log_p(x):
        a = lw1 + c - (x - m1) ** 2 / (2 * component_var)
        b = lw2 + c - (x - m2) ** 2 / (2 * component_var)
        top = max(a, b)
        return top + math.log(math.exp(a - top) + math.exp(b - top))

    def log_q(x):
        return cq - (x - mu) ** 2 / (2 * sigma2)

    sd = math.sqrt(component_var)
    if divergence == "forward":

        def f(x):
            lp = log_p(x)
            return math.exp(lp) * (lp - log_q(x))

        lo, hi = m1 - 14 * sd, m2 + 14 * sd
    else:

        def f(x):
            lq = log_q(x)
            return math.exp(lq) * (lq - log_p(x))

        lo, hi = mu - 14 * math.sqrt(sigma2), mu + 14 * math.sqrt(sigma2)
    cross = center + (math.log(weight / (1 - weight)) * component_var / separation if separation > 0 else 0.0)
    points = [lo, hi, mu, mu - math.sqrt(sigma2), mu + math.sqrt(sigma2), cross, m1, m2]
    edges = sorted({p for p in points if lo <= p <= hi})
    return sum(
        integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-13, limit=500)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m kl_sweep ARGS`` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "kl_sweep", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch on ``n`` threads, then restore the count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def random_rows(n: int, seed: int):
    """(two-component mixtures, theta = (mu, log sigma) [n, 2]) of the study's kind: separation
    0-8, weight 0.5-0.95, unit components, mu in [-4, 4], log sigma in [-0.5, 0.5]."""
    from kl_sweep.core.mixture import Mixture

    gen = torch.Generator().manual_seed(seed)
    mix = Mixture.two_component(
        torch.rand(n, generator=gen) * 8,
        0.5 + 0.45 * torch.rand(n, generator=gen),
        torch.zeros(n),
        torch.ones(n),
    )
    theta = torch.stack([torch.rand(n, generator=gen) * 8 - 4, torch.rand(n, generator=gen) - 0.5], -1)
    return mix, theta
