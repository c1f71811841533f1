"""d-dimensional sweeps end to end: the CLI's rows (list columns, mu and sigma2 along u), the
figures of ``python -m analysis`` for d > 1, and their closed forms against numpy's linear algebra."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from analysis.dims import FIGURES, diag_reverse_entropy_gap, diag_reverse_variance, write_dims_figures


@pytest.mark.parametrize("dim", [2, 3, 7, 20])
@pytest.mark.parametrize("rho", [-0.04, 0.2, 0.9])
def test_shrinkage_closed_forms_equal_the_inverse_and_determinant_of_R(dim, rho):
    R = (1 - rho) * np.eye(dim) + rho * np.ones((dim, dim))
    variance = 1 / np.diag(np.linalg.inv(R))
    assert diag_reverse_variance(np.array(dim), rho) == pytest.approx(variance[0], rel=1e-12)
    gap = 0.5 * (np.linalg.slogdet(R)[1] - np.log(variance).sum())
    assert diag_reverse_entropy_gap(np.array(dim), rho) == pytest.approx(gap, rel=1e-10, abs=1e-14)


@pytest.fixture(scope="module")
def bishop(tmp_path_factory):
    """The ``experiment=bishop`` preset through the CLI, and ``python -m analysis`` on it."""
    out = tmp_path_factory.mktemp("bishop")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = [sys.executable, "-m", "kl_sweep", "-m", "experiment=bishop", f"hydra.sweep.dir={out}"]
    done = subprocess.run(
        [*sweep, "hydra.sweeper.latest_link=null"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    analysed = subprocess.run(
        [sys.executable, "-m", "analysis", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert analysed.returncode == 0, analysed.stderr
    return out, pd.read_parquet(out / "results.parquet"), analysed.stdout


def test_bishop_rows_are_fig_10_2_and_readable_by_pandas(bishop):
    _, table, _ = bishop
    assert len(table) == 32 and set(table["dim"]) == {2}
    rows = table[(table["separation"] == 0) & (table["correlation"] == 0.9) & (table["q_family"] == "diag")]
    for _, row in rows.iterrows():
        cov = np.asarray(row["cov"], dtype=float)  # lower triangle: S_11, S_21, S_22
        expected = 1 - 0.9**2 if row["divergence"] == "reverse" else 1.0
        np.testing.assert_allclose(cov, [expected, 0.0, expected], rtol=1e-8, atol=1e-12)
        u = np.ones(2) / math.sqrt(2)  # direction=diagonal
        S = np.array([[cov[0], cov[1]], [cov[1], cov[2]]])
        assert row["sigma2"] == pytest.approx(u @ S @ u, rel=1e-12)
        assert row["mu"] == pytest.approx(u @ np.asarray(row["mean"]), abs=1e-12)
        assert row["var_ratio"] == pytest.approx(expected, rel=1e-8)


def test_analysis_draws_bishop_figures_from_the_rows(bishop):
    out, _, stdout = bishop
    for name in ("bishop_10_2", "bishop_10_3", "shrinkage"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 10_000
    assert "rows with dim 2 are left out of the 1-D figures" in stdout
    assert "the onset figure needs" in stdout  # two separations only: a note, not a failure
    onsets = pd.read_csv(out / "tables" / "dims_onsets.csv")
    reverse = onsets[(onsets["divergence"] == "reverse") & (onsets["q_family"] == "full")]
    assert (reverse.loc[reverse["correlation"] == 0, "onset_separation"] == 6.0).all()  # bistable at 6


def test_a_figure_without_its_rows_is_a_note(tmp_path):
    table = pd.DataFrame(
        {
            **{"dim": [2], "converged": [True], "separation": [1.0], "q_family": ["iso"]},
            **{"divergence": ["reverse"], "component_var": [1.0], "correlation": [0.0], "weight": [0.5]},
            **{"direction": ["axis"], "mu": [0.0]},
        }
    )
    written, notes = write_dims_figures(table, tmp_path / "figures")
    assert [p.name for p in written] == ["dims_onsets.csv"] and len(notes) == len(FIGURES)
