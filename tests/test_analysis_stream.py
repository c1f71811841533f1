"""``python -m analysis`` out of core: the streamed analysis against the one-batch one, batches of
whole cells, and the cap on the runs the figures draw.

The sweep is real: the line (forward and reverse, 2 weights, 12 separations, 7 starts) with an
alpha-family sweep and Bishop's d = 2 preset beside it in ``parts/``, so every part of the
analysis (the line, the alpha family, d > 1) is streamed. The one-batch analysis is the in-memory
entry points on the whole table read by pandas (:func:`analysis.data.load_sweep`).
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import run_cli

from analysis import drawn as drawn_module
from analysis import figures
from analysis.alpha import analyse_alpha, split_family
from analysis.data import CELL_KEYS, RUN_KEYS, load_sweep, split_dimensions
from analysis.dims import ONSET_KEYS, HigherRows
from analysis.pipeline import analyse
from analysis.source import Sweep, whole_units
from analysis.stream import analyse_sweep

#: Rows a batch holds in the streamed analyses: the 416 rows become about 60 batches.
TINY = 7
LINE = [
    "separation=range(0,6,0.5)",
    "weight=0.5,0.8",
    "init_mu=range(-3,3.5,1)",
    "divergence=forward,reverse",
]
ALPHA = ["divergence=alpha", "divergence.alpha=-0.5,0.5", "separation=range(3.5,7.1,0.5)", "weight=0.5"]
ALPHA += ["init_mu=-3,0,3"]


def sweep_into(path, args: list[str]):
    done = run_cli("-m", *args, f"hydra.sweep.dir={path}", "hydra.sweeper.latest_link=null")
    assert done.returncode == 0, done.stderr[-2000:]
    return path / "results.parquet"


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """(the line's sweep alone, the mixed sweep: the line's table, with the alpha and Bishop
    sweeps' tables as parts of it)."""
    root = tmp_path_factory.mktemp("stream")
    line = sweep_into(root / "line", LINE)
    mixed = root / "mixed"
    (mixed / "parts").mkdir(parents=True)
    shutil.copy(line, mixed / "results.parquet")
    shutil.copy(sweep_into(root / "alpha", ALPHA), mixed / "parts" / "alpha.parquet")
    shutil.copy(sweep_into(root / "bishop", ["experiment=bishop"]), mixed / "parts" / "bishop.parquet")
    return line.parent, mixed


@pytest.fixture(scope="module")
def streamed(sweeps):
    return analyse_sweep(sweeps[1], batch_rows=TINY, exact=False)


@pytest.fixture(scope="module")
def whole(sweeps):
    """The in-memory analyses of the mixed sweep's table: each one batch."""
    lines, higher = split_dimensions(load_sweep(sweeps[1]))
    family, rest = split_family(lines)
    return analyse(rest, exact=False), analyse_alpha(family, exact=False), HigherRows.of(higher)


def test_the_sweep_is_streamed_in_many_batches(sweeps):
    batches = list(Sweep.open(sweeps[1]).batches(TINY))
    assert len(batches) > 40 and sum(len(b) for b in batches) == 336 + 48 + 32


def test_streamed_line_equals_one_batch(streamed, whole):
    one = whole[0]
    for name in ("optima", "cells", "boundaries"):
        pd.testing.assert_frame_equal(getattr(streamed.result, name), getattr(one, name))
    assert streamed.result.context == one.context
    keys = CELL_KEYS + RUN_KEYS
    columns = keys + ["mu", "sigma2", "loss", "converged", "optimum", "reached"]
    runs = streamed.result.runs[columns].sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(runs, one.runs[columns].sort_values(keys, ignore_index=True))


def test_streamed_alpha_family_equals_one_batch(streamed, whole):
    one = whole[1]
    for name in ("optima", "cells", "onsets", "statuses"):
        pd.testing.assert_frame_equal(getattr(streamed.alpha, name), getattr(one, name))
    assert len(one.alphas) == 2 and one.n_runs == 48


def test_streamed_higher_rows_equal_one_batch(streamed, whole):
    one = whole[2]
    for name in ("grid", "found"):
        pd.testing.assert_frame_equal(getattr(streamed.higher, name), getattr(one, name))
    columns = ["divergence", "q_family", "correlation", "separation", "init_mu", "mu", "var_ratio"]
    pd.testing.assert_frame_equal(
        streamed.higher.drawn_rows()[columns], one.drawn_rows()[columns], check_dtype=False
    )
    assert (streamed.higher_rows, streamed.higher_dims) == (32, [2])
    cov = streamed.higher.drawn_rows()["cov"].iloc[0]
    assert isinstance(cov, np.ndarray) and cov.shape == (3,)  # a row's own array, as pandas reads it


@pytest.mark.parametrize("rows", [1, TINY, 50])
def test_a_batch_never_splits_a_cell(sweeps, rows):
    """Every cell (the line's and the alpha family's: the cell keys and alpha; d > 1: with dim,
    q_family, direction and correlation) lies in exactly one batch, and a batch ends with a cell."""
    keys = CELL_KEYS + ["alpha", "dim", "q_family", "direction", "correlation"]
    seen: dict[tuple, int] = {}
    groups: dict[tuple, int] = {}  # d > 1: the cells :func:`minima_found` counts minima in
    total = 0
    for k, batch in enumerate(Sweep.open(sweeps[1]).batches(rows)):
        total += len(batch)
        for cell in batch[keys].astype(str).drop_duplicates().itertuples(index=False):
            assert cell not in seen, f"cell {cell} in batches {seen[cell]} and {k}"
            seen[cell] = k
        higher = batch[batch["dim"] > 1][[*ONSET_KEYS, "separation"]].astype(str).drop_duplicates()
        for group in higher.itertuples(index=False):
            assert group not in groups, f"d > 1 cell {group} in batches {groups[group]} and {k}"
            groups[group] = k
    assert total == 416 and len(seen) == 48 + 16 + 16 and len(groups) == 16


def test_whole_units_extends_a_batch_to_finish_its_unit():
    """Units of 3, 5, 1 and 4 rows, read 2 rows at a time, in batches of about 4 rows."""
    units = np.repeat([1.0, 2.0, 3.0, 4.0], [3, 5, 1, 4])
    stream = [pa.RecordBatch.from_pydict({"separation": units[i : i + 2]}) for i in range(0, 13, 2)]
    tables = list(whole_units(stream, ["separation"], 4))
    assert [t.column("separation").to_pylist() for t in tables] == [
        [1.0] * 3,
        [2.0] * 5 + [3.0],
        [4.0] * 4,
    ]


def test_thinned_runs_are_a_regular_sub_grid_and_say_so(sweeps, monkeypatch, capsys):
    """With a cap of 100 runs a figure, the bifurcation diagram (2 weights x 7 starts x 12
    separations x 2 divergences = 336 runs) draws every 4th separation, the basin map (168 runs at
    weight 0.8) every 2nd separation and starting mean; the command line says so."""
    from analysis import pipeline
    from analysis.__main__ import main

    monkeypatch.setattr(drawn_module, "MAX_DRAWN_RUNS", 100)
    report = analyse_sweep(sweeps[0], batch_rows=TINY, exact=False)
    result, plan = report.result, report.result.drawn
    separations = np.arange(0.0, 6.0, 0.5)
    assert np.array_equal(plan.separations["bifurcation"], separations[::4])
    assert np.array_equal(plan.separations["basin"], separations[::2])
    assert np.array_equal(plan.basin_inits, np.arange(-3.0, 3.5, 1.0)[::2])
    bifurcation = result.runs[plan.in_bifurcation(result.runs)]
    basin = result.runs[plan.in_basin(result.runs)]
    assert set(bifurcation["separation"]) == set(separations[::4]) and len(bifurcation) <= 100
    assert set(basin["separation"]) == set(separations[::2]) and len(basin) == 6 * 4 * 2
    assert set(basin["init_mu"]) == {-3.0, -1.0, 1.0, 3.0}
    assert any("one swept separation in 4 (3 of 12)" in n for n in report.notes)
    assert any("basin map: 168 runs" in n and "(4 of 7)" in n for n in report.notes)
    assert figures.basin_map(result, 0.8).axes  # the thinned grid still draws

    monkeypatch.setattr(pipeline, "exact_structures", lambda *args: ({}, []))  # (not what is tested)
    out = sweeps[0] / "out"
    shutil.copytree(sweeps[0], out, ignore=shutil.ignore_patterns("out"))
    assert main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: bifurcation: 336 runs" in printed and "note: basin map: 168 runs" in printed


def test_thinned_higher_rows_are_a_regular_sub_grid_of_starts(sweeps, monkeypatch):
    """Bishop's figures choose from 16 rows (two starts each); a cap of 10 keeps every 2nd start."""
    import analysis.dims

    monkeypatch.setattr(analysis.dims, "MAX_FIGURE_ROWS", 10)
    report = analyse_sweep(sweeps[1], batch_rows=TINY, exact=False, check_stability=False)
    rows = report.higher.rows
    assert set(rows["init_mu"]) == {-2.0} and len(rows) == 8
    assert report.notes == [
        "d > 1 figures (Bishop's, shrinkage): over the cap of 10 rows, drawn from one swept starting "
        "mean in 2 (1 of 2)"
    ]


def test_damaged_results_file_is_one_line_and_writes_nothing(tmp_path):
    from test_analysis import run_cli as run_analysis

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.parquet").write_bytes(b"not a parquet file at all")
    done = run_analysis(str(sweep))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "damaged results file" in done.stderr
    assert sorted(p.name for p in sweep.iterdir()) == ["results.parquet"]
