"""The fused reverse-KL kernel (kl_sweep.core.native): against scipy, against the torch path, the
same bits wherever a row sits and however many threads run, and the fall-back when it cannot be built."""

import logging
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import random_rows, torch_threads
from scipy import integrate

from kl_sweep.core import native
from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Grid, Quadrature
from kl_sweep.core.fit import Objective, Problem, Settings, Status, fit, fused
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.native import toolchain
from kl_sweep.core.optim import SGD, Adam

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


@pytest.mark.parametrize("case", CASES)
def test_forward_moments_match_scipy_and_the_closed_forms(case):
    """The forward KL's moment form (c, m0, m1, m2 about P's mean): m0 = 1, m1 = 0 and m2 = Var P
    in closed form, c = the integral of p log p by scipy."""
    means, variances, weights, _, _ = case
    obj = Objective.build(
        DIVERGENCES["forward"], Quadrature(), mixture([means], [variances], [weights]), torch.zeros(1, 2)
    )
    c, m0, m1, m2, ref = (x.item() for x in obj.moments)
    var = (
        sum(w * (v + m * m) for m, v, w in zip(means, variances, weights))
        - sum(w * m for m, w in zip(means, weights)) ** 2
    )
    assert ref == pytest.approx(sum(w * m for m, w in zip(means, weights)), abs=1e-15)
    assert m0 == pytest.approx(1.0, abs=1e-13) and m1 == pytest.approx(0.0, abs=1e-12)
    assert m2 == pytest.approx(var, rel=1e-12)

    def p(x):
        return sum(
            w * math.exp(-((x - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)
            for m, v, w in zip(means, variances, weights)
        )

    edges = sorted({*(m + k * math.sqrt(v) for m, v in zip(means, variances) for k in (-14, -3, 0, 3, 14))})
    entropy = sum(
        integrate.quad(
            lambda x: p(x) * math.log(p(x)) if p(x) > 0 else 0.0, a, b, epsabs=1e-14, epsrel=1e-12, limit=400
        )[0]
        for a, b in zip(edges[:-1], edges[1:])
    )
    assert c == pytest.approx(entropy, rel=1e-10, abs=1e-12)


def test_forward_moments_match_the_torch_path(monkeypatch):
    mix, theta = random_rows(600, seed=12)
    unequal = Mixture(mix.means, mix.variances * torch.tensor([1.0, 2.5]), mix.log_weights)
    for m in (mix, unequal):
        got = Objective.build(DIVERGENCES["forward"], Quadrature(), m, theta)
        monkeypatch.setenv("KL_SWEEP_NATIVE", "0")
        want = Objective.build(DIVERGENCES["forward"], Quadrature(), m, theta)
        monkeypatch.delenv("KL_SWEEP_NATIVE")
        for x, y in zip(got.moments, want.moments):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-13, atol=1e-14)
        assert torch.equal(got.trusted, want.trusted)


def fit_rows(n: int, seed: int, max_steps: int = 5000) -> Problem:
    """Study-like rows (random_rows) with starts of every width, plus rows that end at once: one
    diverged at its start (sigma^2 = 1e-100, past the bounds of fit.MAX_ABS_LOG_SIGMA) and one with
    no budget (max_steps 0)."""
    mix, theta = random_rows(n, seed)
    sigma2 = torch.exp(4 * theta[:, 1])  # 0.14 to 7.4
    sigma2[0] = 1e-100
    steps = torch.full((n,), max_steps)
    steps[1] = 0
    ones = torch.ones(n)
    return Problem(mix, theta[:, 0], sigma2, 0.05 * ones, steps, 1e-8 * ones)


@pytest.mark.parametrize("name", ["reverse", "forward"])
@pytest.mark.parametrize("polish", [True, False])
def test_fused_fits_take_the_stepwise_paths_steps(name, polish):
    """Whole fits in the kernel against the stepwise state machine on the same derivatives (the
    kernel's for the reverse KL, the moment form's for the forward KL; Settings.fused=False): the
    same outcome for every row, the same point to rounding.
    Only Adam's and Newton's own arithmetic differs (other exp, fused multiply-adds), so a converged
    row can take a few steps more or fewer; a row out of budget stops at the same step."""
    n = 400
    for max_steps in (5000, 40):
        prob = fit_rows(n, seed=21, max_steps=max_steps)
        settings = Settings(DIVERGENCES[name], Quadrature(), Adam(), polish=polish)
        assert fused(settings) and not fused(replace(settings, fused=False))
        whole = fit(prob, settings)
        stepwise = fit(prob, replace(settings, fused=False))
        assert torch.equal(whole.status, stepwise.status)
        codes = whole.status.bincount(minlength=4).tolist()
        assert whole.status[0] == Status.DIVERGED and whole.status[1] == Status.MAX_STEPS
        assert whole.steps[0] == whole.steps[1] == 0 and whole.mu[0] == prob.init_mu[0]
        assert math.isnan(whole.loss[0]) and whole.loss[1].item() == pytest.approx(
            stepwise.loss[1].item(), rel=1e-13
        )
        if max_steps == 40:
            assert codes[Status.MAX_STEPS] > n // 2, codes
            out = whole.status == Status.MAX_STEPS
            assert torch.equal(whole.steps[out], stepwise.steps[out])
        else:
            assert codes[Status.CONVERGED] >= n - 5, codes  # a start on a saddle can use up its budget
            assert (whole.steps - stepwise.steps).abs().max() <= 20
        for field in ("mu", "sigma2", "loss", "grad_norm"):
            x, y = getattr(whole, field)[2:], getattr(stepwise, field)[2:]
            np.testing.assert_allclose(
                x.numpy(), y.numpy(), rtol=1e-9, atol=1e-9 if field != "grad_norm" else 1e-8
            )
        converged = whole.status == Status.CONVERGED
        assert (whole.grad_norm[converged] <= 1e-8).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_fused_fit_alone_and_in_any_batch(threads):
    """A row's whole fit, bit for bit: alone, in batches below and above the size from which rows
    are shared among threads, and on 1 or 2 threads."""
    n = 120
    prob = fit_rows(n, seed=5)
    settings = Settings(REVERSE, Quadrature(), Adam())
    with torch_threads(2):
        full = fit(prob, settings)
    with torch_threads(threads):
        for b in [1, native.MIN_PARALLEL_FITS - 1, native.MIN_PARALLEL_FITS, 57, n - 1]:
            keep = torch.arange(n) >= n - b
            part = fit(subset(prob, keep), settings)
            for field in ("mu", "sigma2", "loss", "grad_norm", "steps", "status"):
                x, y = getattr(full, field)[keep], getattr(part, field)
                assert torch.equal(x, y) or torch.equal(x.isnan(), y.isnan()) and x.isnan().all(), (b, field)


def test_fits_are_fused_only_where_the_kernel_applies():
    settings = Settings(REVERSE, Quadrature(), Adam())
    assert fused(settings)
    assert not fused(replace(settings, optimizer=SGD()))
    assert not fused(replace(settings, estimator=Grid()))
    forward = replace(settings, divergence=DIVERGENCES["forward"])
    assert fused(forward) and fused(replace(forward, estimator=Grid()))
    assert not fused(replace(forward, optimizer=SGD()))
    for name in ("hellinger", "alpha", "chi2", "renyi", "jensen_shannon"):  # the pointwise kernel
        assert fused(replace(settings, divergence=DIVERGENCES[name]))
        assert not fused(replace(settings, divergence=DIVERGENCES[name], estimator=Grid()))
    # A three-component P: the kernel does two; the problem takes the stepwise path, and the fit
    # still lands on the heaviest mode.
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    mix = Mixture(t([[-6.0, 0.0, 6.0]]), t([[1.0, 1.0, 1.0]]), torch.log(t([[0.2, 0.2, 0.6]])))
    prob = Problem(mix, t([5.0]), t([1.0]), t([0.05]), torch.tensor([5000]), t([1e-8]))
    res = fit(prob, settings)
    assert res.status.item() == Status.CONVERGED
    assert res.mu.item() == pytest.approx(6.0, abs=0.05)


def test_fused_forward_fits_mark_rows_whose_grid_cannot_see_p():
    """A grid of 3 points under P: its moments are meaningless (weights far from summing to 1), so
    the row ends as diverged at its start, with the loss there; as on the stepwise path."""
    prob = fit_rows(6, seed=2)
    settings = Settings(DIVERGENCES["forward"], Grid(3), Adam())
    whole, stepwise = fit(prob, settings), fit(prob, replace(settings, fused=False))
    assert (whole.status == Status.DIVERGED).all() and (whole.steps == 0).all()
    assert torch.equal(whole.mu, prob.init_mu) and torch.isfinite(whole.loss[1:]).all()
    assert torch.equal(whole.status, stepwise.status)
    np.testing.assert_allclose(whole.loss[1:].numpy(), stepwise.loss[1:].numpy(), rtol=1e-13)
    good = fit(prob, replace(settings, estimator=Grid(4001)))
    assert (good.status[2:] == Status.CONVERGED).all()


def subset(prob: Problem, keep: torch.Tensor) -> Problem:
    return Problem(
        prob.mixture[keep],
        prob.init_mu[keep],
        prob.init_sigma2[keep],
        prob.lr[keep],
        prob.max_steps[keep],
        prob.tol[keep],
    )


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
