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
    window = (0.9 * expected, 1.12 * expected)
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


@pytest.mark.parametrize(
    "name, dim, direction", [("diag", 4, "axis"), ("diag", 5, "diagonal"), ("iso", 4, "axis")]
)
def test_the_whole_hessian_splits_into_the_subspace_block_and_the_breaking_block(name, dim, direction):
    """On the permutation-symmetric subspace the Hessian in all P parameters (the core's closed
    form) has exactly the eigenvalues of its block on the subspace (orthonormal basis) and of the
    breaking block, the latter g - 1 times (g: the coordinates permuted): so the ``breaking``
    monitor's sign is the whole space's stability off the subspace."""
    from kl_sweep.core.landscape import coordinate_groups

    family = Family(name, dim)
    sym = ReducedLandscape(family, direction, correlation=0.6, symmetric=True)
    whole = ReducedLandscape(family, direction, correlation=0.6)
    generator = torch.Generator().manual_seed(1)
    z = 0.5 * torch.randn(4, sym.n_state, generator=generator, dtype=torch.float64)
    params = torch.tensor([[3.0, 0.7]], dtype=torch.float64).expand(4, 2)
    u = torch.cat([z, params], -1)
    h = whole.theta_jet(torch.cat([sym.theta(u), params], -1)).hessian
    basis = sym.embedding / sym.embedding.norm(dim=0)
    inside = torch.linalg.eigvalsh(basis.T @ h @ basis)
    breaking = torch.linalg.eigvalsh(sym.breaking_block(u))
    g = max(len(group) for group in coordinate_groups(direction, dim))
    expected = torch.sort(torch.cat([inside, breaking.repeat(1, g - 1)], -1), -1).values
    np.testing.assert_allclose(torch.linalg.eigvalsh(h).numpy(), expected.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("name, direction", [("iso", "axis"), ("diag", "diagonal")])
def test_a_pitchfork_at_d20_holds_for_asymmetric_starts(name, direction):
    """d = 20, continued on the symmetric subspace (2 or 3 coordinates): the centred fit splits at a
    pitchfork. scipy's L-BFGS in all the family's parameters (21 or 40), from random asymmetric
    starts, finds only the centred minimum 0.03 below it and only the two mirror-image
    off-centre minima 0.03 above, all of them symmetric: no minimum off the subspace."""
    from scipy.optimize import minimize

    family = Family(name, 20)
    points = continued_points(family, direction, 0.5, [0.5], (0.0, 8.0))
    onset = points[points["kind"] == "pitchfork"].iloc[0]
    s = float(onset["separation"])
    assert onset["residual"] <= 1e-10
    whole = ReducedLandscape(family, direction, correlation=0.5)
    along = torch.eye(20, dtype=torch.float64)[0] if direction == "axis" else torch.full((20,), 20**-0.5)
    group = slice(1, 20) if direction == "axis" else slice(0, 20)  # the coordinates permuted
    rng = np.random.default_rng(3)
    for side, split in ((-0.03, False), (0.03, True)):
        params = torch.tensor([[s + side, 0.5]], dtype=torch.float64)

        def loss(x, params=params):
            jet = whole.theta_jet(torch.cat([torch.from_numpy(x)[None], params], -1))
            return float(jet.loss[0]), jet.gradient[0].numpy()

        ends = []
        for _ in range(6):
            x0 = np.concatenate([rng.normal(0, 1.0, 20), rng.normal(0, 0.3, family.n_scale)])
            found = minimize(loss, x0, jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 5000})
            theta = torch.from_numpy(found.x)
            for _ in range(8):  # Newton from L-BFGS's end, to rounding
                jet = whole.theta_jet(torch.cat([theta[None], params], -1))
                theta = theta - torch.linalg.solve(jet.hessian[0], jet.gradient[0])
            jet = whole.theta_jet(torch.cat([theta[None], params], -1))
            assert jet.gradient.abs().max() < 1e-10 and torch.linalg.eigvalsh(jet.hessian)[0, 0] > 0
            means, scales = theta[:20], theta[20:]
            for part in (means[group], scales[group] if name == "diag" else scales):
                assert float((part - part.mean()).abs().max()) < 1e-9  # (symmetric)
            ends.append(float(means @ along))
        positions = np.abs(ends)
        if split:
            assert positions.min() > 1e-2 and np.ptp(positions) < 1e-9
        else:
            assert positions.max() < 1e-9


def test_onsets_by_dim_take_each_cells_first_onset_and_full_from_the_line():
    """The onset against d: per cell the smallest separation of a fold or pitchfork (a coexistence
    point before it does not count); d = 1 and ``full`` (absent from the points) from the line's
    weight-1/2 fold, which scipy's root finder puts at the same separation (over the Mahalanobis
    unit for full)."""
    from analysis.dims import onsets_by_dim

    def point(dim, kind, separation):
        return {
            "divergence": "reverse", "dim": dim, "q_family": "iso", "direction": "axis",
            "correlation": 0.5, "weight": 0.5, "kind": kind, "event": "", "separation": separation,
            "mahalanobis": separation * mahalanobis_unit(dim, "axis", 0.5),
        }  # fmt: skip

    points = pd.DataFrame(
        [
            point(2, "pitchfork", 4.05),
            point(2, "maxwell", 3.5),
            point(2, "fold", 3.93),
            point(3, "pitchfork", 3.09),
        ]
    )
    onsets = onsets_by_dim(points).set_index(["q_family", "dim"])
    assert onsets.loc[("iso", 2), "kind"] == "fold" and onsets.loc[("iso", 2), "separation"] == 3.93
    assert onsets.loc[("iso", 3), "kind"] == "pitchfork" and onsets.loc[("iso", 3), "separation"] == 3.09
    _, _, fold = ref_fold(2.0, 0.1, 4.8, 0.5)
    for dim in (1, 2, 3):
        unit = 1.0 if dim == 1 else mahalanobis_unit(dim, "axis", 0.5)
        assert onsets.loc[("full", dim), "separation"] == pytest.approx(fold / unit, abs=1e-7)
    assert onsets.loc[("iso", 1), "separation"] == pytest.approx(fold, abs=1e-7)
    assert isinstance(onsets_by_dim(points[points["dim"] == 2]), str)  # one dimension: a note


@pytest.mark.slow
def test_a_coexistence_line_reaches_the_lines_coexistence_point_at_rho_0():
    """The diag Q's coexistence line (weight 1/2, along the axis), continued from its point at rho =
    0.5, reaches rho = 0 (one of its steps), where a diagonal Q of an uncorrelated P is exact and
    the point is the line's: scipy's root finder puts that at the same separation."""
    from analysis.structure_nd import _maxwell_lines, _rho_range, _special

    frame, u, landscape, partner = _special(Family("diag", 2), "axis", 0.5, [0.5], (3.0, 7.0))
    coexist = torch.as_tensor(frame["kind"].to_numpy() == "maxwell")
    assert int(coexist.sum()) == 1
    (line,) = _maxwell_lines(landscape, u[coexist], partner[coexist], _rho_range(2), 9)
    n = landscape.n_state
    assert line[:, n + 1].min() < -0.2  # (it runs to the range's end, -0.3)
    at_zero = line[np.abs(line[:, n + 1]) < 1e-12]
    *_, line_maxwell = ref_maxwell(-2.3, -0.1, 0.0, 0.6, 5.6, 0.5)
    assert len(at_zero) == 1 and abs(at_zero[0, n] - line_maxwell) <= 1e-8


@pytest.mark.slow
def test_a_fold_at_d50_holds_for_a_multistart_in_all_100_parameters():
    """d = 50, a mean-field Q along the axis, rho 0.5: continued on the symmetric subspace (4
    coordinates), the mode-seeking minimum is born at a fold. scipy's L-BFGS in all 100 parameters
    (the core's closed-form loss and gradient), from the mode, the centre and random asymmetric
    starts, finds one minimum (the centred covering fit) 0.01 below the fold and two or more (the
    covering fit and a mode's) 0.01 above it."""
    from scipy.optimize import minimize

    family = Family("diag", 50)
    points = continued_points(family, "axis", 0.5, [0.5], (0.0, 5.0))
    fold = points[points["kind"] == "fold"].iloc[0]
    assert fold["event"] == "birth" and fold["residual"] <= 1e-10
    s = float(fold["separation"])
    rng = np.random.default_rng(5)
    for side, expected in ((-0.01, 1), (0.01, 2)):
        sep = s + side
        target = SharedPair(
            *(torch.tensor([x], dtype=torch.float64) for x in (sep, 0.5, 0.0, 1.0, 0.5)), 50, "axis"
        )
        objective = ReducedObjective.build(DIVERGENCES["reverse"], Quadrature(12), target, family)

        def loss(x, objective=objective):
            value, grad, _ = objective.derivatives(torch.from_numpy(x)[None], hessian=False)
            return float(value[0]), grad[0].numpy()

        ends = []
        for mode in (-0.5 * sep, 0.0, 0.5 * sep, None, None):
            x0 = np.concatenate([rng.normal(0, 0.5, 50), rng.normal(0, 0.2, 50)])
            if mode is not None:
                x0[:50], x0[50:] = 0.0, 0.0
                x0[0] = mode
            options = {"gtol": 1e-10, "ftol": 1e-16, "maxiter": 20000}
            theta = torch.from_numpy(minimize(loss, x0, jac=True, method="L-BFGS-B", options=options).x)
            for _ in range(8):  # Newton from L-BFGS's end, to rounding
                _, grad, hess = objective.derivatives(theta[None], hessian=True)
                theta = theta - torch.linalg.solve(hess[0], grad[0])
            _, grad, hess = objective.derivatives(theta[None], hessian=True)
            assert grad.abs().max() < 1e-9 and torch.linalg.eigvalsh(hess)[0, 0] > 0
            ends.append(round(abs(float(theta[0])), 2))  # |mu_1|: 0 for the covering fit
        assert len(set(ends)) == expected, ends
