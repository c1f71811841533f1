"""The alpha family's analysis (analysis.alpha): folds against alpha, the onset table, the command line.

The folds are checked against an independent reference written from scratch with scipy: with
Q = N(mu, e^{2s}) and x = mu + e^s t,

    D_a = (1 - I) / (a (1 - a)),    I = int p^a q^{1-a} dx = int J(t) dt,
    J(t) = exp(a g(x) + a s - (1 - a)(t^2/2 + log(2 pi)/2)),   g = log p,

so the gradient and Hessian of I in (mu, s) are J times polynomials in g', g'' (the mixture's score
by responsibilities, from tests/test_structure.py), integrated by scipy's adaptive ``quad_vec``; a
fold is a root of (grad D_a, det H) found by ``scipy.optimize.root``. At a = 0 the reference is
test_structure's reverse-KL one, at a = 1/2 its Hellinger one.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_cli
from scipy import integrate, optimize
from test_structure import _mixture, ref_fold, ref_hellinger

from analysis import alpha as alpha_analysis
from analysis.alpha import fold_versus_alpha, multistable_intervals, onset_table

# ---------------------------------------------------------------------------------------------
# The independent reference


def ref_alpha(mu, s, d, w, a, v=1.0, c=0.0):
    """D_a(P||Q) (Minka's convention), its gradient and Hessian in (mu, log sigma), by scipy quadrature.

    For a in (0, 1), and for a < 0 inside the finite region (sigma^2 < v (1 - a) / (-a)). With
    A = d log J / d mu = a g' and B = d log J / ds = a + a g' sigma t, the second derivatives of J
    are J (A^2 + a g''), J (A B + a g'' sigma t) and J (B^2 + a (g'' sigma^2 t^2 + g' sigma t)).
    """
    sigma = math.exp(s)
    means, score = _mixture(d, w, v, c)
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def f(t: float) -> np.ndarray:
        g, g1, g2 = score(mu + sigma * t)
        st = sigma * t
        j = math.exp(a * g + a * s - (1 - a) * (0.5 * t * t + half_log_2pi))
        big_a, big_b = a * g1, a + a * g1 * st
        return j * np.array(
            [
                1.0,
                big_a,
                big_b,
                big_a * big_a + a * g2,
                big_a * big_b + a * g2 * st,
                big_b * big_b + a * (g2 * st * st + g1 * st),
            ]
        )

    cuts = sorted({-80.0, 80.0, *((means - mu) / sigma).clip(-79, 79)})
    e = sum(
        integrate.quad_vec(f, lo, hi, epsabs=1e-15, epsrel=1e-13, limit=400)[0]
        for lo, hi in zip(cuts[:-1], cuts[1:])
    )
    k = a * (1 - a)
    return (1 - e[0]) / k, -e[1:3] / k, -np.array([[e[3], e[4]], [e[4], e[5]]]) / k


def ref_alpha_fold(mu, s, d, w, a):
    """Solve (grad D_a, det H) = 0 in (mu, log sigma, d) at weight w from a rough start."""

    def system(x):
        _, g, h = ref_alpha(x[0], x[1], x[2], w, a)
        return [g[0], g[1], np.linalg.det(h)]

    sol = optimize.root(system, [mu, s, d], method="hybr", options={"xtol": 1e-13})
    assert sol.success, sol.message
    return sol.x


def x_space_alpha(mu, sigma2, d, w, a, v=1.0):
    """D_a by plain adaptive quadrature of its definition over x (log densities): a second method."""
    m1, m2 = -d / 2, d / 2

    def log_p(x):
        terms = [math.log(w) - (x - m1) ** 2 / (2 * v), math.log1p(-w) - (x - m2) ** 2 / (2 * v)]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms)) - 0.5 * math.log(2 * math.pi * v)

    def f(x):
        lp, lq = log_p(x), -((x - mu) ** 2) / (2 * sigma2) - 0.5 * math.log(2 * math.pi * sigma2)
        return a * math.exp(lp) + (1 - a) * math.exp(lq) - math.exp(a * lp + (1 - a) * lq)

    edges = sorted({-40.0, m1, m2, mu - math.sqrt(sigma2), mu, mu + math.sqrt(sigma2), 40.0})
    total = sum(
        integrate.quad(f, lo, hi, epsabs=1e-14, epsrel=1e-12, limit=400)[0]
        for lo, hi in zip(edges[:-1], edges[1:])
    )
    return total / (a * (1 - a))


def test_reference_agrees_with_hellinger_reference_x_space_quadrature_and_differences():
    mu, s, d, w = -0.7, 0.4, 3.0, 0.7
    # a = 1/2 is 4 H^2: the Hellinger reference of test_structure, value and derivatives.
    loss, grad, hess = ref_alpha(mu, s, d, w, 0.5)
    h_loss, h_grad, h_hess = ref_hellinger(mu, s, d, w)
    assert loss == pytest.approx(4 * h_loss, rel=1e-10)
    np.testing.assert_allclose(grad, 4 * h_grad, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(hess, 4 * h_hess, rtol=1e-9, atol=1e-12)
    for a in (-0.5, 0.25):  # inside the finite region for a < 0: sigma^2 = e^0.8 < 3
        loss, grad, hess = ref_alpha(mu, s, d, w, a)
        assert loss == pytest.approx(x_space_alpha(mu, math.exp(2 * s), d, w, a), rel=1e-8)
        step = 1e-5
        for i, e in enumerate(np.eye(2) * step):
            up, down = ref_alpha(mu + e[0], s + e[1], d, w, a), ref_alpha(mu - e[0], s - e[1], d, w, a)
            assert grad[i] == pytest.approx((up[0] - down[0]) / (2 * step), rel=1e-7, abs=1e-10)
            np.testing.assert_allclose(hess[:, i], (up[1] - down[1]) / (2 * step), rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Folds against alpha


ALPHAS = (-0.5, 0.0, 0.001, 0.01, 0.1, 0.5)


@pytest.fixture(scope="module")
def folds() -> pd.DataFrame:
    """The folds at weights 1/2 and 3/4, continued from a = 1/2 down to a = -1/2."""
    return fold_versus_alpha((0.5, 0.75), ALPHAS)


def _at(folds: pd.DataFrame, weight: float, alpha: float, branch: str, event: str = "birth") -> pd.Series:
    rows = folds[
        (folds["weight"] == weight)
        & np.isclose(folds["alpha"], alpha, rtol=0, atol=1e-12)
        & (folds["branch"] == branch)
        & (folds["event"] == event)
    ]
    assert len(rows) == 1, (weight, alpha, branch, event)
    return rows.iloc[0]


def _rough(row: pd.Series) -> np.ndarray:
    """A start for the reference: the fold rounded to 2 decimals (the reference finds the root itself)."""
    return np.round([row["mu"], 0.5 * math.log(row["sigma2"]), row["separation"]], 2)


def test_folds_match_an_independent_root_finder_across_alpha(folds):
    assert (folds["residual"] <= 1e-10).all()
    assert set(folds.loc[folds["requested"], "alpha"].round(12)) >= set(ALPHAS)
    checks = [
        (0.5, 0.5, "heavier mode", "birth"),  # the Hellinger point the continuation starts from
        (0.5, -0.5, "heavier mode", "birth"),  # a < 0, beyond the core's fold polish
        (0.75, 0.1, "heavier mode", "birth"),  # the narrow bistable window at 3/4 just above the cusp
        (0.75, 0.1, "covering", "death"),
    ]
    for weight, a, branch, event in checks:
        row = _at(folds, weight, a, branch, event)
        mu, s, d = ref_alpha_fold(*_rough(row), weight, a)
        assert row["separation"] == pytest.approx(d, rel=1e-6, abs=1e-6), (weight, a, branch)
        assert row["mu"] == pytest.approx(mu, rel=1e-6, abs=1e-6)
        assert row["sigma2"] == pytest.approx(math.exp(2 * s), rel=1e-6)
    # At 3/4 and a = 0.1 the heavier mode is born just 0.02 sd before the covering minimum dies.
    window = (
        _at(folds, 0.75, 0.1, "covering", "death")["separation"]
        - _at(folds, 0.75, 0.1, "heavier mode")["separation"]
    )
    assert 0.0 < window < 0.05


def test_small_alpha_tends_to_the_reverse_kl_fold(folds):
    """At a = 0 the fold is the reverse KL's (test_structure's reference); as a -> 0+ the folds tend to it."""
    for weight, branch in ((0.5, "heavier mode"), (0.75, "lighter mode")):
        zero = _at(folds, weight, 0.0, branch)
        mu, s, d = ref_fold(*_rough(zero), weight)
        assert zero["separation"] == pytest.approx(d, rel=1e-6)
        gaps = [_at(folds, weight, a, branch)["separation"] - d for a in (0.1, 0.01, 0.001)]
        assert gaps[0] > gaps[1] > gaps[2] > 0  # from above, shrinking ...
        assert gaps[2] < 5e-3 and 8 < gaps[1] / gaps[2] < 12  # ... about linearly in a


def test_weight_three_quarters_folds_meet_in_a_cusp_and_the_lighter_mode_stays(folds):
    """Going down in alpha at 3/4, the heavier mode's birth and the covering minimum's death meet (a
    cusp near a = 0.055, as the reverse KL's cusp weight, 0.743, lies below 3/4); below it only the
    lighter mode is born."""
    mine = folds[folds["weight"] == 0.75]
    ends = mine[mine["end"].str.startswith("meets another fold")]
    assert set(zip(ends["branch"], ends["event"])) == {("heavier mode", "birth"), ("covering", "death")}
    assert ends["alpha"].nunique() == 1 and 0.03 < ends["alpha"].iloc[0] < 0.1
    assert np.ptp(ends["separation"]) < 0.01
    below = mine[mine["alpha"] < ends["alpha"].iloc[0]]
    assert set(below["branch"]) == {"lighter mode"}


def test_continuation_stops_once_a_fold_passes_the_separation_cap(folds, monkeypatch):
    start = folds[np.isclose(folds["alpha"], 0.5) & (folds["weight"] == 0.5)]
    monkeypatch.setattr(alpha_analysis, "_start_folds", lambda *args: start.reset_index(drop=True))
    capped = fold_versus_alpha((0.5,), (0.5, 0.6, 0.7, 0.8), max_separation=7.0)
    for _, line in capped.groupby("branch"):  # the two mirror-image births
        last = line.loc[line["alpha"].idxmax()]
        assert last["end"] == "passes 7 sd" and last["separation"] > 7.0
        assert (line.drop(index=last.name)["separation"] <= 7.0).all()
        assert 0.6 < last["alpha"] < 0.7
    # The reference puts the births at 6.71 sd for a = 0.6 and 7.61 sd for a = 0.7: 7 lies between.
    assert ref_alpha_fold(-3.3, 0.16, 6.7, 0.5, 0.6)[2] < 7.0 < ref_alpha_fold(-3.7, 0.13, 7.6, 0.5, 0.7)[2]


# ---------------------------------------------------------------------------------------------
# The onset table


def test_multistable_intervals_from_births_and_deaths():
    assert multistable_intervals(np.array([4.8, 4.8]), np.array([])) == [(4.8, np.inf)]
    assert multistable_intervals(np.array([4.16, 5.53]), np.array([4.18])) == [(4.16, 4.18), (5.53, np.inf)]
    assert multistable_intervals(np.array([]), np.array([])) == []


def hand_made_sweep() -> pd.DataFrame:
    """Alpha rows whose answer is known (module docstring of the test below)."""
    rows = []
    for alpha in (-0.5, 0.5, 1.5):
        for separation in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
            for init_mu in (-3.0, 0.0, 3.0):
                mu, sigma2, edge, status = 0.0, 1.0 + 0.25 * separation**2, False, "converged"
                if alpha == 0.5 and separation >= 4.0 and init_mu != 0.0:
                    mu, sigma2 = np.sign(init_mu) * separation / 2, 1.0  # a mode minimum each side
                if alpha == 0.5 and separation == 5.0 and init_mu > 0:
                    status = "max_steps"  # not converged: it does not count
                if alpha == -0.5 and separation >= 2.0:
                    mu, sigma2, edge = 0.3 * separation * np.sign(init_mu), 3.0, True  # on the edge
                if alpha == 1.5:
                    mu += 1e-7 * init_mu  # within the same-optimum tolerance
                rows.append(
                    dict(
                        divergence="alpha",
                        alpha=alpha,
                        estimator="quadrature",
                        optimizer="adam",
                        lr=0.05,
                        separation=separation,
                        weight=0.5,
                        center=0.0,
                        component_var=1.0,
                        init_mu=init_mu,
                        init_sigma2=1.0,
                        mu=mu,
                        sigma2=sigma2,
                        loss=1.0,
                        kl_forward=np.nan,
                        kl_reverse=np.nan,
                        converged=status == "converged",
                        status=status,
                        on_boundary=edge,
                    )
                )
    return pd.DataFrame(rows)


def hand_made_folds() -> pd.DataFrame:
    """Folds at the swept alphas: one interior birth at a = -1/2 (above the grid onset), both modes at 1/2."""
    rows = [(-0.5, "heavier mode", "birth", 2.5), (0.5, "heavier mode", "birth", 3.7)]
    rows += [(0.5, "lighter mode", "birth", 3.7)]
    return pd.DataFrame(
        [
            dict(weight=0.5, alpha=a, branch=b, event=e, separation=d, mu=-d / 2, sigma2=1.2, residual=0.0)
            | dict(requested=True, end="")
            for a, b, e, d in rows
        ]
    )


def test_onset_table_on_a_hand_made_sweep():
    """a = 1/2: one covering minimum below 4, then three (one per mode and the covering one from 0);
    a = -1/2: from 2 on, three minima on the edge of the finite region; a = 3/2: one minimum (runs
    1e-7 apart are one optimum)."""
    table = onset_table(hand_made_sweep(), hand_made_folds(), check_stability=False).set_index("alpha")
    assert list(table.index) == [-0.5, 0.5, 1.5]
    half = table.loc[0.5]
    assert (half["onset_grid"], half["onset_lower"], half["n_optima_max"]) == (4.0, 3.0, 3)
    assert half["fold_separation"] == 3.7 and half["fold_branch"] == "both modes"
    assert half["exact_multistable"] == "from 3.7000" and half["note"] == ""
    assert half["n_runs"] == 18 and half["n_not_converged"] == 1
    edge = table.loc[-0.5]
    assert (edge["onset_grid"], edge["onset_lower"], edge["boundary_cells"]) == (2.0, 1.0, 5)
    assert edge["note"].startswith("multistable below the interior fold: a minimum born on the edge")
    one = table.loc[1.5]
    assert np.isnan(one["onset_grid"]) and one["n_optima_max"] == 1 and one["note"].startswith("a >= 1")


def test_the_main_pipeline_leaves_alpha_rows_to_the_alpha_section():
    from test_analysis import synthetic_table

    from analysis.data import prepare
    from analysis.pipeline import analyse

    base = synthetic_table()
    mixed = prepare(pd.concat([base, hand_made_sweep()], ignore_index=True))
    result = analyse(mixed, check_stability=False, exact=False)
    alone = analyse(prepare(base), check_stability=False, exact=False)
    assert "alpha" not in set(result.runs["divergence"])
    pd.testing.assert_frame_equal(result.boundaries, alone.boundaries)
    with pytest.raises(ValueError, match="alpha family"):
        analyse(prepare(hand_made_sweep()), check_stability=False, exact=False)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_writes_the_alpha_figures_and_tables(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_cli(
        "-m",
        "divergence=alpha",
        "divergence.alpha=-0.5,0.5",
        "separation=range(3.5,7.1,0.5)",
        "weight=0.5",
        "init_mu=-3,0,3",
        f"hydra.sweep.dir={sweep}",
        "hydra.sweeper.latest_link=null",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    analysed = subprocess.run(
        [sys.executable, "-m", "analysis", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert analysed.returncode == 0, analysed.stderr
    assert "Traceback" not in analysed.stderr
    for name in ("alpha_phase_diagram", "alpha_folds", "alpha_fits"):
        assert (sweep / "figures" / f"{name}.png").stat().st_size > 10_000
        assert (sweep / "figures" / f"{name}.svg").exists()
    assert not (sweep / "figures" / "phase_diagram.png").exists()  # no other divergence swept
    onsets = pd.read_csv(sweep / "tables" / "alpha_onsets.csv").set_index("alpha")
    assert list(onsets.index) == [-0.5, 0.5]
    # The sweep's fits and the continuation are independent: the exact birth lies inside the grid's bracket.
    for a in (-0.5, 0.5):
        row = onsets.loc[a]
        assert row["onset_lower"] < row["fold_separation"] <= row["onset_grid"]
    assert onsets.loc[0.5, "onset_grid"] == 6.5  # first swept separation past the fold at 6.14 sd
    # At a = -0.5 the covering fit on the edge splits first (closed form: d^2 = 2|a| trigamma(|a|/2)),
    # before the interior fold: that is the exact onset, and it too lies in the grid's bracket.
    from scipy.special import polygamma

    split = math.sqrt(2 * 0.5 * polygamma(1, 0.25))
    assert onsets.loc[-0.5, "edge_split"] == pytest.approx(split, rel=1e-9)
    assert onsets.loc[-0.5, "exact_onset"] == pytest.approx(split, rel=1e-9)
    assert split < onsets.loc[-0.5, "fold_separation"]
    assert onsets.loc[-0.5, "onset_lower"] < split <= onsets.loc[-0.5, "onset_grid"]
    assert np.isnan(onsets.loc[0.5, "edge_split"])
    summary = (sweep / "tables" / "summary.md").read_text()
    assert summary.startswith("# The alpha family") and "## Onset of multistability against alpha" in summary
    folds = pd.read_csv(sweep / "tables" / "alpha_folds.csv")
    assert (folds["residual"] <= 1e-10).all() and folds["alpha"].min() == pytest.approx(-0.5)
    assert "note: alpha, weight 0.5: the sweep finds two minima or more" in analysed.stdout


def test_an_edge_optimum_is_a_minimum_or_a_saddle_by_its_curvature_along_the_edge():
    # a = -1, w = 1/2, d = 4 > pi: past the edge split, the symmetric point on the edge (sigma^2 = 2,
    # mu = 0) is a maximum along the edge. A start at mu = 0 stays there by symmetry and is
    # stationary with an outward push; the curvature along the edge makes it a saddle, and the
    # fits from either side end in the two mode minima inside.
    from kl_sweep.table import run_rows

    rows = pd.DataFrame(
        {
            "separation": 4.0,
            "weight": 0.5,
            "center": 0.0,
            "component_var": 1.0,
            "init_mu": [-0.5, 0.0, 0.5],
            "init_sigma2": 1.9,
            "optimizer.lr": 0.05,
            "optimizer.max_steps": 5000,
            "optimizer.tol": 1e-8,
            "divergence.alpha": -1.0,
        }
    )
    shared = {
        "divergence.name": "alpha",
        "estimator.name": "quadrature",
        "optimizer.name": "adam",
        "polish": True,
    }
    table = run_rows(rows, shared)
    assert (table["status"] == "converged").all() and table["on_boundary"].tolist() == [False, True, False]
    optima, cells = alpha_analysis.classify_alpha(table)
    kinds = dict(zip(optima["on_boundary"], optima["kind"], strict=False))
    assert kinds[True] == "saddle" and kinds[False] == "minimum"
    assert cells["n_optima"].item() == 2 and cells["n_boundary"].item() == 0
