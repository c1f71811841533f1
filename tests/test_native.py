"""The fused reverse-KL kernel (kl_sweep.core.native): against scipy, against the torch path, the
same bits wherever a row sits and however many threads run, and the fall-back when it cannot be built."""

import logging
import math
import os

import numpy as np
import pytest
import torch
from conftest import random_rows, torch_threads
from scipy import integrate

from kl_sweep.core import native
from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Objective, Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.native import toolchain
from kl_sweep.core.optim import Adam

REVERSE = DIVERGENCES["reverse"]


def mixture(means, variances, weights) -> Mixture:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return Mixture(t(means), t(variances), torch.log(t(weights)))


#: (means, variances, weights of P; mu, sigma of Q): equal and unequal variances (one and two switch
#: points), Q narrow and wide against the switch, Q far in a tail, P's modes far apart.
CASES = [
    ((-1.5, 1.5), (1.0, 1.0), (0.7, 0.3), 0.4, 1.3),
    ((-4.0, 4.0), (1.0, 1.0), (0.5, 0.5), -3.9, 0.9),
    ((-0.5, 0.5), (1.0, 1.0), (0.9, 0.1), 2.0, 3.0),
    ((0.0, 3.0), (0.5, 2.0), (0.4, 0.6), 1.0, 0.7),
    ((-2.0, 2.0), (0.25, 4.0), (0.5, 0.5), -2.0, 0.05),
    ((-10.0, 10.0), (1.0, 1.0), (0.6, 0.4), 0.0, 30.0),
    ((-3.0, 3.0), (1.0, 1.0), (0.5, 0.5), 9.0, 0.5),
]


def scipy_reverse(means, variances, weights, mu, sigma):
    """KL(Q||P) and its gradient in (mu, log sigma) by adaptive quadrature, split at Q's mean, P's
    means and the points where log p switches component: an independent method."""

    def log_p(x):
        terms = [
            math.log(w) - 0.5 * math.log(2 * math.pi * v) - (x - m) ** 2 / (2 * v)
            for m, v, w in zip(means, variances, weights)
        ]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))

    def log_q(x):
        return -0.5 * math.log(2 * math.pi) - math.log(sigma) - 0.5 * ((x - mu) / sigma) ** 2

    def integrand(x, k):
        z = (x - mu) / sigma
        f = math.exp(log_q(x)) * (log_q(x) - log_p(x))
        return f * (1.0, z / sigma, z * z - 1.0)[k]  # d q / d theta = q (z / sigma, z^2 - 1)

    lo, hi = mu - 14 * sigma, mu + 14 * sigma
    points = sorted({p for p in (mu, *means) if lo < p < hi})
    edges = [lo, *points, hi]
    out = []
    for k in range(3):
        total = 0.0
        for a, b in zip(edges[:-1], edges[1:]):
            total += integrate.quad(integrand, a, b, args=(k,), epsabs=1e-13, epsrel=1e-12, limit=400)[0]
        out.append(total)
    return out


@pytest.mark.parametrize("case", CASES)
def test_kernel_loss_and_gradient_match_scipy(case):
    means, variances, weights, mu, sigma = case
    assert native.available()
    theta = torch.tensor([[mu, math.log(sigma)]])
    obj = Objective.build(REVERSE, Quadrature(), mixture([means], [variances], [weights]), theta)
    assert obj._native()
    loss, grad, hess = obj.derivatives(theta, hessian=True)
    kl, g_mu, g_ls = scipy_reverse(means, variances, weights, mu, sigma)
    assert loss.item() == pytest.approx(kl, rel=1e-9, abs=1e-10)
    # The 6-node rule's own gradient error reaches 2e-9 for a Q 0.05 wide beside a narrow component
    # (the torch path's too; 12 nodes a panel agree with scipy to 1e-15).
    assert grad[0, 0].item() == pytest.approx(g_mu, rel=1e-8, abs=5e-9)
    assert grad[0, 1].item() == pytest.approx(g_ls, rel=1e-8, abs=5e-9)
    assert hess is not None and torch.isfinite(hess).all()


def test_kernel_matches_the_torch_path_and_autograd_hessians(monkeypatch):
    """Loss, gradient and Hessian against the torch path (whose closed forms equal autograd,
    tests/test_fit.py), on 600 random rows with one and two switch points."""
    gen = torch.Generator().manual_seed(3)
    n = 600
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    sep, v1 = u(0, 9), u(0.3, 2.0)
    v2 = torch.where(torch.arange(n) % 2 == 0, v1, u(0.3, 2.0))
    w = u(0.05, 0.95)
    means, variances = torch.stack([-sep / 2, sep / 2], -1), torch.stack([v1, v2], -1)
    mix = Mixture(means, variances, torch.stack([w.log(), (-w).log1p()], -1))
    theta = torch.stack([u(-6, 6), u(-3, 2)], -1)
    obj = Objective.build(REVERSE, Quadrature(), mix, theta)
    assert obj._native()
    fused = obj.derivatives(theta, hessian=True)
    monkeypatch.setenv("KL_SWEEP_NATIVE", "0")
    assert not obj._native()
    reference = obj.derivatives(theta, hessian=True)
    for x, y in zip(fused, reference):
        scale = y.abs().reshape(n, -1).max(-1).values.clamp_min(1.0)
        err = ((x - y).abs().reshape(n, -1).max(-1).values / scale).max().item()
        assert err < 1e-11, err  # sums of ~100 terms in another order


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_kernel_bits_alone_and_in_any_batch(threads):
    """Each row alone (one row: one thread), and in batches below and above the size from which the
    rows are shared among threads: bit for bit."""
    n = 700
    mix, theta = random_rows(n, seed=8)
    with torch_threads(threads):
        obj = Objective.build(REVERSE, Quadrature(), mix, theta)
        full = obj.derivatives(theta, hessian=True)
        sizes = [1, 7, native.MIN_PARALLEL_ROWS - 1, native.MIN_PARALLEL_ROWS, 333, 699]
        for b in sizes:
            keep = torch.arange(n) >= n - b
            part = obj.subset(keep).derivatives(theta[keep], hessian=True)
            for x, y in zip(full, part):
                assert torch.equal(x[keep], y), b
        alone = [obj.subset(torch.tensor([i])).derivatives(theta[i : i + 1], True) for i in range(0, n, 37)]
        for k, i in enumerate(range(0, n, 37)):
            for x, y in zip(full, alone[k]):
                assert torch.equal(x[i : i + 1], y), i


def test_without_a_compiler_fits_take_the_torch_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KL_SWEEP_CACHE", str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kl_sweep.core.native"):
            assert not native.available()
        assert "native kernel unavailable (no C compiler" in caplog.text
        prob = Problem(
            Mixture.two_component(*(torch.tensor([v]) for v in (6.0, 0.7, 0.0, 1.0))),
            torch.tensor([2.0]),
            torch.tensor([1.0]),
            torch.tensor([0.05]),
            torch.tensor([5000]),
            torch.tensor([1e-8]),
        )
        settings = Settings(REVERSE, Quadrature(), Adam())
        res = fit(prob, settings)
        assert res.status.item() == Status.CONVERGED
        assert res.mu.item() == pytest.approx(3.0, abs=0.1)  # on the right-hand mode
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    finally:
        native._library.cache_clear()  # the next caller, with CC restored, loads the library


def test_the_library_is_built_once_and_renamed_into_place(monkeypatch, tmp_path):
    monkeypatch.setenv("KL_SWEEP_CACHE", str(tmp_path))
    path, reason = toolchain.build("kl")
    assert reason == "" and path is not None and path.parent == tmp_path
    stamp = path.stat().st_mtime_ns
    again, _ = toolchain.build("kl")
    assert again == path and path.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind
    monkeypatch.setattr(toolchain, "BASE_FLAGS", (*toolchain.BASE_FLAGS, "-DKL_SWEEP_OTHER"))
    other, _ = toolchain.build("kl")
    assert other != path  # other flags: another library


def test_a_fit_with_the_kernel_finds_the_same_minima_as_the_torch_path(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    n = 300
    sep, w = torch.rand(n, generator=gen) * 8, 0.5 + 0.4 * torch.rand(n, generator=gen)
    ones = torch.ones(n)
    prob = Problem(
        Mixture.two_component(sep, w, 0 * ones, ones),
        torch.rand(n, generator=gen) * 8 - 4,
        ones,
        0.05 * ones,
        torch.full((n,), 5000),
        1e-8 * ones,
    )
    settings = Settings(REVERSE, Quadrature(), Adam())
    fused = fit(prob, settings)
    monkeypatch.setenv("KL_SWEEP_NATIVE", "0")
    reference = fit(prob, settings)
    assert (fused.status == Status.CONVERGED).all() and (reference.status == Status.CONVERGED).all()
    np.testing.assert_allclose(fused.mu.numpy(), reference.mu.numpy(), atol=1e-9)
    np.testing.assert_allclose(fused.sigma2.numpy(), reference.sigma2.numpy(), rtol=1e-9)


def test_kl_pair_kernel_matches_the_torch_path_and_scipy(monkeypatch):
    """Both KLs of result rows (kl_pair_exact's shared-node rows): the kernel against the torch path
    on 3000 random rows, and against scipy on the cases above (tests/test_divergences.py checks
    kl_pair_exact against scipy too)."""
    from kl_sweep.core.divergences import kl_pair_exact

    gen = torch.Generator().manual_seed(6)
    n = 3000
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)  # noqa: E731
    v1 = u(0.2, 3.0)
    v2 = torch.where(torch.arange(n) % 3 == 0, u(0.2, 3.0), v1)
    w, sep = u(0.05, 0.95), u(0, 10)
    mix = Mixture(
        torch.stack([-sep / 2, sep / 2], -1),
        torch.stack([v1, v2], -1),
        torch.stack([w.log(), (-w).log1p()], -1),
    )
    mu, log_sigma = u(-8, 8), u(-3, 2.5)
    fused = kl_pair_exact(mix, mu, log_sigma)
    monkeypatch.setenv("KL_SWEEP_NATIVE", "0")
    reference = kl_pair_exact(mix, mu, log_sigma)
    for x, y in zip(fused, reference):
        assert ((x - y).abs() / y.abs()).max().item() < 1e-13
    monkeypatch.setenv("KL_SWEEP_NATIVE", "1")
    for means, variances, weights, mu0, sigma in CASES:
        m = mixture([means], [variances], [weights])
        forward, reverse = kl_pair_exact(m, torch.tensor([mu0]), torch.tensor([math.log(sigma)]))
        assert reverse.item() == pytest.approx(
            scipy_reverse(means, variances, weights, mu0, sigma)[0], rel=1e-10
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_kl_pair_gives_a_row_the_same_bits_in_any_batch(threads):
    from kl_sweep.core.divergences import kl_pair_exact

    n = 400
    mix, theta = random_rows(n, seed=9)
    mu, log_sigma = theta[:, 0], theta[:, 1]
    with torch_threads(threads):
        full = kl_pair_exact(mix, mu, log_sigma)
        for b in (1, 13, native.MIN_PARALLEL_ROWS // 4, 257, 399):
            keep = torch.arange(n) >= n - b
            part = kl_pair_exact(mix[keep], mu[keep], log_sigma[keep])
            for x, y in zip(full, part):
                assert torch.equal(x[keep], y), b


def test_a_damaged_cached_library_is_moved_aside_and_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("KL_SWEEP_CACHE", str(tmp_path))
    path, _ = toolchain.build("kl")
    path.write_bytes(b"not a shared library")
    lib, reason = toolchain.load("kl")
    assert lib is not None and reason == ""
    assert path.stat().st_size > 1000  # rebuilt
    (aside,) = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert aside.read_bytes() == b"not a shared library"  # kept, not deleted


def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KL_SWEEP_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(toolchain.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path, reason = toolchain.build("kl")
    assert reason == "" and path.parent == tmp_path / "tmp" / f"kl_sweep-{os.getuid()}"
