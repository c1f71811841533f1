"""Tests of ``analysis``: distinct optima, classes and boundaries on hand-made tables, and the CLI.

The synthetic sweep (:func:`synthetic_table`) has a known answer: the forward rows all sit on the
moment-matched fit; the reverse rows have one covering optimum below separation 4 and, from 4 on,
three (the covering one, reached from init_mu = 0, and one per mode), with a mode-minus-covering
loss difference of ``SWITCH - separation``, so the global minimum turns mode-seeking at exactly
``SWITCH``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import classify
from analysis.data import prepare
from analysis.pipeline import analyse
from analysis.tables import markdown_table, write_tables

REPO = Path(__file__).resolve().parents[1]
SEPARATIONS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
WEIGHTS = (0.5, 0.75)
INITS = (-4.0, -2.0, 0.0, 2.0, 4.0)
ONSET = 4.0
SWITCH = 5.2
FIGURES = ("phase_diagram", "bifurcation", "basin_map", "fit_overlays", "loss_landscape")


def contract_row(divergence: str, separation: float, weight: float, init_mu: float, **fit) -> dict:
    """One results row with every contract column; ``fit`` gives mu, sigma2, loss and optionally status."""
    status = fit.pop("status", "converged")
    row = dict(
        divergence=divergence,
        estimator="quadrature",
        optimizer="adam",
        lr=0.05,
        separation=separation,
        weight=weight,
        center=0.0,
        component_var=1.0,
        init_mu=init_mu,
        init_sigma2=1.0,
        kl_forward=np.nan,
        kl_reverse=np.nan,
        grad_norm=1e-10,
        steps=100,
        converged=status == "converged",
        status=status,
        config_hash=f"{divergence}-{separation}-{weight}-{init_mu}",
        sweep_id="synthetic",
        job_num=0,
    )
    row.update(fit)
    return row


def moment_matched(separation: float, weight: float) -> tuple[float, float]:
    return separation * (0.5 - weight), 1.0 + weight * (1.0 - weight) * separation**2


def reverse_fit(separation: float, weight: float, init_mu: float) -> dict:
    """The hand-made reverse optimum an initialisation reaches (see the module docstring)."""
    mean, var = moment_matched(separation, weight)
    covering_loss = 1.0 + 0.1 * separation
    if separation < ONSET or init_mu == 0.0:
        return dict(mu=mean, sigma2=0.9 * var, loss=covering_loss)
    side = np.sign(init_mu)
    # Left (heavier) mode: covering loss + (SWITCH - s); the right one is 1 nat worse.
    loss = covering_loss + (SWITCH - separation) + (1.0 if side > 0 else 0.0)
    return dict(mu=side * separation / 2, sigma2=1.0, loss=loss)


def synthetic_table(with_failures: bool = True) -> pd.DataFrame:
    rows = []
    for s in SEPARATIONS:
        for w in WEIGHTS:
            mean, var = moment_matched(s, w)
            for x0 in INITS:
                rows.append(contract_row("forward", s, w, x0, mu=mean, sigma2=var, loss=0.05 * s))
                rows.append(contract_row("reverse", s, w, x0, **reverse_fit(s, w, x0)))
            if with_failures:  # one run per reverse cell that ran out of steps somewhere odd
                rows.append(
                    contract_row("reverse", s, w, 9.0, mu=7.0, sigma2=0.3, loss=9.0, status="max_steps")
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def result():
    return analyse(prepare(synthetic_table()), check_stability=False, exact=False)


def boundary(result, divergence: str, weight: float) -> pd.Series:
    table = result.boundaries
    rows = table[(table["divergence"] == divergence) & (table["weight"] == weight)]
    assert len(rows) == 1
    return rows.iloc[0]


def cell_table(endpoints: list[tuple[float, float]], converged: list[bool] | None = None) -> pd.DataFrame:
    """One reverse cell (separation 8, weight 0.5) whose runs ended at the given (mu, sigma2)."""
    converged = converged or [True] * len(endpoints)
    rows = [
        contract_row(
            "reverse",
            8.0,
            0.5,
            float(i),
            mu=mu,
            sigma2=s2,
            loss=1.0,
            status="converged" if ok else "diverged",
        )
        for i, ((mu, s2), ok) in enumerate(zip(endpoints, converged, strict=True))
    ]
    return prepare(pd.DataFrame(rows))


# --- distinct optima ---------------------------------------------------------------------------


def test_endpoints_within_tolerance_are_one_optimum_and_others_are_distinct():
    table = cell_table([(-4.0, 1.0), (-4.0 + 1e-5, 1.0), (0.0, 12.0), (4.0, 1.0), (4.0 + 5e-3, 1.0)])
    assert classify.label_runs(table, tol=1e-3).tolist() == [0, 0, 1, 2, 3]
    # A looser tolerance merges the two right-hand endpoints (5e-3 apart, sd 1).
    assert classify.label_runs(table, tol=1e-2).tolist() == [0, 0, 1, 2, 2]


def test_equal_means_with_different_variances_are_distinct_even_when_interleaved():
    table = cell_table([(0.0, 1.0), (1e-9, 5.0), (2e-9, 1.0 + 1e-6), (3e-9, 5.0)])
    labels = classify.label_runs(table)
    assert labels[0] == labels[2] and labels[1] == labels[3] and labels[0] != labels[1]


def test_non_converged_rows_get_no_optimum_and_do_not_count():
    table = cell_table([(-4.0, 1.0), (123.0, 0.01), (4.0, 1.0)], converged=[True, False, True])
    labels = classify.label_runs(table)
    assert labels.tolist() == [0, -1, 1]
    optima = classify.distinct_optima(table, labels)
    assert optima["n_runs"].tolist() == [1, 1]
    assert optima["share"].tolist() == [0.5, 0.5]
    cells = classify.cell_outcomes(table, optima)
    assert cells[["n_runs", "n_converged", "n_not_converged", "n_optima"]].iloc[0].tolist() == [3, 2, 1, 2]


def test_non_finite_fit_counts_as_not_converged_even_if_flagged_converged():
    table = cell_table([(-4.0, 1.0), (np.nan, 1.0)])
    assert table["converged"].tolist() == [True, False]


# --- optimum types and cell outcomes -----------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "mu", "sigma2", "expected"),
    [
        (0.75, -1.5, 1.0 + 0.1875 * 36, classify.COVERING),  # the moment-matched fit itself
        (0.75, -3.0, 1.0, classify.HEAVIER),  # on the left component, which has weight 0.75
        (0.75, 3.0, 1.0, classify.LIGHTER),
        (0.25, 3.0, 1.0, classify.HEAVIER),  # weight < 1/2: the right component is the heavier
        (0.25, -3.0, 1.0, classify.LIGHTER),
        (0.5, -3.0, 1.0, classify.HEAVIER),  # equal weights: the left mode is called the heavier
        (0.5, 3.0, 1.0, classify.LIGHTER),
        (0.5, 0.0, 5.0, classify.COVERING),  # sigma2 / Var_P = 5 / 10 = 1/2 exactly: covering
        (0.5, 0.0, 4.99, classify.LIGHTER),  # just below 1/2, and mu = center is not left of it
    ],
)
def test_optimum_types(weight, mu, sigma2, expected):
    frame = pd.DataFrame(
        dict(mu=[mu], sigma2=[sigma2], separation=[6.0], weight=[weight], center=[0.0], component_var=[1.0])
    )
    assert classify.optimum_types(frame).tolist() == [expected]


def test_cell_outcomes_and_order_parameter(result):
    cells = result.cells.set_index(["divergence", "weight", "separation"]).sort_index()
    assert (cells.loc["forward", "outcome"] == classify.COVERING).all()
    assert np.allclose(cells.loc["forward", "order_parameter"], 1.0)
    rev = cells.loc["reverse"]
    below = rev[rev.index.get_level_values("separation") < ONSET]
    above = rev[rev.index.get_level_values("separation") >= ONSET]
    assert (below["outcome"] == classify.COVERING).all() and (below["n_optima"] == 1).all()
    assert (above["outcome"] == classify.MULTISTABLE).all() and (above["n_optima"] == 3).all()
    assert np.allclose(below["order_parameter"], 0.9)
    # From the onset on: 1 of 5 runs covering (ratio 0.9), 4 on modes with sigma2 = 1.
    s, w = 6.0, 0.75
    expected = (0.9 + 4 * 1.0 / (1.0 + w * (1 - w) * s**2)) / 5
    assert rev.loc[(w, s), "order_parameter"] == pytest.approx(expected, rel=1e-12)
    assert (rev["n_not_converged"] == 1).all() and (cells.loc["forward", "n_not_converged"] == 0).all()


def test_single_mode_seeking_optimum_is_classified_by_its_mode():
    table = cell_table([(-4.0, 1.0), (-4.0, 1.0)])
    optima = classify.distinct_optima(table, classify.label_runs(table))
    assert classify.cell_outcomes(table, optima)["outcome"].tolist() == [classify.HEAVIER]
    table = cell_table([(4.0, 1.0)], converged=[False])
    optima = classify.distinct_optima(table, classify.label_runs(table))
    assert classify.cell_outcomes(table, optima)["outcome"].tolist() == [classify.NO_MINIMUM]


def test_saddles_do_not_count_as_optima():
    table = cell_table([(-4.0, 1.0), (0.0, 12.0), (4.0, 1.0)])
    optima = classify.distinct_optima(table, classify.label_runs(table))
    optima.loc[optima["mu"] == 0.0, "kind"] = classify.SADDLE
    cells = classify.cell_outcomes(table, optima)
    assert cells[["n_optima", "n_saddle_runs"]].iloc[0].tolist() == [2, 1]


def test_stationary_kind_uses_the_hessian_of_the_core_divergence():
    from analysis.stability import stationary_kind

    optima = pd.DataFrame(
        dict(
            divergence=["reverse", "reverse", "forward"],
            separation=8.0,
            weight=0.5,
            center=0.0,
            component_var=1.0,
            mu=[-4.0, 0.0, 0.0],
            sigma2=[1.0, 0.25, 17.0],
        )
    )
    # On a mode: a minimum. A narrow Q in the dip between the modes curves down in mu: a saddle.
    # The forward KL is convex around the moment-matched fit (mean 0, variance 1 + 16 = 17).
    assert stationary_kind(optima).tolist() == [classify.MINIMUM, classify.SADDLE, classify.MINIMUM]


def test_overlay_densities_are_normalised_and_match_scipy():
    from scipy import integrate, stats

    from analysis.numerics import gaussian_density, mixture_density

    cell = pd.Series(dict(separation=6.0, weight=0.75, center=1.0, component_var=2.0))
    x = np.linspace(-25.0, 25.0, 20001)
    p = mixture_density(cell, x)
    want = 0.75 * stats.norm.pdf(x, -2.0, np.sqrt(2.0)) + 0.25 * stats.norm.pdf(x, 4.0, np.sqrt(2.0))
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-300)
    q = gaussian_density(x, np.array([-2.0, 3.0]), np.array([0.5, 9.0]))
    np.testing.assert_allclose(q[1], stats.norm.pdf(x, 3.0, 3.0), rtol=1e-12, atol=1e-300)
    assert integrate.trapezoid(p, x) == pytest.approx(1.0, abs=1e-9)
    assert integrate.trapezoid(q, x, axis=1) == pytest.approx([1.0, 1.0], abs=1e-9)


def test_landscape_grid_is_the_reverse_kl_in_nats():
    from scipy import integrate, stats

    from analysis.numerics import divergence_grid

    cell = pd.Series(dict(separation=8.0, weight=0.75, center=0.0, component_var=1.0))
    mu, log_sigma = np.array([-4.0, 0.5]), np.array([0.0, 1.0])
    grid = divergence_grid("reverse", cell, mu, log_sigma)
    assert grid.shape == (2, 2)

    def reverse_kl(m: float, ls: float) -> float:
        q = stats.norm(m, np.exp(ls))
        log_p = lambda t: np.log(0.75 * stats.norm.pdf(t, -4.0) + 0.25 * stats.norm.pdf(t, 4.0))
        f = lambda t: q.pdf(t) * (q.logpdf(t) - log_p(t))
        return integrate.quad(
            f, m - 14 * np.exp(ls), m + 14 * np.exp(ls), points=[-4.0, 0.0, 4.0], limit=200
        )[0]

    want = [[reverse_kl(m, ls) for m in mu] for ls in log_sigma]
    np.testing.assert_allclose(grid, want, rtol=1e-7)
    assert grid[0, 0] == pytest.approx(-np.log(0.75), rel=1e-3)  # Q on the heavy mode: about -log w


# --- phase boundaries ----------------------------------------------------------------------------


@pytest.mark.parametrize("weight", WEIGHTS)
def test_onset_and_number_of_optima(result, weight):
    rev = boundary(result, "reverse", weight)
    assert rev["onset_separation"] == ONSET
    assert rev["onset_lower"] == 3.0
    assert rev["n_optima_max"] == 3
    fwd = boundary(result, "forward", weight)
    assert np.isnan(fwd["onset_separation"]) and fwd["n_optima_max"] == 1


@pytest.mark.parametrize("weight", WEIGHTS)
def test_global_switch_is_interpolated_to_the_zero_of_the_loss_difference(result, weight):
    rev = boundary(result, "reverse", weight)
    assert rev["global_switch_separation"] == pytest.approx(SWITCH, abs=1e-12)
    assert rev["method"] == "interpolated"
    assert (rev["switch_lower"], rev["switch_upper"]) == (5.0, 6.0)
    assert (rev["n_runs"], rev["n_not_converged"]) == (len(SEPARATIONS) * 6, len(SEPARATIONS))
    fwd = boundary(result, "forward", weight)
    assert np.isnan(fwd["global_switch_separation"]) and pd.isna(fwd["method"])


def test_global_switch_falls_back_to_the_grid_when_the_branches_do_not_coexist():
    # One optimum that slides from covering (s <= 3) onto the heavier mode (s >= 4); at s = 6 the
    # start at init_mu = 4 finds the lighter mode too: two optima, the onset of multistability.
    rows = []
    for s in SEPARATIONS:
        mean, var = moment_matched(s, 0.75)
        for x0 in INITS:
            if s <= 3:
                fit = dict(mu=mean, sigma2=var, loss=0.1)
            elif s == 6 and x0 == 4.0:
                fit = dict(mu=s / 2, sigma2=1.0, loss=1.4)
            else:
                fit = dict(mu=-s / 2, sigma2=1.0, loss=0.3)
            rows.append(contract_row("reverse", s, 0.75, x0, **fit))
    result = analyse(prepare(pd.DataFrame(rows)), check_stability=False, exact=False)
    rev = boundary(result, "reverse", 0.75)
    assert rev["global_switch_separation"] == 4.0 and rev["method"] == "grid"
    assert rev["switch_lower"] == 3.0
    assert (rev["onset_separation"], rev["onset_lower"], rev["n_optima_max"]) == (6.0, 5.0, 2)
    outcomes = [classify.COVERING] * 3 + [classify.HEAVIER] * 2 + [classify.MULTISTABLE]
    assert result.cells["outcome"].tolist() == outcomes


def test_boundaries_not_bracketed_by_the_sweep_are_nan():
    # Multistable, with the mode-seeking minimum already global, from the smallest separation on.
    rows = []
    for s in (4.0, 5.0):
        mean, var = moment_matched(s, 0.5)
        rows += [contract_row("reverse", s, 0.5, 0.0, mu=mean, sigma2=var, loss=2.0)]
        rows += [
            contract_row("reverse", s, 0.5, x0, mu=np.sign(x0) * s / 2, sigma2=1.0, loss=1.0)
            for x0 in (-2, 2)
        ]
    result = analyse(prepare(pd.DataFrame(rows)), check_stability=False, exact=False)
    rev = boundary(result, "reverse", 0.5)
    assert rev["onset_separation"] == 4.0 and np.isnan(rev["onset_lower"])
    assert np.isnan(rev["global_switch_separation"]) and pd.isna(rev["method"])


# --- tables --------------------------------------------------------------------------------------


def test_written_tables_hold_the_known_boundary(result, tmp_path):
    paths = write_tables(result, tmp_path)
    assert {p.name for p in paths} == {
        "phase_boundaries.csv",
        "phase_boundaries.md",
        "summary.md",
        "optima.csv",
        "phases.csv",
    }
    table = pd.read_csv(tmp_path / "phase_boundaries.csv")
    assert list(table.columns[:4]) == ["divergence", "weight", "onset_separation", "onset_lower"]
    assert len(table) == 4  # 2 divergences x 2 weights
    rev = table[table["divergence"] == "reverse"]
    assert (rev["onset_separation"] == ONSET).all() and np.allclose(rev["global_switch_separation"], SWITCH)
    assert set(rev["method"]) == {"interpolated"}
    summary = (tmp_path / "summary.md").read_text()
    assert "## forward KL(P||Q)" in summary and "## reverse KL(Q||P)" in summary
    # The reverse cell at separation 6, weight 0.5: three optima, 2 of 5 runs on each mode.
    assert "| 6 | 0.5 | multistable | 0 | heavier mode | -3 | 1 | 0.8 | 0.4 | 2 | 6 | 1 |" in summary
    assert "| 6 | 0.5 | multistable | 1 | covering | 0 | 9 | 1.6 | 0.2 | 1 | 6 | 1 |" in summary
    md = (tmp_path / "phase_boundaries.md").read_text()
    assert "| reverse | 0.5 | 4 | 3 | 3 | 5.2 | 5 | 6 | interpolated | 36 | 6 |" in md


def test_markdown_table_formats_numbers_and_missing_values():
    table = pd.DataFrame(dict(name=["a", "b"], value=[1.0 / 3.0, np.nan], count=[1, 2]))
    assert markdown_table(table) == (
        "| name | value | count |\n|---|---:|---:|\n| a | 0.333333 | 1 |\n| b | — | 2 |\n"
    )


# --- command line --------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "analysis", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_every_figure_and_table(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    synthetic_table().to_parquet(sweep / "results.parquet")
    done = run_cli(str(sweep), "--weight", "0.75")
    assert done.returncode == 0, done.stderr
    for name in FIGURES:
        png, svg = sweep / "figures" / f"{name}.png", sweep / "figures" / f"{name}.svg"
        assert png.stat().st_size > 0 and svg.stat().st_size > 0
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            width, height = image.size
            assert width >= 800 and height >= 500
            assert len(image.convert("L").getcolors(1 << 20)) > 50  # not a blank canvas
        assert ET.parse(svg).getroot().tag.endswith("svg")
    for name in ("phase_boundaries.csv", "phase_boundaries.md", "summary.md", "optima.csv", "phases.csv"):
        assert (sweep / "tables" / name).stat().st_size > 0
    table = pd.read_csv(sweep / "tables" / "phase_boundaries.csv")
    assert set(zip(table["divergence"], table["weight"], strict=True)) == {
        (d, w) for d in ("forward", "reverse") for w in WEIGHTS
    }


def test_cli_missing_directory_exits_2_and_writes_nothing(tmp_path):
    missing = tmp_path / "no-such-sweep"
    done = run_cli(str(missing))
    assert done.returncode == 2
    assert str(missing) in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not missing.exists()


def test_cli_directory_without_results_exits_2_and_writes_nothing(tmp_path):
    done = run_cli(str(tmp_path))
    assert done.returncode == 2
    assert str(tmp_path) in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
