"""``analysis/phase_behaviour.ipynb`` is committed without outputs and runs top to bottom on a real sweep.

The sweep is made here with the core fit (both divergences, a few separations, weights and
starting means), so the notebook sees real optima, branches and basins.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import torch
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "phase_behaviour.ipynb"


def real_sweep(directory: Path) -> pd.DataFrame:
    """Fit every (divergence, separation, weight, init_mu) with the core and write ``results.parquet``."""
    from kl_sweep.divergences import DIVERGENCES, divergence_value
    from kl_sweep.estimators import Quadrature
    from kl_sweep.fit import Problem, Settings, Status, fit
    from kl_sweep.mixture import Mixture
    from kl_sweep.optim import Adam

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        grid = np.meshgrid(np.arange(0.0, 8.01, 1.0), [0.5, 0.75], np.linspace(-6.0, 6.0, 9), indexing="ij")
        s, w, x0 = (torch.tensor(a.ravel()) for a in grid)
        n = s.numel()
        mixture = Mixture.two_component(s, w, torch.zeros(n), torch.ones(n))
        frames = []
        for name in ("forward", "reverse"):
            problem = Problem(
                mixture,
                x0.clone(),
                torch.ones(n),
                torch.full((n,), 0.05),
                torch.full((n,), 3000, dtype=torch.long),
                torch.full((n,), 1e-8),
            )
            fitted = fit(problem, Settings(DIVERGENCES[name], Quadrature(), Adam()))
            log_sigma = 0.5 * torch.log(fitted.sigma2)
            kl = {
                k: divergence_value(DIVERGENCES[k], Quadrature(), mixture, fitted.mu, log_sigma)
                .detach()
                .numpy()
                for k in ("forward", "reverse")
            }
            status = np.array([Status(int(code)).label for code in fitted.status])
            frames.append(
                pd.DataFrame(
                    dict(
                        divergence=name,
                        estimator="quadrature",
                        optimizer="adam",
                        lr=0.05,
                        separation=s.numpy(),
                        weight=w.numpy(),
                        center=0.0,
                        component_var=1.0,
                        init_mu=x0.numpy(),
                        init_sigma2=1.0,
                        mu=fitted.mu.numpy(),
                        sigma2=fitted.sigma2.numpy(),
                        loss=fitted.loss.numpy(),
                        kl_forward=kl["forward"],
                        kl_reverse=kl["reverse"],
                        grad_norm=fitted.grad_norm.numpy(),
                        steps=fitted.steps.numpy(),
                        converged=status == "converged",
                        status=status,
                    )
                )
            )
    finally:
        torch.set_default_dtype(previous)
    table = pd.concat(frames, ignore_index=True)
    table["config_hash"] = [f"{i:08x}" for i in range(len(table))]
    table["sweep_id"], table["job_num"] = "notebook-test", np.arange(len(table))
    directory.mkdir(parents=True, exist_ok=True)
    table.to_parquet(directory / "results.parquet")
    return table


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebook_runs_top_to_bottom_on_a_real_sweep(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    table = real_sweep(sweep)
    assert table["converged"].all()
    monkeypatch.setenv("KL_SWEEP_DIR", str(sweep))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 5  # phase diagram, bifurcation, basin map, fit overlays, loss landscape
    text = "".join(out.get("text", "") for out in outputs)
    assert f"{len(table)} runs from {sweep}" in text
    # Nothing is written next to the sweep: the notebook only displays.
    assert sorted(p.name for p in sweep.iterdir()) == ["results.parquet"]
