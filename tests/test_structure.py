"""The exact phase structure: continuation, folds, cusps, coexistence points, against independent methods.

The reference for the reverse KL here is written from scratch, not from the core: with Q = N(mu,
e^{2s}) and x = mu + e^s t, t ~ N(0, 1),

    L(mu, s) = -(1/2) log(2 pi e) - s - E_t[g(x)],   g = log p,

so the gradient and Hessian in (mu, s) are expectations of g' and g'' (the mixture's score and its
derivative, by responsibilities), each integrated by scipy's adaptive ``quad_vec``. Folds, coexistence
points and cusps are then roots of small systems found by ``scipy.optimize.root``.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, scipy_kl
from scipy import integrate, optimize

from analysis.structure import exact_structure
from kl_sweep.core.continuation import Options, continuation, locate
from kl_sweep.core.divergences import get_divergence
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam

# ---------------------------------------------------------------------------------------------
# The independent reference (scipy adaptive quadrature and root finding; nothing from the core)


def _mixture(d: float, w: float, v: float = 1.0, c: float = 0.0):
    """x -> (g, g', g'') for g = log p of the two-component mixture, by responsibilities."""
    means = np.array([c - d / 2, c + d / 2])
    log_w = np.array([math.log(w), math.log1p(-w)]) - 0.5 * math.log(2 * math.pi * v)

    def score(x: float) -> tuple[float, float, float]:
        a = log_w - (x - means) ** 2 / (2 * v)
        top = a.max()
        g = top + math.log(np.exp(a - top).sum())
        r = np.exp(a - g)  # responsibilities
        g1 = (r * (means - x)).sum() / v
        return g, g1, (r * (x - means) ** 2).sum() / v**2 - 1 / v - g1 * g1

    return means, score


def _moments(mu: float, s: float, d: float, w: float, v: float = 1.0, c: float = 0.0) -> np.ndarray:
    """E_t of [g, g', g' sigma t, g'', g'' sigma t, g'' sigma^2 t^2] under t ~ N(0, 1)."""
    sigma = math.exp(s)
    means, score = _mixture(d, w, v, c)

    def f(t: float) -> np.ndarray:
        g, g1, g2 = score(mu + sigma * t)
        st = sigma * t
        return (
            math.exp(-0.5 * t * t)
            / math.sqrt(2 * math.pi)
            * np.array([g, g1, g1 * st, g2, g2 * st, g2 * st * st])
        )

    cuts = sorted(
        {-40.0, 40.0, *((means - mu) / sigma).clip(-39, 39), *((np.array([c]) - mu) / sigma).clip(-39, 39)}
    )
    return sum(
        integrate.quad_vec(f, a, b, epsabs=1e-15, epsrel=1e-13, limit=400)[0]
        for a, b in zip(cuts[:-1], cuts[1:])
    )


def ref_loss_grad_hess(mu, s, d, w):
    """Reverse KL(Q||P) in nats, its gradient and Hessian in (mu, log sigma), by scipy quadrature."""
    e_g, e_g1, e_g1t, e_g2, e_g2t, e_g2tt = _moments(mu, s, d, w)
    loss = -0.5 * math.log(2 * math.pi * math.e) - s - e_g
    grad = np.array([-e_g1, -1.0 - e_g1t])
    hess = -np.array([[e_g2, e_g2t], [e_g2t, e_g2tt + e_g1t]])
    return loss, grad, hess


def ref_fold(mu, s, d, w):
    """Solve (F, det H) = 0 in (mu, log sigma, d) at weight w from a rough start."""

    def system(x):
        _, g, h = ref_loss_grad_hess(x[0], x[1], x[2], w)
        return [g[0], g[1], np.linalg.det(h)]

    sol = optimize.root(system, [mu, s, d], method="hybr", options={"xtol": 1e-13})
    assert sol.success, sol.message
    return sol.x


def ref_maxwell(mu1, s1, mu2, s2, d, w):
    """Solve F(theta_1) = F(theta_2) = 0, L_1 = L_2 in (theta_1, theta_2, d) from a rough start."""

    def system(x):
        l1, g1, _ = ref_loss_grad_hess(x[0], x[1], x[4], w)
        l2, g2, _ = ref_loss_grad_hess(x[2], x[3], x[4], w)
        return [g1[0], g1[1], g2[0], g2[1], l1 - l2]

    sol = optimize.root(system, [mu1, s1, mu2, s2, d], method="hybr", options={"xtol": 1e-13})
    assert sol.success, sol.message
    return sol.x


def test_reference_agrees_with_scipy_kl_and_finite_differences():
    """The reference itself: its loss is conftest's scipy KL, its derivatives match differences."""

    mu, s, d, w = -0.7, 0.4, 3.0, 0.7
    loss, grad, hess = ref_loss_grad_hess(mu, s, d, w)
    assert loss == pytest.approx(scipy_kl("reverse", d, w, 1.0, mu, math.exp(2 * s)), rel=1e-10)
    h = 1e-5
    for i, e in enumerate(np.eye(2) * h):
        up = ref_loss_grad_hess(mu + e[0], s + e[1], d, w)
        down = ref_loss_grad_hess(mu - e[0], s - e[1], d, w)
        assert grad[i] == pytest.approx((up[0] - down[0]) / (2 * h), rel=1e-7, abs=1e-9)
        np.testing.assert_allclose(hess[:, i], (up[1] - down[1]) / (2 * h), rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# The structure against it


@pytest.fixture(scope="module")
def structure():
    """Reverse KL at weights 0.5 to 0.76: folds either side of the cusp (near 0.743), coexistence points."""
    return exact_structure("reverse", [0.5, 0.7, 0.74, 0.76], (0.0, 8.0))


def _close(a, b, rel=1e-6):
    return abs(a - b) <= rel * max(abs(b), 1.0)


def test_folds_match_an_independent_root_finder(structure):
    points = structure.points
    # Every point but a cusp sits at one of the given weights exactly (as the sweep's tables key them).
    assert set(points.loc[points["kind"] != "cusp", "weight"]) <= {0.5, 0.7, 0.74, 0.76}
    folds = points[points["kind"] == "fold"]
    # w = 0.7: the heavier mode is born, the covering minimum dies, the lighter mode is born.
    assert (folds["weight"] == 0.7).sum() == 3
    assert set(folds.loc[folds["weight"] == 0.7, "event"]) == {"birth", "death"}
    assert len(folds) >= 5
    for row in folds.itertuples():
        # A rough start (2 decimals) for the reference: it finds the root by itself.
        start = np.round([row.mu, 0.5 * math.log(row.sigma2), row.separation], 2)
        mu, s, d = ref_fold(*start, row.weight)
        assert _close(row.separation, d), (row, d)
        assert _close(row.mu, mu), (row, mu)
        assert _close(row.sigma2, math.exp(2 * s)), (row, math.exp(2 * s))
        assert row.residual <= 1e-10


def test_coexistence_point_matches_an_independent_root_finder(structure):
    maxwell = structure.points[(structure.points["kind"] == "maxwell") & (structure.points["weight"] == 0.7)]
    assert len(maxwell) == 1
    row = next(maxwell.itertuples())
    assert {row.branch, row.branch_other} == {"covering", "heavier mode"}
    start = np.round(
        [row.mu, 0.5 * math.log(row.sigma2), row.mu_other, 0.5 * math.log(row.sigma2_other), row.separation],
        2,
    )
    mu1, s1, mu2, s2, d = ref_maxwell(*start, 0.7)
    assert _close(row.separation, d)
    assert _close(row.mu, mu1) and _close(row.sigma2, math.exp(2 * s1))
    assert _close(row.mu_other, mu2) and _close(row.sigma2_other, math.exp(2 * s2))
    # Both are minima of equal loss there, by the reference's own Hessian.
    for m, s in ((mu1, s1), (mu2, s2)):
        assert np.all(np.linalg.eigvalsh(ref_loss_grad_hess(m, s, d, 0.7)[2]) > 0)


def test_bistable_interval_narrower_than_the_query_step_still_has_its_coexistence_point(structure):
    """At w = 0.74, just below the cusp, the two minima coexist only over d in (4.0256, 4.0326):
    inside one 0.05 query step. The coexistence point there must still be found, between the folds."""
    p = structure.points[structure.points["weight"] == 0.74]
    folds = p[(p["kind"] == "fold") & (p["separation"] < 4.5)]
    assert len(folds) == 2
    lo, hi = folds["separation"].min(), folds["separation"].max()
    assert hi - lo < 0.05
    maxwell = p[p["kind"] == "maxwell"]
    assert len(maxwell) == 1 and lo < maxwell["separation"].iloc[0] < hi
    assert not (p["kind"] == "crossover").any()


def _third_along_null(mu, s, d, w, eps=1e-3):
    """D^3 L[v, v, v] along the Hessian's null vector v (the fold's cubic coefficient), by differences
    of the reference gradient; it vanishes at a cusp and not at an ordinary fold."""
    _, g, h = ref_loss_grad_hess(mu, s, d, w)
    v = np.linalg.eigh(h)[1][:, 0]
    v = v if v[0] >= 0 else -v  # a fixed orientation, so the coefficient is a smooth function
    up = ref_loss_grad_hess(mu + eps * v[0], s + eps * v[1], d, w)[1]
    down = ref_loss_grad_hess(mu - eps * v[0], s - eps * v[1], d, w)[1]
    return g, h, v @ (up - 2 * g + down) / eps**2


def test_cusp_matches_an_independent_root_finder(structure):
    cusps = structure.points[structure.points["kind"] == "cusp"]
    assert len(cusps) == 1
    cusp = next(cusps.itertuples())
    assert cusp.residual <= 1e-10 and cusp.branch == ""

    def system(x):
        g, h, c3 = _third_along_null(*x)
        return [g[0], g[1], np.linalg.det(h), c3]

    start = np.round([cusp.mu, 0.5 * math.log(cusp.sigma2), cusp.separation, cusp.weight], 2)
    sol = optimize.root(system, start, method="hybr", options={"xtol": 1e-12})
    assert sol.success, sol.message
    mu, s, d, w = sol.x
    assert abs(cusp.weight - w) <= 1e-5 and abs(cusp.separation - d) <= 1e-5
    assert abs(cusp.mu - mu) <= 1e-4 and abs(0.5 * math.log(cusp.sigma2) - s) <= 1e-4
    # An ordinary fold has a clearly non-zero cubic coefficient: the test above can tell them apart.
    fold = structure.points[(structure.points["kind"] == "fold") & (structure.points["weight"] == 0.7)].iloc[
        0
    ]
    assert (
        abs(_third_along_null(fold["mu"], 0.5 * math.log(fold["sigma2"]), fold["separation"], 0.7)[2]) > 1e-2
    )


def test_mirror_symmetry_w_and_one_minus_w():
    """P at weight 1 - w is P at w mirrored about the center: the structure mirrors (mu -> -mu), and
    the names, which say heavier or lighter, not left or right, stay."""
    for w in (0.3, 0.4):
        a, b = exact_structure("reverse", [w], (0.0, 8.0)), exact_structure("reverse", [1 - w], (0.0, 8.0))
        pa, pb = (
            s.points[s.points["kind"].isin(["fold", "maxwell"])].sort_values(
                ["kind", "separation"], ignore_index=True
            )
            for s in (a, b)
        )
        assert len(pa) == len(pb) >= 3
        np.testing.assert_allclose(pa["separation"], pb["separation"], rtol=1e-8)
        np.testing.assert_allclose(pa["mu"], -pb["mu"], atol=1e-7)
        np.testing.assert_allclose(pa["sigma2"], pb["sigma2"], rtol=1e-7)
        assert list(pa["event"]) == list(pb["event"]) and list(pa["branch"]) == list(pb["branch"])
        np.testing.assert_array_equal(a.counts()["n_minima"], b.counts()["n_minima"])


# ---------------------------------------------------------------------------------------------
# The structure against fits (the sweep's view)


def _fits(weight: float, separations: np.ndarray, init_mu: np.ndarray, init_var: np.ndarray) -> pd.DataFrame:
    """Reverse-KL fits from every (init_mu * d/2, init_var) start at every separation, one batch."""
    d, m, v = (a.ravel() for a in np.meshgrid(separations, init_mu, init_var, indexing="ij"))
    m = m * np.maximum(d, 1.0) / 2
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    n = len(d)
    w = np.full(n, weight)
    mixture = Mixture.two_component(t(d), t(w), torch.zeros(n), torch.ones(n))
    problem = Problem(
        mixture,
        t(m),
        t(v),
        torch.full((n,), 0.05),
        torch.full((n,), 20_000, dtype=torch.long),
        torch.full((n,), 1e-10),
    )
    r = fit(problem, Settings(get_divergence("reverse"), Quadrature(), Adam()))
    ok = (r.status == Status.CONVERGED).numpy()
    return pd.DataFrame({"separation": d, "weight": w, "mu": r.mu.numpy(), "sigma2": r.sigma2.numpy()})[ok]


def _distinct(frame: pd.DataFrame) -> int:
    theta = np.column_stack([frame["mu"], 0.5 * np.log(frame["sigma2"])])
    kept: list[np.ndarray] = []
    for x in theta:
        if all(np.abs(x - k).max() > 1e-4 for k in kept):
            kept.append(x)
    return len(kept)


@pytest.mark.slow
def test_every_converged_fit_lies_on_a_branch_and_counts_match_a_dense_multistart():
    weight = 0.6
    separations = np.round(np.arange(0.0, 8.01, 0.5), 10)
    sweep = _fits(weight, separations, np.linspace(-1.6, 1.6, 9), np.array([0.5, 3.0]))
    s = exact_structure("reverse", [weight], (0.0, 8.0), sweep_minima=sweep, separations=separations)
    assert not s.notes
    exact = s.minima[s.minima["minimum"]]
    for row in sweep.itertuples():  # each converged fit is a minimum of the exact structure (1e-6)
        here = exact[exact["separation"] == row.separation]
        dist = np.maximum(np.abs(here["mu"] - row.mu), np.abs(here["log_sigma"] - 0.5 * math.log(row.sigma2)))
        assert dist.min() <= 1e-6, row
    # Between consecutive folds, the exact count equals what a dense multistart finds at the midpoint.
    folds = np.sort(s.points.loc[s.points["kind"].isin(["fold", "pitchfork"]), "separation"].to_numpy())
    assert len(folds) == 2  # the heavier mode is born, then the lighter; the covering one lives on
    edges = np.concatenate([[0.5], folds, [8.0]])
    mids = np.round(0.5 * (edges[1:] + edges[:-1]), 10)
    at_mids = exact_structure("reverse", [weight], (0.0, 8.0), separations=mids).counts()
    dense = _fits(weight, mids, np.linspace(-2.0, 2.0, 41), np.array([0.3, 1.0, 3.0, 10.0]))
    found = [_distinct(dense[dense["separation"] == d]) for d in mids]
    assert list(at_mids["n_minima"]) == found
    assert found == [1, 2, 3]  # then heavier mode, covering and lighter mode coexist


def test_branch_goes_round_a_fold_into_its_saddle_branch():
    """From the heavier mode at d = 8 (w = 0.5) the branch runs down to its fold, turns and comes
    back up as a saddle; the fold lies between the last minimum and the first saddle."""
    from kl_sweep.core.bifurcation import branch_special_points, continue_branches
    from kl_sweep.core.landscape import Landscape

    landscape = Landscape(get_divergence("reverse"))
    seed = torch.tensor([[-4.0, 0.0, 8.0, 0.5]])
    branches = continue_branches(landscape, seed, (0.0, 8.0))
    down = 1  # rows 0..B-1 go up in d, B..2B-1 down
    n = int(branches.curve.length[down])
    points, det = branches.curve.points[down, :n], branches.curve.monitors["det"][down, :n]
    h00 = branches.curve.monitors["h00"][down, :n]
    minimum = ((det > 0) & (h00 > 0)).numpy()
    assert minimum[0] and not minimum[-1]  # starts a minimum, ends a saddle
    first_saddle = int(np.argmin(minimum))
    assert minimum[:first_saddle].all()
    d = points[:, 2].numpy()
    assert d[first_saddle:].max() > d[first_saddle] + 1.0  # the saddle heads back up in d
    sp = branch_special_points(landscape, branches)
    fold = sp.u[sp.fold & (sp.branch == down)]
    assert len(fold) == 1
    a, b = points[first_saddle - 1].numpy(), points[first_saddle].numpy()
    f = fold[0].numpy()
    # Along the curve: mu between the two points; in d the fold is the turning point, below both.
    assert min(a[0], b[0]) <= f[0] <= max(a[0], b[0])
    assert f[2] <= min(a[2], b[2]) and f[2] <= d.min() + 1e-12
    mu, s, dd = ref_fold(*np.round(f[:3], 2), 0.5)
    assert _close(f[2], dd) and _close(f[0], mu)


def test_forward_kl_has_no_special_points_and_one_minimum_everywhere():
    s = exact_structure("forward", [0.8], (0.0, 8.0))
    assert s.points.empty
    assert (s.counts()["n_minima"] == 1).all()
    m = s.minima[s.minima["minimum"]]  # the one minimum is moment matching
    d, w = m["separation"], m["weight"]
    np.testing.assert_allclose(m["mu"], d * (0.5 - w), atol=1e-9)
    np.testing.assert_allclose(m["sigma2"], 1 + w * (1 - w) * d * d, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# The continuation core on a curve whose folds are known in closed form


class Cubic:
    """G(x, lam) = x^3 - 3x - lam = 0: folds at (x, lam) = (1, -2) and (-1, 2)."""

    def residual(self, u):
        x = u[:, 0]
        return (x**3 - 3 * x - u[:, 1]).unsqueeze(-1), torch.stack([3 * x * x - 3, -torch.ones_like(x)], -1)[
            :, None
        ]

    def monitors(self, u, jacobian, tangent):
        return {"t_lam": tangent[:, 1]}

    def take(self, index):
        return self


def test_continuation_goes_round_both_folds_of_a_cubic_and_locates_them():
    options = Options(lower=(-5.0, -20.0), upper=(5.0, 20.0))
    start = torch.tensor([[-3.0, -18.0]])
    curve = continuation(Cubic(), start, torch.tensor([[0.0, 1.0]]), options)
    n = int(curve.length[0])
    u = curve.points[0, :n]
    assert torch.abs(u[:, 0] ** 3 - 3 * u[:, 0] - u[:, 1]).max() <= 1e-10
    assert u[-1, 0] > 2.0  # it went round both folds, to the upper sheet
    t = curve.monitors["t_lam"][0, :n]
    steps = torch.nonzero(torch.sign(t[:-1]) * torch.sign(t[1:]) < 0).flatten()
    assert len(steps) == 2
    found = locate(Cubic(), curve, torch.zeros(2, dtype=torch.long), steps, "t_lam", options)
    assert found.converged.all()
    np.testing.assert_allclose(found.u.numpy(), [[-1.0, 2.0], [1.0, -2.0]], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# The command without a sweep


def _exact_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "analysis.exact", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_exact_cli_writes_the_bifurcation_set_and_figures(tmp_path):
    done = _exact_cli(
        "reverse", "forward", "--weights", "0.7", "0.8", "0.1", "--out", str(tmp_path), cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "tables" / "bifurcation_set.csv")
    for column in ("divergence", "weight", "component_var", "kind", "separation", "mu", "sigma2", "branch"):
        assert column in table
    assert {"event", "residual", "mu_other", "sigma2_other"} <= set(table.columns)
    assert set(table["kind"]) >= {"fold", "cusp", "maxwell", "crossover"}
    assert (table["divergence"] == "reverse").all()  # forward KL has none ...
    assert "forward: no special point" in done.stdout  # ... and says so
    cusp = table[table["kind"] == "cusp"]
    assert len(cusp) == 1 and 0.74 < cusp["weight"].iloc[0] < 0.745
    for name in ("exact_phase_diagram", "exact_branches_reverse", "exact_branches_forward"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, key",
    [
        (["reverse", "--weights", "0.0", "0.5", "0.1"], "--weights"),
        (["reverse", "--weights", "0.5", "1.2", "0.1"], "--weights"),
        (["reverse", "--weights", "0.5", "0.9", "0"], "--weights"),
        (["reverse", "--separations", "5", "2"], "--separations"),
        (["nope"], "divergence=nope"),
    ],
)
def test_exact_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, key):
    out = tmp_path / "out"
    done = _exact_cli(*args, "--out", str(out), cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "allowed" in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()


@pytest.mark.slow
def test_analysis_of_a_one_weight_sweep_says_what_it_cannot_do(tmp_path):
    """A SWEEP_DIR with one weight: folds and coexistence points, no fold lines, and a note; no traceback."""
    from conftest import run_cli

    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "separation=range(3,7,0.25)",
        "weight=0.6",
        "init_mu=-2,0,2",
        "divergence=forward,reverse",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.latest_link=null",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    analysed = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert analysed.returncode == 0, analysed.stderr
    assert "Traceback" not in analysed.stderr
    assert "note: reverse: one weight swept: no fold lines or cusps" in analysed.stdout
    assert "note: forward: no special point in the swept range" in analysed.stdout
    summary = (sweep / "tables" / "summary.md").read_text()
    assert "one weight swept" in summary
    points = pd.read_csv(sweep / "tables" / "bifurcation_set.csv")
    assert set(points["kind"]) == {"fold", "maxwell"} and (points["divergence"] == "reverse").all()
    assert (points["weight"] == 0.6).all()
    bounds = pd.read_csv(sweep / "tables" / "phase_boundaries.csv").set_index("divergence")
    # The exact onset at weight 0.6 (the heavier mode's fold, 4.5763 sd) replaces the grid's 4.75.
    assert bounds.loc["reverse", "onset_separation"] == pytest.approx(4.57634, abs=1e-5)
    assert bounds.loc["reverse", "onset_grid"] == 4.75
    assert bounds.loc["reverse", "boundary_method"] == "exact"


def test_the_original_notebooks_cases():
    """Its cases fitted properly; the "as computed" reading reproduces the losses the notebook printed."""
    from analysis.cases import case_table

    t = case_table()
    reverse = t[t["divergence"] == "reverse"].set_index(["variant", "case", "type"]).sort_index()
    # Every minimum is a KL in nats by scipy quadrature (an independent check of the losses).
    for row in t.itertuples():
        d = row.separation_sd * math.sqrt(row.component_var)
        expected = scipy_kl(row.divergence, d, 0.75, row.component_var, row.mu, row.sigma2, row.center)
        assert row.loss == pytest.approx(expected, rel=1e-9)
    # As stated (6.7 and 11.2 sd): two minima each; from mu = 1 the heavier, then the lighter mode.
    for case, reached in (("small separation", "heavier mode"), ("large separation", "lighter mode")):
        part = reverse.loc[("as stated", case)]
        assert set(part.index) == {"heavier mode", "lighter mode"}
        assert bool(part.loc["heavier mode", "global"]) and bool(part.loc[reached, "reached"])
    # As computed: its sum over the grid (step 0.004) of densities scaled by sqrt(pi) printed 85.5667 and
    # 126.883 at the end of its reverse runs; 3.8 sd apart there is one, covering, minimum.
    scale = math.sqrt(math.pi) / 0.004
    small = reverse.loc[("as computed", "small separation")]
    assert list(small.index) == ["covering"]
    assert small["loss"].iloc[0] * scale == pytest.approx(85.5667, rel=2e-5)
    large = reverse.loc[("as computed", "large separation", "heavier mode")]
    assert bool(large["reached"]) and large["loss"] * scale == pytest.approx(126.883, rel=2e-5)
    # The forward KL is moment matching in every case.
    forward = t[t["divergence"] == "forward"]
    assert len(forward) == 4 and forward["reached"].all()
    np.testing.assert_allclose(
        forward["mu"] - forward["center"],
        -0.25 * forward["separation_sd"] * np.sqrt(forward["component_var"]),
        atol=1e-9,
    )


# ---------------------------------------------------------------------------------------------
# The same analysis for another divergence of the registry: the squared Hellinger distance


def ref_hellinger(mu, s, d, w, v=1.0, c=0.0):
    """H^2 = 1 - int sqrt(p q) dx, its gradient and Hessian in (mu, log sigma), by scipy quadrature.

    With x = mu + sigma t: int sqrt(p q) dx = int I(t) dt, I = exp(s/2 + g(x)/2) sqrt(phi(t)), g = log p,
    so d log I / d mu = g'/2 =: A and d log I / d s = 1/2 + g' sigma t / 2 =: B, and the second
    derivatives of I follow from those of A and B.
    """
    sigma = math.exp(s)
    means, score = _mixture(d, w, v, c)

    def f(t: float) -> np.ndarray:
        g, g1, g2 = score(mu + sigma * t)
        st = sigma * t
        i = math.exp(0.5 * s + 0.5 * g - 0.25 * t * t) / (2 * math.pi) ** 0.25
        big_a, big_b = 0.5 * g1, 0.5 + 0.5 * g1 * st
        return i * np.array(
            [
                1.0,
                big_a,
                big_b,
                big_a * big_a + 0.5 * g2,
                big_a * big_b + 0.5 * g2 * st,
                big_b * big_b + 0.5 * (g2 * st * st + g1 * st),
            ]
        )

    cuts = sorted({-60.0, 60.0, *((means - mu) / sigma).clip(-59, 59)})
    e = sum(
        integrate.quad_vec(f, a, b, epsabs=1e-15, epsrel=1e-13, limit=400)[0]
        for a, b in zip(cuts[:-1], cuts[1:])
    )
    return 1.0 - e[0], -e[1:3], -np.array([[e[3], e[4]], [e[4], e[5]]])


def test_hellinger_reference_agrees_with_scipy_and_finite_differences():
    from test_divergences import scipy_hellinger

    mu, s, d, w = -0.7, 0.4, 3.0, 0.7
    loss, grad, hess = ref_hellinger(mu, s, d, w)
    assert loss == pytest.approx(scipy_hellinger(d, w, 1.0, mu, math.exp(2 * s)), rel=1e-10)
    h = 1e-5
    for i, e in enumerate(np.eye(2) * h):
        up, down = ref_hellinger(mu + e[0], s + e[1], d, w), ref_hellinger(mu - e[0], s - e[1], d, w)
        assert grad[i] == pytest.approx((up[0] - down[0]) / (2 * h), rel=1e-7, abs=1e-10)
        np.testing.assert_allclose(hess[:, i], (up[1] - down[1]) / (2 * h), rtol=1e-6, atol=1e-9)


def test_hellinger_folds_and_coexistence_point_match_an_independent_root_finder():
    s = exact_structure("hellinger", [0.5, 0.75], (0.0, 10.0))
    p = s.points
    folds = p[p["kind"] == "fold"]
    assert len(folds) >= 4  # two births at 1/2 (mirror images); heavier birth, covering death at 0.75
    for row in folds.itertuples():

        def fold(x, w=row.weight):
            _, g, h = ref_hellinger(x[0], x[1], x[2], w)
            return [g[0], g[1], np.linalg.det(h)]

        start = np.round([row.mu, 0.5 * math.log(row.sigma2), row.separation], 2)
        sol = optimize.root(fold, start, method="hybr", options={"xtol": 1e-13})
        assert sol.success, sol.message
        assert _close(row.separation, sol.x[2]) and _close(row.mu, sol.x[0]), (row, sol.x)
    # Multistability sets in later than for the reverse KL: 6.14 against 4.82 sd at weight 1/2.
    assert folds.loc[folds["weight"] == 0.5, "separation"].min() == pytest.approx(6.143425, abs=1e-6)
    row = next(p[(p["kind"] == "maxwell") & (p["weight"] == 0.75)].itertuples())

    def maxwell(x):
        l1, g1, _ = ref_hellinger(x[0], x[1], x[4], 0.75)
        l2, g2, _ = ref_hellinger(x[2], x[3], x[4], 0.75)
        return [g1[0], g1[1], g2[0], g2[1], l1 - l2]

    start = np.round(
        [row.mu, 0.5 * math.log(row.sigma2), row.mu_other, 0.5 * math.log(row.sigma2_other), row.separation],
        2,
    )
    sol = optimize.root(maxwell, start, method="hybr", options={"xtol": 1e-13})
    assert sol.success and _close(row.separation, sol.x[4]) and _close(row.mu, sol.x[0])
