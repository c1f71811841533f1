"""``analysis/phase_behaviour.ipynb`` is committed without outputs and runs top to bottom on a real sweep.

The sweeps are made here with the core fit (both KLs, a few separations, weights and starting
means; and a small alpha sweep for its alpha section), so the notebook sees real optima, branches
and basins.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pandas as pd
from conftest import run_cli
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "phase_behaviour.ipynb"


def real_sweep(directory: Path) -> pd.DataFrame:
    """A small real sweep through the command line: both divergences, separations 0-8, 2 weights, 9 starts."""
    proc = run_cli(
        "-m",
        "separation=range(0,9,1)",
        "weight=0.5,0.75",
        "init_mu=range(-6,7,1.5)",
        "divergence=forward,reverse",
        f"hydra.sweep.dir={directory}",
        "hydra.sweeper.latest_link=null",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pd.read_parquet(directory / "results.parquet")


def real_alpha_sweep(directory: Path) -> pd.DataFrame:
    """A small real alpha sweep for the alpha section: two orders, separations 4-7, one weight, 3 starts."""
    proc = run_cli(
        "-m",
        "divergence=alpha",
        "divergence.alpha=0,0.5",
        "separation=range(4,7.5,0.5)",
        "weight=0.5",
        "init_mu=-3,0,3",
        f"hydra.sweep.dir={directory}",
        "hydra.sweeper.latest_link=null",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pd.read_parquet(directory / "results.parquet")


def real_dims_sweeps(bishop: Path, dims: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The d > 1 section's sweeps: the bishop preset, and mean-field fits to a single correlated
    Gaussian (separation 0) in d = 2 and 5 by both KLs, for the shrinkage figure."""
    proc = run_cli("-m", "experiment=bishop", f"hydra.sweep.dir={bishop}", "hydra.sweeper.latest_link=null")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli(
        "-m",
        "dim=2,5",
        "q_family=diag",
        "correlation=0,0.5,0.9",
        "separation=0",
        "init_mu=0",
        "divergence=reverse,forward",
        f"hydra.sweep.dir={dims}",
        "hydra.sweeper.latest_link=null",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pd.read_parquet(bishop / "results.parquet"), pd.read_parquet(dims / "results.parquet")


def real_stochastic_sweep(directory: Path) -> pd.DataFrame:
    """The stochastic section's sweep: the preset with 12 seeds, 2 draw counts, 3 separations, 2 weights."""
    proc = run_cli(
        "-m",
        "experiment=stochastic",
        "seed=range(0,12)",
        "estimator.num_samples=2,8",
        "optimizer.lr=0.05",
        "separation=2,5,7",
        "weight=0.6,0.7",
        "optimizer.max_steps=300",
        f"hydra.sweep.dir={directory}",
        "hydra.sweeper.latest_link=null",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return pd.read_parquet(directory / "results.parquet", columns=["seed", "basin"])


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_top_to_bottom_on_a_real_sweep(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    table = real_sweep(sweep)
    assert table["converged"].all()
    alpha_sweep = tmp_path / "alpha"
    alpha_table = real_alpha_sweep(alpha_sweep)
    monkeypatch.setenv("KL_SWEEP_DIR", str(sweep))
    monkeypatch.setenv("KL_SWEEP_ALPHA_DIR", str(alpha_sweep))
    bishop, dims = real_dims_sweeps(tmp_path / "bishop", tmp_path / "dims")
    monkeypatch.setenv("KL_SWEEP_BISHOP_DIR", str(tmp_path / "bishop"))
    monkeypatch.setenv("KL_SWEEP_DIMS_DIR", str(tmp_path / "dims"))
    stochastic = real_stochastic_sweep(tmp_path / "stochastic")
    monkeypatch.setenv("KL_SWEEP_STOCHASTIC_DIR", str(tmp_path / "stochastic"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    # phase diagram, exact phase diagram, bifurcation, basin map, fit overlays, loss landscape, notebook
    # cases; then the alpha section's phase diagram, folds against alpha and fits across alpha; then
    # the d = 2 section's exact onsets against the correlation, the onsets against d, Bishop's
    # figures 10.2 and 10.3 and the shrinkage figure; the stochastic section's shares, map and bias
    assert len(images) == 18
    text = "".join(out.get("text", "") for out in outputs)
    assert f"{len(table)} runs from {sweep}" in text
    assert "special points:" in text and "'fold'" in text  # the exact structure of the real sweep
    assert f"{len(alpha_table)} alpha runs from {alpha_sweep}" in text
    found = text.split("special points in d = 2:")[1].splitlines()[0]
    assert "'fold'" in found and "'pitchfork'" in found and "'maxwell'" in found
    by_dim = text.split("the onset against d:")[1].splitlines()[0]  # diag's folds, iso's pitchforks
    assert "'diag': ['fold', 'pitchfork']" in by_dim and "'iso': ['fold', 'pitchfork']" in by_dim
    assert f"{len(stochastic)} stochastic runs from {tmp_path / 'stochastic'}, 12 configurations" in text
    for rows in (bishop, dims):  # (the figures draw the converged rows)
        assert f"{int(rows['converged'].sum())} d > 1 runs from" in text
    # Nothing is written into the sweeps: the notebook only displays.
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml", "results.parquet"]
    assert sorted(p.name for p in alpha_sweep.iterdir()) == ["0", "multirun.yaml", "results.parquet"]
