"""From configurations to result rows: the columns, the hash, and the batched fit of a table.

A batch is a DataFrame of :data:`~kl_sweep.config.ROW_KEYS` columns (one row per configuration)
plus the settings every row shares (divergence, estimator, optimiser hyperparameters). The same
table serves a single run (:func:`run_rows`, one row) and every chunk of a sweep (:func:`run_chunks`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from kl_sweep.config import ROW_KEYS, config_values, split_values  # noqa: F401  (re-exported)
from kl_sweep.core.divergences import DIVERGENCES, divergence_exact, kl_pair_exact
from kl_sweep.core.estimators import make_estimator
from kl_sweep.core.fit import Problem, Result, Settings, Status, fit_stream
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import make_optimizer
from kl_sweep.rows import config_hashes, rows_frame  # noqa: F401  (re-exported)
from kl_sweep.version import numerics_version

#: The result table's columns, in order (a contract: analysis and tests read these names).
COLUMNS = [
    "divergence",
    "alpha",
    "estimator",
    "optimizer",
    "lr",
    "separation",
    "weight",
    "center",
    "component_var",
    "init_mu",
    "init_sigma2",
    "mu",
    "sigma2",
    "loss",
    "kl_forward",
    "kl_reverse",
    "grad_norm",
    "steps",
    "converged",
    "on_boundary",
    "status",
    "config_hash",
    "numerics_version",
    "max_steps",
    "tol",
    "fit_seconds",
]
#: Columns that measure time, not results: they differ between otherwise identical runs.
TIMING_COLUMNS = ["fit_seconds"]


def settings_from(shared: Mapping[str, Any]) -> Settings:
    """The fit settings from the shared (flattened) config values."""
    estimator_options = {
        k.split(".", 1)[1]: v
        for k, v in shared.items()
        if k.startswith("estimator.") and k != "estimator.name"
    }
    optimizer_options = {
        k.split(".", 1)[1]: v
        for k, v in shared.items()
        if k.startswith("optimizer.") and k != "optimizer.name" and k not in ROW_KEYS
    }
    return Settings(
        divergence=DIVERGENCES[shared["divergence.name"]],
        estimator=make_estimator(shared["estimator.name"], **estimator_options),
        optimizer=make_optimizer(shared["optimizer.name"], **optimizer_options),
        polish=bool(shared.get("polish", True)),
    )


def problem_from(rows: pd.DataFrame, shared: Mapping[str, Any]) -> tuple[pd.DataFrame, Problem]:
    """The typed rows (index 0..n-1) and the batched fit problem they describe."""
    rows = rows_frame(rows, len(rows)).reset_index(drop=True)
    col = {k: torch.tensor(rows[k].to_numpy(dtype="float64")) for k in ROW_KEYS}
    mixture = Mixture.two_component(col["separation"], col["weight"], col["center"], col["component_var"])
    problem = Problem(
        mixture=mixture,
        init_mu=col["init_mu"],
        init_sigma2=col["init_sigma2"],
        lr=col["optimizer.lr"],
        max_steps=torch.tensor(rows["optimizer.max_steps"].to_numpy(dtype="int64")),
        tol=col["optimizer.tol"],
        alpha=col["divergence.alpha"] if DIVERGENCES[shared["divergence.name"]].parameter else None,
    )
    return rows, problem


def run_rows(rows: pd.DataFrame, shared: Mapping[str, Any]) -> pd.DataFrame:
    """Fit every row of ``rows`` in one batch and return the result table (:data:`COLUMNS`)."""
    return next(run_chunks([rows], shared, None))


def run_chunks(
    chunks: Iterable[pd.DataFrame], shared: Mapping[str, Any], capacity: int | None
) -> Iterator[pd.DataFrame]:
    """The result table of each chunk, in order, fitted as one stream (:func:`fit_stream`).

    A chunk's slow rows share their steps with the next chunk's rows, and at most about
    1.5 ``capacity`` rows are at work at once (None: all chunks at once); where the fit is fused
    (:func:`kl_sweep.core.fit.fused`), each chunk is fitted whole in the native kernel instead. Each table's
    ``fit_seconds`` shares out the time since the previous table was ready.
    """
    ready: deque[tuple[pd.DataFrame, Problem]] = deque()

    def problems() -> Iterator[Problem]:
        for chunk in chunks:
            ready.append(problem_from(chunk, shared))
            yield ready[-1][1]

    tic = time.perf_counter()
    for result in fit_stream(problems(), settings_from(shared), capacity):
        rows, problem = ready.popleft()
        table = result_frame(rows, shared, problem, result, tic)
        tic = time.perf_counter()
        yield table


def result_frame(
    rows: pd.DataFrame, shared: Mapping[str, Any], problem: Problem, result: Result, tic: float
) -> pd.DataFrame:
    """The result table (:data:`COLUMNS`) of fitted ``rows``; ``tic``: when their work started."""
    mixture = problem.mixture
    status = result.status.numpy()
    log_sigma = 0.5 * torch.log(result.sigma2)
    name = shared["divergence.name"]
    with torch.no_grad():  # both KLs for every row, and the fitted divergence if it is another
        kl = dict(
            zip(("forward", "reverse"), (k.numpy() for k in kl_pair_exact(mixture, result.mu, log_sigma)))
        )
        if name not in kl:
            kl[name] = divergence_exact(
                DIVERGENCES[name], mixture, result.mu, log_sigma, alpha=problem.alpha
            ).numpy()
    # A row that starts where the divergence is infinite reports +inf, as the fit does.
    kl[name] = np.where(status == Status.INFINITE, np.inf, kl[name])
    on_boundary = np.zeros(len(rows), bool) if result.on_boundary is None else result.on_boundary.numpy()
    labels = np.array([s.label for s in Status], dtype=object)
    n = len(rows)
    out = pd.DataFrame(
        {
            "divergence": shared["divergence.name"],
            "alpha": rows["divergence.alpha"],
            "estimator": shared["estimator.name"],
            "optimizer": shared["optimizer.name"],
            "lr": rows["optimizer.lr"],
            "separation": rows["separation"],
            "weight": rows["weight"],
            "center": rows["center"],
            "component_var": rows["component_var"],
            "init_mu": rows["init_mu"],
            "init_sigma2": rows["init_sigma2"],
            "mu": result.mu.numpy(),
            "sigma2": result.sigma2.numpy(),
            "loss": kl[shared["divergence.name"]],
            "kl_forward": kl["forward"],
            "kl_reverse": kl["reverse"],
            "grad_norm": result.grad_norm.numpy(),
            "steps": result.steps.numpy(),
            "converged": status == Status.CONVERGED,
            "on_boundary": on_boundary,
            "status": labels[status],
            "config_hash": config_hashes(rows, shared),
            "numerics_version": numerics_version(),
            "max_steps": rows["optimizer.max_steps"],
            "tol": rows["optimizer.tol"],
            "fit_seconds": (time.perf_counter() - tic) / max(n, 1),
        }
    )
    return out[COLUMNS]
