"""From configurations to result rows: the columns, the hash, and the batched fit of a table.

A batch is a DataFrame of :data:`~kl_sweep.config.ROW_KEYS` columns (one row per configuration)
plus the settings every row shares (divergence, estimator, optimiser hyperparameters). The same
table serves a single run (:func:`run_rows`, one row) and every chunk of a sweep (:func:`run_chunks`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import Tensor

from kl_sweep.config import ROW_KEYS, config_values, split_values  # noqa: F401  (re-exported)
from kl_sweep.core import reduction
from kl_sweep.core.cubature import divergence_nd
from kl_sweep.core.divergences import DIVERGENCES, divergence_exact, kl_pair_exact
from kl_sweep.core.estimators import make_estimator
from kl_sweep.core.fit import Problem, Result, Settings, Status, fit_stream, reduced_natively
from kl_sweep.core.gaussians import Family, MixtureND
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import make_optimizer
from kl_sweep.core.reduction import SharedPair
from kl_sweep.core.stochastic import Practice, StochasticResult
from kl_sweep.rows import config_hash_values, config_hashes, rows_frame  # noqa: F401  (re-exported)
from kl_sweep.version import numerics_version

#: The columns of a stochastic fit (``estimator.resample=true``); null on every other row.
STOCHASTIC_COLUMNS = [
    "seed",
    "gradient",
    "schedule",
    "average",
    "n_minima",
    "basin",
    "basin_mu",
    "basin_sigma2",
    "basin_distance",
    "crossings",
]
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
    "dim",
    "correlation",
    "direction",
    "q_family",
    "target_file",
    "init_mu",
    "init_sigma2",
    "mu",
    "sigma2",
    "mean",
    "cov",
    "log_det_cov",
    "var_ratio",
    "entropy_gap",
    "loss",
    "loss_error",
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
    "num_samples",
    *STOCHASTIC_COLUMNS,
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
    practice = {k: optimizer_options.pop(k) for k in PRACTICE_KEYS if k in optimizer_options}
    return Settings(
        divergence=DIVERGENCES[shared["divergence.name"]],
        estimator=make_estimator(shared["estimator.name"], **estimator_options),
        optimizer=make_optimizer(shared["optimizer.name"], **optimizer_options),
        polish=bool(shared.get("polish", True)),
        practice=Practice(**practice),
    )


#: The ``optimizer.*`` keys of a stochastic fit (:class:`kl_sweep.core.stochastic.Practice`).
PRACTICE_KEYS = ("schedule", "decay", "decay_steps", "average")


def problem_from(rows: pd.DataFrame, shared: Mapping[str, Any]) -> tuple[pd.DataFrame, Problem]:
    """The typed rows (index 0..n-1) and the batched fit problem they describe.

    In d > 1 the problem carries the target in R^d and Q's family (``dim``, ``correlation``,
    ``direction``, ``q_family``); its ``mixture`` is then the target's 1-D line mixture.
    """
    rows = rows_frame(rows, len(rows)).reset_index(drop=True)
    col = {k: torch.tensor(rows[k].to_numpy(dtype="float64")) for k in ROW_KEYS if k != "seed"}
    target = family = None
    dim = int(shared.get("dim", 1))
    if shared.get("target.file") is not None:  # a general target: the file's, on every row
        target = general_target(shared["target.file"], dim, len(rows))
        family = Family(str(shared.get("q_family", "full")), dim) if dim > 1 else None
        mixture = target.line()
        target = target if dim > 1 else None
    elif dim > 1:
        rho = torch.full_like(col["separation"], float(shared.get("correlation", 0.0)))
        keys = (col["separation"], col["weight"], col["center"], col["component_var"], rho)
        target = SharedPair(*keys, dim=dim, direction=str(shared.get("direction", "axis")))
        family = Family(str(shared.get("q_family", "full")), dim)
        mixture = target.line()
    else:
        mixture = Mixture.two_component(col["separation"], col["weight"], col["center"], col["component_var"])
    problem = Problem(
        mixture=mixture,
        init_mu=col["init_mu"],
        init_sigma2=col["init_sigma2"],
        lr=col["optimizer.lr"],
        max_steps=torch.tensor(rows["optimizer.max_steps"].to_numpy(dtype="int64")),
        tol=col["optimizer.tol"],
        alpha=col["divergence.alpha"] if DIVERGENCES[shared["divergence.name"]].parameter else None,
        target=target,
        family=family,
    )
    if shared.get("estimator.resample") is True:  # a stochastic fit's draws are keyed by row
        key = config_hash_values(rows, shared).view(np.int64)
        seed = rows["seed"].to_numpy(dtype="int64")
        problem = replace(problem, key=torch.from_numpy(key.copy()), seed=torch.from_numpy(seed.copy()))
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
    threads = torch.get_num_threads()
    settings = settings_from(shared)
    in_kernel = reduced_natively(settings) and shared.get("target.file") is None  # a key-given pair
    if int(shared.get("dim", 1)) > 1 and not in_kernel:
        # d > 1 steps on the torch loop are many small torch operations: on shared cores extra
        # intra-op threads wait on each other (a 2-thread d = 2 sweep ran 5-10x slower under
        # load, and no faster alone). They fit on one thread; cores are used through shards
        # (hydra/launcher=joblib). Fits in the native kernel share rows among threads, as in 1-D.
        torch.set_num_threads(1)
    try:
        for result in fit_stream(problems(), settings, capacity):
            rows, problem = ready.popleft()
            table = result_frame(rows, shared, problem, result, tic)
            tic = time.perf_counter()
            yield table
    finally:
        torch.set_num_threads(threads)


def result_frame(
    rows: pd.DataFrame, shared: Mapping[str, Any], problem: Problem, result: Result, tic: float
) -> pd.DataFrame:
    """The result table (:data:`COLUMNS`) of fitted ``rows``; ``tic``: when their work started."""
    mixture = problem.mixture
    status = result.status.numpy()
    log_sigma = 0.5 * torch.log(result.sigma2)
    name = shared["divergence.name"]
    error = np.zeros(len(rows))
    with torch.no_grad():  # both KLs for every row, and the fitted divergence if it is another
        if problem.family is None:  # both KLs from one set of nodes a row
            pair = kl_pair_exact(mixture, result.mu, log_sigma)
            kl = dict(zip(("forward", "reverse"), (k.numpy() for k in pair)))
        else:
            kl = {}
        for which in dict.fromkeys(("forward", "reverse", name)):
            if which not in kl:
                value, err = exact_divergence(DIVERGENCES[which], problem, result)
                kl[which] = value.numpy()
                error = err.numpy() if which == name else error
        shape = q_shape(problem, result)
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
            "dim": np.int64(problem.dim),
            "correlation": float(shared.get("correlation", 0.0)) if problem.dim > 1 else 0.0,
            "direction": str(shared.get("direction", "axis")),
            "q_family": str(shared.get("q_family", "full")),
            "target_file": shared.get("target.file"),
            "init_mu": rows["init_mu"],
            "init_sigma2": rows["init_sigma2"],
            "mu": result.mu.numpy(),
            "sigma2": result.sigma2.numpy(),
            **shape,
            "loss": kl[shared["divergence.name"]],
            "loss_error": error,
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
            **stochastic_columns(rows, shared, result),
            "fit_seconds": (time.perf_counter() - tic) / max(n, 1),
        }
    )
    return out[COLUMNS]


def stochastic_columns(rows: pd.DataFrame, shared: Mapping[str, Any], result: Result) -> dict[str, Any]:
    """``num_samples`` (Monte Carlo rows) and :data:`STOCHASTIC_COLUMNS`: a stochastic fit's
    replica and its placement against the exact minima; null where they do not apply."""
    n = len(rows)
    mc = shared["estimator.name"] == "mc"
    samples = [shared.get("estimator.num_samples") if mc else None] * n
    out: dict[str, Any] = {"num_samples": pd.array(samples, dtype="Int64")}
    if not isinstance(result, StochasticResult):
        ints = pd.array([None] * n, dtype="Int64")
        floats = np.full(n, np.nan)
        kinds = {"seed": ints, "n_minima": ints, "basin": ints, "crossings": ints}
        kinds |= {"gradient": [None] * n, "schedule": [None] * n}
        return {**out, **{c: kinds.get(c, floats) for c in STOCHASTIC_COLUMNS}}
    basin = result.basin.numpy()
    return {
        **out,
        "seed": pd.array(rows["seed"].to_numpy(dtype="int64"), dtype="Int64"),
        "gradient": [shared["estimator.gradient"]] * n,
        "schedule": [schedule_text(shared)] * n,
        "average": np.full(n, float(shared["optimizer.average"])),
        "n_minima": pd.array(result.n_minima.numpy(), dtype="Int64"),
        "basin": pd.arrays.IntegerArray(np.where(basin >= 0, basin, 0), basin < 0),
        "basin_mu": result.basin_theta[:, 0].numpy(),
        "basin_sigma2": torch.exp(2.0 * result.basin_theta[:, 1]).numpy(),
        "basin_distance": result.basin_distance.numpy(),
        "crossings": pd.array(result.crossings.numpy(), dtype="Int64"),
    }


def schedule_text(shared: Mapping[str, Any]) -> str:
    """The ``schedule`` column: ``constant``, or ``robbins_monro(decay, decay_steps)``."""
    if shared["optimizer.schedule"] == "constant":
        return "constant"
    return f"robbins_monro({shared['optimizer.decay']:g}, {shared['optimizer.decay_steps']:g})"


def general_target(path: str, dim: int, rows: int) -> MixtureND:
    """The target of ``target.file`` as a batch of ``rows`` identical mixtures in R^dim."""
    from kl_sweep.target import load_target

    target = load_target(path, dim)
    L = np.linalg.cholesky(target.covs)
    parts = (np.log(target.weights), target.means, L)
    return MixtureND(*(torch.tensor(x, dtype=torch.float64).expand(rows, *x.shape).clone() for x in parts))


def exact_divergence(divergence, problem: Problem, result: Result) -> tuple[Tensor, Tensor]:
    """(value, error) [B] of ``divergence`` at each row's fitted Q, to near rounding level where the
    problem reduces to 1-D (error 0), by the R^d rule of :mod:`kl_sweep.core.cubature` otherwise
    (error: the QMC standard error above d = 3, else 0)."""
    alpha = problem.alpha if divergence.parameter else None
    target, family = problem.target, problem.family
    if family is None:
        log_sigma = 0.5 * torch.log(result.sigma2)
        value = divergence_exact(divergence, problem.mixture, result.mu, log_sigma, alpha=problem.alpha)
        return value, torch.zeros_like(value)
    if isinstance(target, SharedPair) and divergence.name in reduction.REDUCIBLE:
        value = reduction.exact_value(divergence, target, family, result.theta, alpha)
        return value, torch.zeros_like(value)
    mixture = target.as_mixture() if isinstance(target, SharedPair) else target
    mean, L = family.scale_tril(result.theta)
    return divergence_nd(divergence, mixture, mean, L, alpha)


def _lists(values: Tensor, width: int) -> pd.arrays.ArrowExtensionArray:
    """Rows of ``values`` [B, width] as one Arrow list column (built from the flat values: no
    per-row Python objects, so a million 1-D rows cost milliseconds)."""
    flat = pa.array(values.reshape(-1).numpy())
    offsets = pa.array(np.arange(0, values.shape[0] * width + 1, width, dtype=np.int32))
    return pd.arrays.ArrowExtensionArray(pa.ListArray.from_arrays(offsets, flat))


def q_shape(problem: Problem, result: Result) -> dict[str, Any]:
    r"""Q's shape columns: ``mean`` (d), ``cov`` (S's lower triangle, row-major), ``log_det_cov``,
    ``var_ratio`` (the mean over i of :math:`S_{ii}` over P's marginal variance) and
    ``entropy_gap`` (:math:`H(P) - H(Q)` in nats where P is a single Gaussian, NaN elsewhere)."""
    if problem.family is None:
        mixture = problem.mixture
        mean, cov = result.mu.unsqueeze(-1), result.sigma2.unsqueeze(-1)
        log_det = torch.log(result.sigma2)
        var_ratio = result.sigma2 / mixture.variance()
        # one Gaussian: every component the same (any K: a target file may have one, or three)
        gaussian = (mixture.means == mixture.means[:, :1]).all(-1) & (
            mixture.variances == mixture.variances[:, :1]
        ).all(-1)
        log_det_p = torch.log(mixture.variances[:, 0])
    else:
        family, target, d = problem.family, problem.target, problem.dim
        mean, S = family.covariance(result.theta)
        rows, cols = torch.tril_indices(d, d)
        cov = S[:, rows, cols]
        log_det = family.log_det(result.theta)
        var_ratio = (torch.diagonal(S, dim1=-2, dim2=-1) / target.marginal_variances()).mean(-1)
        gaussian, log_det_p = target.is_gaussian(), target.log_det_cov()
    gap = torch.where(gaussian, 0.5 * (log_det_p - log_det), torch.nan)
    return {
        "mean": _lists(mean, mean.shape[-1]),
        "cov": _lists(cov, cov.shape[-1]),
        "log_det_cov": log_det.numpy(),
        "var_ratio": var_ratio.numpy(),
        "entropy_gap": gap.numpy(),
    }
