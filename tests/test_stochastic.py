"""Stochastic VI (issue 25): fresh draws every step, schedules, averaging, and the exact minima.

Independent references: Random123's published Philox4x32-10 answers, scipy's quadrature and
minimiser for the exact minima, closed forms for a Gaussian target, the KS test for the draws.
The Pyro peer lives in ``test_pyro_peer.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, optimize, stats

from kl_sweep.core import native
from kl_sweep.core.counter import counter_normals, counter_uniforms, philox4x32
from kl_sweep.core.divergences import DIVERGENCES, divergence_value
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.stochastic import FreshDraws, Practice
from kl_sweep.rows import config_hash_values
from kl_sweep.table import run_rows

#: Philox4x32-10 known answers, from Random123's kat_vectors (Salmon et al., SC 2011): counter,
#: key, and the four output words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def shared(**over):
    base = {
        "divergence.name": "reverse",
        "estimator.name": "mc",
        "estimator.num_samples": 8,
        "estimator.seed": 0,
        "estimator.resample": True,
        "estimator.gradient": "reparam",
        "optimizer.name": "adam",
        "optimizer.beta1": 0.9,
        "optimizer.beta2": 0.999,
        "optimizer.eps": 1e-8,
        "optimizer.schedule": "constant",
        "optimizer.decay": 0.6,
        "optimizer.decay_steps": 100.0,
        "optimizer.average": 0.5,
        "polish": True,
    }
    return {**base, **over}


def rows(n_seeds=1, **over):
    base = {
        "separation": 5.5,
        "weight": 0.6,
        "center": 0.0,
        "component_var": 1.0,
        "init_mu": 0.5,
        "init_sigma2": 1.0,
        "optimizer.lr": 0.05,
        "optimizer.max_steps": 400,
        "optimizer.tol": 1e-8,
        "seed": np.arange(n_seeds),
    }
    return pd.DataFrame({**base, **over})


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32(
        *(tuple(torch.tensor([v], dtype=torch.int64) for v in part) for part in (counter, key))
    )
    assert tuple(int(w) for w in words) == expected


def test_draws_depend_on_the_row_only_and_are_standard():
    gen = np.random.default_rng(1)
    key = torch.from_numpy(gen.integers(-(2**63), 2**63 - 1, 1000, dtype=np.int64))
    seed = torch.from_numpy(gen.integers(0, 2**40, 1000, dtype=np.int64))
    batch = counter_normals(key, seed, 7, 0, 16)
    perm = torch.from_numpy(gen.permutation(1000))
    assert torch.equal(counter_normals(key[perm], seed[perm], 7, 0, 16), batch[perm])
    assert torch.equal(counter_normals(key[3:4], seed[3:4], 7, 0, 16), batch[3:4])
    assert torch.equal(counter_normals(key, seed, 7, 0, 15), batch[:, :15])  # draw j never moves
    z = batch.flatten().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    u = counter_uniforms(key, seed, 7, 2, 16).flatten().numpy()
    assert 0.0 < u.min() and u.max() < 1.0 and stats.kstest(u, "uniform").pvalue > 1e-3
    # Other steps, streams, seeds and keys give unrelated draws.
    n = z.size
    for other in (
        counter_normals(key, seed, 8, 0, 16),
        counter_normals(key, seed, 7, 1, 16),
        counter_normals(key, seed + 1, 7, 0, 16),
        counter_normals(key ^ 1, seed, 7, 0, 16),
    ):
        assert abs(np.corrcoef(z, other.flatten().numpy())[0, 1]) < 5 / math.sqrt(n)


def test_seed_leaves_old_hashes_and_names_each_replica():
    frame = rows(3).drop(columns="seed")
    settings = shared()
    without = config_hash_values(frame.iloc[:1], settings)
    with_seeds = config_hash_values(rows(3), settings)
    assert with_seeds[0] == without[0]  # seed 0: the hash from before seeds existed
    assert len(set(with_seeds.tolist())) == 3


def test_schedule_and_window():
    lr = torch.tensor([0.1, 0.01], dtype=torch.float64)
    rm = Practice("robbins_monro", decay=0.75, decay_steps=50.0)
    for t in (0, 1, 49, 1999):
        assert torch.allclose(rm.rate(lr, t), lr * (1 + t / 50.0) ** -0.75, rtol=1e-15)
        assert torch.equal(Practice().rate(lr, t), lr)
    budget = torch.tensor([1, 3, 2000, 2001])
    assert Practice(average=0.5).window(budget).tolist() == [1, 2, 1000, 1001]
    assert Practice(average=1.0).window(budget).tolist() == [1, 3, 2000, 2001]


def _reverse_kl(mu, log_sigma, sep, w):
    """KL(Q||P) by scipy's adaptive quadrature: an independent reference."""
    s = math.exp(log_sigma)
    p = lambda x: w * stats.norm.pdf(x, -sep / 2, 1) + (1 - w) * stats.norm.pdf(x, sep / 2, 1)  # noqa: E731
    f = lambda x: stats.norm.pdf(x, mu, s) * (stats.norm.logpdf(x, mu, s) - np.log(p(x)))  # noqa: E731
    return integrate.quad(f, mu - 12 * s, mu + 12 * s, points=[-sep / 2, sep / 2], limit=200)[0]


def test_minima_are_scipys_and_rows_are_placed_nearest():
    out = run_rows(rows(40, **{"optimizer.max_steps": 300}), shared())
    assert (out.status == "converged").all() and (out.steps == 300).all()
    n = int(out.n_minima.iloc[0])
    starts = [(-2.75, 0.0), (2.75, 0.0), (-0.25, 0.5 * math.log(1 + 5.5**2 * 0.24))]
    found = []
    for x0 in starts:
        res = optimize.minimize(
            lambda v: _reverse_kl(v[0], v[1], 5.5, 0.6),
            x0,
            method="Nelder-Mead",
            options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 4000},
        )
        if not any(abs(res.x[0] - f[0]) < 1e-3 for f in found):
            found.append(tuple(res.x))
    found.sort()
    assert n == len(found) == 3
    for b, (m, ls) in enumerate(found):
        placed = out[out.basin == b]
        if len(placed):
            assert np.allclose(placed.basin_mu, m, atol=1e-5)
            assert np.allclose(0.5 * np.log(placed.basin_sigma2), ls, atol=1e-5)
    # Each averaged iterate's basin is its nearest minimum in (mu, log sigma).
    theta = np.stack([out.mu, 0.5 * np.log(out.sigma2)], -1)
    d = np.linalg.norm(theta[:, None, :] - np.array(found)[None], axis=-1)
    assert (out.basin.to_numpy(dtype=int) == d.argmin(-1)).all()
    assert np.allclose(out.basin_distance, d.min(-1), atol=1e-5)
    # The loss column is the exact divergence at the averaged iterate.
    for _, r in out.head(3).iterrows():
        assert r.loss == pytest.approx(_reverse_kl(r.mu, 0.5 * math.log(r.sigma2), 5.5, 0.6), rel=1e-7)


def test_a_row_is_the_same_alone_and_in_any_batch():
    table = rows(6)
    full = run_rows(table, shared())
    alone = run_rows(table.iloc[[4]], shared())
    mixed = run_rows(pd.concat([table.iloc[[4]], rows(2, separation=1.0)]), shared())
    for other in (alone, mixed):
        for col in ("mu", "sigma2", "crossings", "basin"):
            assert other[col].iloc[0] == full[col].iloc[4]
    assert full.mu.nunique() == 6  # and the seeds differ


def test_gaussian_target_average_is_unbiased_and_converges():
    """P = N(1, 2) (separation 0): the reverse KL's minimum is Q = P. Over 64 replicas, the averaged
    iterates' mean lies within 4 standard errors of it, under Robbins-Monro and both gradients."""
    table = rows(
        64, separation=0.0, center=1.0, component_var=2.0, init_mu=-1.0, **{"optimizer.max_steps": 1500}
    )
    for gradient in ("reparam", "stl"):
        out = run_rows(
            table, shared(**{"estimator.gradient": gradient, "optimizer.schedule": "robbins_monro"})
        )
        assert (out.n_minima == 1).all() and np.allclose(out.basin_mu, 1.0, atol=1e-8)
        assert np.allclose(out.basin_sigma2, 2.0, rtol=1e-8)
        for values, truth in ((out.mu, 1.0), (0.5 * np.log(out.sigma2), 0.5 * math.log(2.0))):
            se = values.std() / math.sqrt(len(values))
            assert abs(values.mean() - truth) < 4 * se + 1e-4
            assert values.std() < 0.05


def test_sticking_the_landing_has_no_noise_at_the_optimum():
    """At Q = P the STL gradient of the reverse KL is exactly zero for any draws (Roeder et al.'s
    point); the plain reparameterisation gradient is not."""
    P = Mixture.two_component(*(torch.tensor([v], dtype=torch.float64) for v in (0.0, 0.5, 1.0, 2.0)))
    key, seed = torch.tensor([12345]), torch.tensor([0])
    theta = torch.tensor([1.0, 0.5 * math.log(2.0)], dtype=torch.float64, requires_grad=True)
    grads = {}
    for stick in (False, True):
        draws = FreshDraws(4, key, seed, 3, stick)
        value = divergence_value(DIVERGENCES["reverse"], draws, P, theta[:1], theta[1:])
        grads[stick] = torch.autograd.grad(value.sum(), theta)[0]
    assert grads[True].abs().max() < 1e-13
    assert grads[False].abs().max() > 1e-3


def test_renyi_and_forward_run_stochastically():
    for name, alpha in (("renyi", 0.5), ("forward", None)):
        out = run_rows(rows(8, **{"divergence.alpha": alpha}), shared(**{"divergence.name": name}))
        assert (out.status == "converged").all() and out.loss.notna().all()
        assert (out.n_minima >= 1).all() and out.basin.notna().all()
        if name == "forward":  # one minimum: P's moments
            assert np.allclose(out.basin_mu, -0.55, atol=1e-7)


def test_deterministic_rows_have_null_stochastic_columns():
    settings = {k: v for k, v in shared().items() if not k.startswith("estimator.")}
    out = run_rows(rows(1), {**settings, "estimator.name": "quadrature", "estimator.nodes_per_panel": 6})
    assert out[["seed", "n_minima", "basin", "crossings", "num_samples"]].isna().all().all()
    assert out[["basin_mu", "basin_distance", "average"]].isna().all().all()
    assert out[["gradient", "schedule"]].isna().all().all()


def test_practice_columns_name_the_run():
    out = run_rows(rows(2), shared(**{"optimizer.schedule": "robbins_monro", "optimizer.decay": 0.75}))
    assert out["gradient"].tolist() == ["reparam"] * 2
    assert out["schedule"].tolist() == ["robbins_monro(0.75, 100)"] * 2
    assert out["average"].tolist() == [0.5, 0.5]


KERNEL_CASES = [
    ("reverse", None, "reparam"),
    ("reverse", None, "stl"),
    ("forward", None, "reparam"),
    ("hellinger", None, "reparam"),
    ("alpha", -0.5, "reparam"),
    ("alpha", 1.5, "reparam"),
    ("chi2", None, "reparam"),
    ("renyi", 2.0, "reparam"),
    ("jensen_shannon", None, "reparam"),
]


@pytest.mark.parametrize("name, alpha, gradient", KERNEL_CASES)
def test_kernel_runs_are_the_torch_loops(name, alpha, gradient, monkeypatch):
    # The kernel (kl.c: stochastic_fit) against the torch loop, autograd through the registry's own
    # estimate: the same draws (Philox words, Box-Muller), gradient, Adam, Robbins-Monro rate,
    # average and crossings, to rounding, for every form of estimate (under Q, under P, both, the
    # log-mean-exp) and the alpha family's finite region. Separations 1-7 cross the folds.
    over = {"optimizer.max_steps": 60, "divergence.alpha": alpha}
    table = rows(8, separation=np.linspace(1.0, 7.0, 8), **over)
    settings = shared(
        **{
            "divergence.name": name,
            "estimator.gradient": gradient,
            "estimator.num_samples": 5,
            "optimizer.schedule": "robbins_monro",
        }
    )
    assert native.available()  # (CI has a C compiler; tests/test_native.py checks the build)
    kernel = run_rows(table, settings)
    monkeypatch.setenv("KL_SWEEP_NATIVE", "0")
    loop = run_rows(table, settings)
    assert (kernel["status"] == "converged").all()
    np.testing.assert_allclose(kernel["mu"], loop["mu"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.log(kernel["sigma2"]), np.log(loop["sigma2"]), rtol=0, atol=1e-12)
    assert kernel["crossings"].tolist() == loop["crossings"].tolist()
    assert kernel["basin"].tolist() == loop["basin"].tolist()
