"""General targets in R^d (``target.file``): the R^d rule of :mod:`kl_sweep.core.cubature` against
scipy's adaptive cubature in 2-D and against the closed forms of a single Gaussian P in 2-D and 5-D
(randomised QMC within four of its standard errors), and a fit through the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from scipy import integrate

from kl_sweep.core.cubature import divergence_nd
from kl_sweep.core.gaussians import MixtureND

F64 = torch.float64
EXAMPLE = {
    "weights": [0.5, 0.3, 0.2],
    "means": [[-2.0, 0.0], [2.0, 1.0], [1.0, -2.5]],
    "covs": [[[1.5, 0.9], [0.9, 1.5]], [[0.3, 0.0], [0.0, 0.3]], [[1.2, -0.2], [-0.2, 0.25]]],
}


def mixture(weights, means, covs) -> MixtureND:
    L = np.linalg.cholesky(np.asarray(covs, dtype=float))
    parts = (np.log(weights), np.asarray(means, dtype=float), L)
    return MixtureND(*(torch.tensor(x, dtype=F64).unsqueeze(0) for x in parts))


def gaussian(mean, cov):
    inv, det = np.linalg.inv(cov), np.linalg.det(cov)
    norm = 1.0 / (2 * math.pi * math.sqrt(det))

    def pdf(x, y):
        u = np.array([x - mean[0], y - mean[1]])
        return norm * math.exp(-0.5 * u @ inv @ u)

    return pdf


def test_2d_three_unequal_components_match_scipy_cubature():
    parts = [gaussian(m, c) for m, c in zip(EXAMPLE["means"], EXAMPLE["covs"])]

    def p(x, y):
        return sum(w * g(x, y) for w, g in zip(EXAMPLE["weights"], parts))

    q_mean, q_cov = np.array([0.3, -0.4]), np.array([[2.0, 0.4], [0.4, 1.2]])
    q = gaussian(q_mean, q_cov)
    target = mixture(**EXAMPLE)
    mean = torch.tensor(q_mean[None], dtype=F64)
    L = torch.tensor(np.linalg.cholesky(q_cov), dtype=F64).unsqueeze(0)

    def cubature(f):
        return integrate.dblquad(lambda y, x: f(x, y), -12, 12, -12, 12, epsabs=1e-11, epsrel=1e-9)[0]

    reverse = cubature(lambda x, y: q(x, y) * math.log(q(x, y) / p(x, y)))
    root = cubature(lambda x, y: math.sqrt(p(x, y) * q(x, y)))
    got_reverse, error = divergence_nd("reverse", target, mean, L)
    got_hellinger, _ = divergence_nd("hellinger", target, mean, L)
    assert got_reverse.item() == pytest.approx(reverse, rel=1e-7)
    assert got_hellinger.item() == pytest.approx(1 - root, rel=1e-7)
    assert error.item() == 0.0  # the panels are a deterministic rule


@pytest.mark.parametrize("dim", [2, 5])
def test_a_single_gaussian_target_gives_the_closed_form_kl(dim):
    """P = N(m, Sigma) (K = 1): KL(Q||P) in closed form; d = 5 uses randomised QMC, which must be
    within four of its own standard errors (and report a non-zero one)."""
    rng = np.random.default_rng(dim)
    A = rng.normal(size=(dim, dim))
    sigma = A @ A.T / dim + np.eye(dim)
    m = rng.normal(size=dim)
    B = rng.normal(size=(dim, dim))
    S = B @ B.T / dim + 0.5 * np.eye(dim)
    mu = rng.normal(size=dim)
    inv = np.linalg.inv(sigma)
    closed = 0.5 * (
        np.trace(inv @ S)
        + (m - mu) @ inv @ (m - mu)
        - dim
        + np.linalg.slogdet(sigma)[1]
        - np.linalg.slogdet(S)[1]
    )
    target = mixture([1.0], [m], [sigma])
    L = torch.tensor(np.linalg.cholesky(S), dtype=F64).unsqueeze(0)
    value, error = divergence_nd("reverse", target, torch.tensor(mu[None], dtype=F64), L)
    if dim <= 3:
        assert value.item() == pytest.approx(closed, rel=1e-8)
        assert error.item() == 0.0
    else:
        assert 0 < error.item() < 0.05 * closed
        assert abs(value.item() - closed) <= 4 * error.item()


def test_the_example_target_fits_through_the_command_line(tmp_path):
    out = tmp_path / "run"
    args = ["dim=2", "target.file=conf/targets/example.yaml", "divergence=reverse", "q_family=diag"]
    done = subprocess.run(
        [sys.executable, "-m", "kl_sweep", *args, f"hydra.run.dir={out}"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    row = pd.read_parquet(out / "results.parquet").iloc[0]
    assert row["status"] == "converged" and row["target_file"] == "conf/targets/example.yaml"
    assert len(row["mean"]) == 2 and row["cov"][1] == 0.0  # a diagonal Q: no off-diagonal entry
    # the reported loss is the reverse KL at the reported Q, by the same rule, independently of the fit
    S = np.diag([row["cov"][0], row["cov"][2]])
    value, _ = divergence_nd(
        "reverse",
        mixture(**EXAMPLE),
        torch.tensor([list(row["mean"])], dtype=F64),
        torch.tensor(np.sqrt(S), dtype=F64).unsqueeze(0),
    )
    assert row["loss"] == pytest.approx(value.item(), rel=1e-10)
    assert row["kl_reverse"] == pytest.approx(row["loss"], rel=1e-12)


def test_a_one_component_target_in_1d_is_fitted_exactly(tmp_path):
    """K = 1 on the line: Q = P under both KLs (the 1-D core with no switch point), and P is one
    Gaussian, so the entropy gap is defined (0)."""
    from kl_sweep.rows import rows_frame
    from kl_sweep.table import run_rows

    path = tmp_path / "one.yaml"
    path.write_text("weights: [1.0]\nmeans: [[0.5]]\ncovs: [[[2.0]]]\n")
    shared = {
        **{"estimator.name": "quadrature", "estimator.nodes_per_panel": 6, "optimizer.name": "adam"},
        **{"optimizer.beta1": 0.9, "optimizer.beta2": 0.999, "optimizer.eps": 1e-8, "polish": True},
        **{"dim": 1, "q_family": "full", "direction": "axis", "correlation": 0.0, "target.file": str(path)},
    }
    rows = rows_frame(
        {
            **{
                "separation": 3.0,
                "weight": 0.75,
                "center": 0.0,
                "component_var": 1.0,
            },  # the file's P instead
            "init_mu": -1.0,
            "init_sigma2": 0.5,
            "optimizer.lr": 0.05,
            "optimizer.max_steps": 5000,
            "optimizer.tol": 1e-8,
        },
        1,
    )
    for name in ("reverse", "forward"):
        row = run_rows(rows, {**shared, "divergence.name": name}).iloc[0]
        assert row["status"] == "converged"
        assert row["mu"] == pytest.approx(0.5, abs=1e-9) and row["sigma2"] == pytest.approx(2.0, rel=1e-8)
        assert abs(row["entropy_gap"]) < 1e-8 and row["loss"] < 1e-15
