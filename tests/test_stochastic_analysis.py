"""The analysis of stochastic rows (issue 25): basin shares, the effective boundary, bias and spread.

Independent references: the pandas classifier :func:`analysis.classify.optimum_types` for the
DuckDB one, pandas group-bys for DuckDB's aggregates, scipy's root finder for the 1/2 crossings,
and the minima of the reverse KL located by hand (one covering minimum at a small separation; a
start on a mode at a large one).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import optimize

from analysis import classify
from analysis import stochastic as st
from analysis.__main__ import main as analysis_main
from analysis.source import Sweep
from kl_sweep.collect import connect
from kl_sweep.table import run_rows
from tests.test_stochastic import rows, shared


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A small stochastic sweep: 12 seeds of two draw counts at three separations and two weights."""
    parts = []
    for n in (2, 8):
        for w in (0.6, 0.7):
            sep, seed = np.repeat([2.0, 5.0, 7.0], 12), np.tile(np.arange(12), 3)
            table = rows(1, separation=sep, seed=seed, weight=w, init_mu=1.0)
            table["optimizer.max_steps"] = 300
            parts.append(run_rows(table, shared(**{"estimator.num_samples": n})))
    path = tmp_path_factory.mktemp("stochastic")
    pd.concat(parts, ignore_index=True).to_parquet(path / "results.parquet")
    return path


def test_basin_type_sql_is_the_classifier():
    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame(
        {
            "separation": rng.uniform(0, 8, n),
            "weight": rng.choice([0.3, 0.5, 0.7], n),
            "center": rng.uniform(-1, 1, n),
            "component_var": rng.uniform(0.5, 2, n),
            "mu": rng.uniform(-5, 5, n),
            "sigma2": rng.uniform(0.1, 30, n),
        }
    )
    with connect() as con:
        con.register("frame", frame)
        sql = con.execute(f"SELECT {st.basin_type_sql('mu', 'sigma2')} AS t FROM frame").df()["t"]
    assert (sql.to_numpy() == classify.optimum_types(frame)).all()
    assert set(sql) == {classify.COVERING, classify.HEAVIER, classify.LIGHTER}


def test_shares_and_bias_are_the_group_means(sweep_dir):
    table = pq.read_table(sweep_dir / "results.parquet").to_pandas(ignore_metadata=True)
    sweep = Sweep.open(sweep_dir)
    shares = st.basin_shares(sweep.con, sweep.path, sweep.columns)
    bias = st.bias_spread(sweep.con, sweep.path, sweep.columns)
    types = classify.optimum_types(table.assign(mu=table["basin_mu"], sigma2=table["basin_sigma2"]))
    table = table.assign(t=types)
    by = ["num_samples", "separation", "weight"]
    expected = table.groupby(by)["t"].apply(lambda t: (t == classify.HEAVIER).mean()).reset_index()
    got = shares.merge(expected, on=by)
    assert len(got) == 12 and (shares["runs"] == 12).all()
    np.testing.assert_allclose(got["p_heavier"], got["t"], atol=1e-12)
    np.testing.assert_allclose(shares[[st.SHARE[t] for t in st.TYPES]].sum(axis=1), 1.0)
    # one covering minimum at separation 2: every seed is there
    assert (shares.loc[shares["separation"] == 2.0, "p_covering"] == 1.0).all()
    ok = table[table["status"] == "converged"]
    sd = ok.groupby([*by, "t"])["mu"].std().rename("sd").reset_index()
    merged = bias.merge(sd, left_on=[*by, "basin_type"], right_on=[*by, "t"])
    assert len(merged) == len(bias)
    np.testing.assert_allclose(merged["spread_mu"], merged["sd"], rtol=1e-9, equal_nan=True)


def test_crossing_is_the_root_of_the_interpolant():
    x = np.array([3.0, 3.5, 4.0, 4.5, 5.0])
    y = np.array([1.0, 0.9, 0.62, 0.2, 0.0])
    ((s, way),) = st._crossing(x, y)
    root = optimize.brentq(lambda v: np.interp(v, x, y) - 0.5, x[0], x[-1], xtol=1e-14)
    assert way == "falls" and s == pytest.approx(root, abs=1e-12)
    assert [w for _, w in st._crossing(x, 1.0 - y)] == ["rises"]
    assert st._crossing(x, np.full(5, 0.9)) == []


def test_exact_fit_from_the_start_reaches_the_minimum_it_should():
    # Separation 2: one covering minimum. Separation 8, weight 0.7 on the left: a start on the
    # right mode with its variance stays there (the lighter mode); on the left one, the heavier.
    starts = pd.DataFrame(
        {
            "divergence": "reverse",
            "alpha": np.nan,
            "center": 0.0,
            "component_var": 1.0,
            "init_mu": [0.0, 4.0, -4.0],
            "init_sigma2": 1.0,
            "separation": [2.0, 8.0, 8.0],
            "weight": 0.7,
        }
    )
    out = st.deterministic_outcomes(starts)
    assert out["exact_type"].tolist() == [classify.COVERING, classify.LIGHTER, classify.HEAVIER]
    np.testing.assert_allclose(out["exact_mu"].iloc[1:], [4.0, -4.0], atol=1e-3)


def test_effective_boundary_finds_the_half_crossing():
    sep = np.arange(3.0, 6.01, 0.5)
    p = np.clip((5.2 - sep) / 2.0, 0.0, 1.0)  # the covering share: 1/2 at separation 4.2
    shares = pd.DataFrame(
        {
            k: v
            for k, v in zip(
                st.PRACTICE,
                ["reverse", np.nan, 0.0, 1.0, 1.0, 1.0, "adam", 0.05, 4, "reparam", "constant", 0.5, 2000],
                strict=True,
            )
        },
        index=range(len(sep)),
    )
    shares = shares.assign(separation=sep, weight=0.6, p_covering=p, p_heavier=1.0 - p, p_lighter=0.0)
    exact = shares[
        ["divergence", "alpha", "center", "component_var", "init_mu", "init_sigma2", *st.CELL]
    ].assign(exact_type=np.where(sep < 4.6, classify.COVERING, classify.HEAVIER))
    b = st.effective_boundary(shares, exact)
    cov = b[b["type"] == classify.COVERING].set_index("kind")
    assert cov.loc["stochastic", "separation"] == pytest.approx(4.2)
    assert cov.loc["stochastic", "direction"] == "falls"
    assert cov.loc["exact from the start", "separation"] == pytest.approx(4.75)
    assert set(b[b["type"] == classify.LIGHTER]["kind"]) == set()


def test_analysis_writes_the_stochastic_tables_and_figures(sweep_dir, capsys):
    assert analysis_main([str(sweep_dir)]) == 0
    assert "files of the stochastic rows" in capsys.readouterr().out
    for name in ("stochastic_shares", "stochastic_boundary", "stochastic_bias"):
        assert len(pd.read_csv(sweep_dir / "tables" / f"{name}.csv")) > 0
    for name in ("stochastic_shares", "stochastic_map", "stochastic_bias"):
        assert (sweep_dir / "figures" / f"{name}.png").stat().st_size > 10_000


def test_stochastic_rows_are_not_starts_of_the_phase_diagram(sweep_dir, tmp_path, capsys):
    # A sweep holding both kinds: the phase diagram's cells count the deterministic starts only (3 a
    # cell, each an exact fit), never the seeds' noisy endpoints as optima of their own.
    stochastic = pq.read_table(sweep_dir / "results.parquet")
    starts = rows(1, separation=np.repeat([2.0, 5.0, 7.0], 3), init_mu=np.tile([-3.0, 0.0, 3.0], 3), seed=0)
    settings = {k: v for k, v in shared().items() if not k.startswith("estimator.")}
    exact = run_rows(starts, {**settings, "estimator.name": "quadrature"})
    both = pa.concat_tables(
        [stochastic, pa.Table.from_pandas(exact, preserve_index=False)], promote_options="default"
    )
    pq.write_table(both, tmp_path / "results.parquet")
    assert analysis_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"note: {stochastic.num_rows} stochastic rows" in out
    phases = pd.read_csv(tmp_path / "tables" / "phases.csv")
    assert phases["estimator"].unique().tolist() == ["quadrature"]
    assert phases["n_runs"].tolist() == [3, 3, 3]
    assert phases.loc[phases["separation"] == 2.0, "outcome"].item() == classify.COVERING
    assert len(pd.read_csv(tmp_path / "tables" / "stochastic_shares.csv")) == 12
