"""The exact phase structure in d dimensions (analysis/structure_nd.py, the d > 1 landscape and the
generalised bifurcation core), checked against independent methods:

- the autograd jets of the d > 1 landscape against the fitting core's closed-form derivatives;
- ``full``: its folds against scipy's root finder on the 1-D problem at the Mahalanobis
  separation (tests/test_structure.py's ``ref_fold``), in d = 2 and 5, both directions;
- ``diag``: a fold pair 8e-4 apart against a dense multistart of the fitting core;
- ``iso``: a symmetry-breaking pitchfork against the core's Hessian on either side and a
  multistart.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_structure import ref_fold, ref_maxwell

from analysis.structure_nd import continued_points, mahalanobis_unit
from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.gaussians import Family
from kl_sweep.core.landscape import ReducedLandscape
from kl_sweep.core.optim import Adam
from kl_sweep.core.reduction import ReducedObjective, SharedPair


def _fits(family: Family, separation: float, weight: float, rho: float, direction: str = "axis"):
    """Converged reverse-KL fits from 61 x 3 starts along the separation (the fitting core)."""
    starts, variances = torch.linspace(-3, 3, 61, dtype=torch.float64), torch.tensor([0.3, 1.0, 3.0])
    m, v = (x.flatten() for x in torch.meshgrid(starts, variances.double(), indexing="ij"))
    one = torch.ones_like(m)
    target = SharedPair(separation * one, weight * one, 0 * one, one, rho * one, family.dim, direction)
    steps = torch.full_like(m, 20_000, dtype=torch.long)
    problem = Problem(target.line(), m, v, 0.05 * one, steps, 1e-11 * one, target=target, family=family)
    result = fit(problem, Settings(DIVERGENCES["reverse"], Quadrature(), Adam()))
    assert (result.status == Status.CONVERGED).all()
    return result.theta


def _distinct(values: torch.Tensor) -> np.ndarray:
    return np.unique(np.round(values.numpy(), 4))


@pytest.mark.parametrize(
    "name, dim, direction", [("full", 3, "diagonal"), ("diag", 2, "axis"), ("iso", 4, "axis")]
)
def test_landscape_jets_agree_with_the_cores_closed_forms(name, dim, direction):
    family = Family(name, dim)
    landscape = ReducedLandscape(family, direction, correlation=0.6)
    generator = torch.Generator().manual_seed(0)
    theta = 0.4 * torch.randn(5, family.n_params, generator=generator, dtype=torch.float64)
    u = torch.cat([theta, torch.tensor([[3.0, 0.7]], dtype=torch.float64).expand(5, 2)], -1)
    jet, closed = landscape.jet(u, order=2), landscape.theta_jet(u)
    np.testing.assert_allclose(jet.loss, closed.loss, rtol=1e-12)
    np.testing.assert_allclose(jet.gradient, closed.gradient, atol=1e-11)
    np.testing.assert_allclose(jet.hessian, closed.hessian, atol=1e-10)
    # and the value is the core's exact reverse KL
    objective = ReducedObjective.build(DIVERGENCES["reverse"], Quadrature(12), landscape.target(u), family)
    np.testing.assert_allclose(jet.loss, objective(theta), rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dim, direction", [(2, "axis"), (2, "diagonal"), (5, "axis"), (5, "diagonal")])
def test_full_folds_sit_at_the_lines_folds_of_the_mahalanobis_separation(dim, direction):
    """Continued in the full family's own d(d + 3)/2 parameters, every fold lies where scipy's root
    finder puts the 1-D fold, at separation Delta / sqrt(u^T Sigma^-1 u)."""
    weight, rho = 0.75, 0.5
    _, _, line_fold = ref_fold(2.4, 0.2, 5.4, weight)
    expected = line_fold / mahalanobis_unit(dim, direction, rho)
    window = (0.8 * expected, 1.25 * expected)
    points = continued_points(Family("full", dim), direction, weight, [rho], window)
    folds = points[points["kind"] == "fold"]
    assert len(folds) == 1 and folds["event"].iloc[0] == "birth"
    assert folds["residual"].iloc[0] <= 1e-10
    assert abs(folds["separation"].iloc[0] - expected) <= 1e-6
    assert abs(folds["mahalanobis"].iloc[0] - line_fold) <= 1e-6


@pytest.mark.slow
def test_full_coexistence_point_is_the_lines_at_the_mahalanobis_separation():
    """Weight 1/2, rho 0.5 along the axis: where the covering and the mode-seeking minima of a full
    Q have equal loss is where scipy's root finder puts the line's coexistence point, scaled."""
    rho, unit = 0.5, mahalanobis_unit(2, "axis", 0.5)
    points = continued_points(Family("full", 2), "axis", 0.5, [rho], (3.0, 6.5))
    maxwell = points[points["kind"] == "maxwell"]
    assert len(maxwell) == 1 and maxwell["residual"].iloc[0] <= 1e-10
    from analysis.structure import exact_structure

    line = exact_structure("reverse", [0.5], (3.0, 8.0)).points
    row = next(line[line["kind"] == "maxwell"].itertuples())  # scipy starts from it, rounded
    start = [row.mu, 0.5 * np.log(row.sigma2), row.mu_other, 0.5 * np.log(row.sigma2_other), row.separation]
    *_, line_maxwell = ref_maxwell(*np.round(start, 2), 0.5)
    assert abs(maxwell["separation"].iloc[0] * unit - line_maxwell) <= 1e-6


@pytest.mark.slow
def test_diag_bistable_window_matches_a_multistart():
    """A mean-field Q, correlation 0.5 along the axis, weight 0.75: a minimum is born at s = 3.7488
    and dies at 3.7496 (a window 8e-4 wide), and the lighter mode's minimum is born at 4.92."""
    family = Family("diag", 2)
    points = continued_points(family, "axis", 0.75, [0.5], (0.0, 8.0))
    folds = points[points["kind"] == "fold"].sort_values("separation")
    assert list(folds["kind"]) == ["fold"] * 3
    assert list(folds["event"]) == ["birth", "death", "birth"]
    assert (folds["residual"] <= 1e-10).all()
    born, dies, lighter = folds["separation"].to_numpy()
    assert 0 < dies - born < 2e-3
    inside, before, after = 0.5 * (born + dies), born - 2e-3, dies + 2e-3
    counts = [len(_distinct(_fits(family, s, 0.75, 0.5)[:, 0])) for s in (before, inside, after)]
    assert counts == [1, 2, 1]
    assert len(_distinct(_fits(family, lighter - 0.02, 0.75, 0.5)[:, 0])) == 1
    assert len(_distinct(_fits(family, lighter + 0.02, 0.75, 0.5)[:, 0])) == 2


@pytest.mark.slow
def test_diag_fold_pair_comes_from_a_cusp_just_above_weight_075():
    """The fold pair of the test above is born at a cusp of the (separation, weight) plane: just
    below its weight the branches have the birth-death pair, just above they have none."""
    from analysis.structure_nd import weight_plane

    family = Family("diag", 2)
    lines, cusps = weight_plane(family, "axis", 0.5, (0.0, 8.0), seed_weights=(0.75,))
    assert len(cusps) == 1 and cusps["residual"].iloc[0] <= 1e-10 and len(lines)
    s, w = float(cusps["separation"].iloc[0]), float(cusps["weight"].iloc[0])
    assert 0.75 < w < 0.752 and 3.74 < s < 3.75
    for side, pair in ((-1e-3, True), (1e-3, False)):
        folds = continued_points(family, "axis", w + side, [0.5], (3.0, 4.5))
        deaths = folds[(folds["event"] == "death") & (folds["kind"] == "fold")]
        assert (len(deaths) == 1) == pair
        if pair:  # the pair straddles the cusp's separation, closer the nearer the cusp
            born = folds[folds["event"] == "birth"]["separation"]
            assert (born < s + 0.01).any() and abs(deaths["separation"].iloc[0] - s) < 0.01


@pytest.mark.slow
def test_iso_pitchfork_on_the_mirror_subspace():
    """An isotropic Q at weight 1/2, correlation 0: the centred fit dies at a pitchfork (no fold),
    where two mirror-image minima take over. Below it the centred fit's Hessian (the core's closed
    form) is positive definite, above it is not; the multistart finds the centred minimum alone
    below, and two off-centre mirror-image minima above."""
    family = Family("iso", 2)
    points = continued_points(family, "axis", 0.5, [0.0], (0.0, 8.0))
    assert list(points["kind"]) == ["pitchfork"] and list(points["event"]) == ["death"]
    s = float(points["separation"].iloc[0])
    assert points["residual"].iloc[0] <= 1e-10 and abs(points["mu"].iloc[0]) < 1e-12
    landscape = ReducedLandscape(family, correlation=0.0)
    for side, positive in ((-1e-5, True), (1e-5, False)):
        sep = s + side
        below = _fits(family, s - 0.05, 0.5, 0.0)  # the centred fit, continued by Newton to sep
        theta = below[:1].clone()
        for _ in range(30):
            u = torch.cat([theta, torch.tensor([[sep, 0.5]], dtype=torch.float64)], -1)
            jet = landscape.theta_jet(u)
            step = torch.linalg.solve(
                jet.hessian[:, family.dim :, family.dim :], jet.gradient[:, family.dim :]
            )
            theta[:, family.dim :] -= step
        least = torch.linalg.eigvalsh(landscape.theta_jet(u).hessian)[0, 0]
        assert (least > 0) == positive
    centred = _distinct(_fits(family, s - 0.05, 0.5, 0.0)[:, 0])
    assert len(centred) == 1 and abs(centred[0]) < 1e-4
    split = _distinct(_fits(family, s + 0.05, 0.5, 0.0)[:, 0])
    assert len(split) == 2 and abs(split[0] + split[1]) < 1e-4 and abs(split[0]) > 1e-3


def test_a_sweeps_special_points_make_one_table():
    """exact_points on a sweep's d > 1 rows and the line's points: one table with dim,
    correlation, direction and q_family; the pitchfork of the iso test above; full from the line."""
    from analysis.structure import exact_structure
    from analysis.structure_nd import exact_points, one_table

    rows = pd.DataFrame(
        {
            "divergence": "reverse", "dim": 2, "direction": "axis", "weight": 0.5, "correlation": 0.0,
            "center": 0.0, "component_var": 1.0, "separation": np.linspace(0.0, 5.0, 6).repeat(2),
            "q_family": ["iso", "full"] * 6,
        }
    )  # fmt: skip
    points, notes = exact_points(rows)
    assert notes == []
    iso = points[points["q_family"] == "iso"]
    assert list(iso["kind"]) == ["pitchfork"] and iso["residual"].max() <= 1e-10
    line = exact_structure("reverse", [0.5], (0.0, 6.0)).points
    full = points[(points["q_family"] == "full") & (points["kind"] == "fold")]
    folds = line[line["kind"] == "fold"]
    np.testing.assert_allclose(full["separation"], folds["separation"].iloc[:1], atol=1e-12)  # rho = 0
    table = one_table(line, points)
    assert {"dim", "correlation", "direction", "q_family", "mahalanobis"} <= set(table.columns)
    assert (table.loc[table["dim"] == 1, "q_family"] == "full").all() and set(table["dim"]) == {1, 2}
    assert len(table) == len(line) + len(points)
    missing, why = exact_points(rows.drop(columns="q_family"))
    assert missing.empty and "q_family" in why[0]


def test_a_pitchfork_lines_points_sit_at_their_own_correlations():
    """A mean-field Q with the modes along the diagonal splits at a pitchfork. The line traced from
    the pitchfork at rho = 0.5 passes rho = 0.8 (one of its steps) where the branches, continued
    afresh at rho = 0.8, put the pitchfork."""
    from analysis.structure_nd import exact_lines

    family = Family("diag", 2)
    lines = exact_lines(family, "diagonal", 0.5, [0.5], (0.0, 6.0), pitchfork_steps=4)
    assert set(lines["kind"]) == {"pitchfork"} and len(lines) >= 5
    at = lines[np.isclose(lines["correlation"], 0.8, rtol=0, atol=1e-12)]
    fresh = continued_points(family, "diagonal", 0.5, [0.8], (0.0, 6.0))
    assert list(fresh["kind"]) == ["pitchfork"] and len(at) == 1
    assert abs(at["separation"].iloc[0] - fresh["separation"].iloc[0]) <= 1e-8
    assert (np.diff(lines.sort_values("correlation")["separation"]) < 0).all()  # earlier as rho grows
