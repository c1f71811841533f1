"""The few evaluations the analysis asks of the core: densities, divergences on grids, float64.

Everything goes through :mod:`kl_sweep` (imported lazily, so the table-only parts of the analysis
do not pay for torch), batched: one call evaluates every point of a grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from kl_sweep.core.mixture import Mixture


@contextmanager
def float64() -> Iterator[None]:
    """Run the core in float64, as it expects, and restore the caller's default dtype afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def tensor(values: pd.Series | np.ndarray | float) -> torch.Tensor:
    """A float64 tensor holding a copy of ``values``."""
    return torch.tensor(np.asarray(values, dtype=float), dtype=torch.float64)


def mixtures(table: pd.DataFrame) -> Mixture:
    """The two-component mixture P of every row of ``table`` (separation, weight, center, component_var)."""
    from kl_sweep.core.mixture import Mixture

    return Mixture.two_component(
        tensor(table["separation"]),
        tensor(table["weight"]),
        tensor(table["center"]),
        tensor(table["component_var"]),
    )


def mixture_density(cell: pd.Series, x: np.ndarray) -> np.ndarray:
    """The normalised density of the cell's mixture P at the points ``x`` (exp of the core's log density)."""
    with float64():
        mixture = mixtures(cell.to_frame().T)
        return torch.exp(mixture.log_prob(tensor(x).unsqueeze(0)))[0].numpy()


def gaussian_density(x: np.ndarray, mu: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """Normalised densities of N(mu_k, sigma2_k) at ``x``: shape [len(mu), len(x)]."""
    from kl_sweep.core.mixture import normal_log_prob

    with float64():
        log_q = normal_log_prob(
            tensor(x).unsqueeze(0), tensor(mu).unsqueeze(-1), tensor(sigma2).unsqueeze(-1)
        )
        return torch.exp(log_q).numpy()


#: Points of a divergence grid evaluated in one batch.
GRID_CHUNK = 8192


def divergence_grid(divergence: str, cell: pd.Series, mu: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """The divergence (nats) between N(mu, exp(2 log_sigma)) and the cell's P: [len(log_sigma), len(mu)].

    The grid goes through the core's accurate quadrature in batches of :data:`GRID_CHUNK` points
    (a point's value does not depend on its batch; one batch of the whole grid would hold about
    0.3 GB of quadrature temporaries at once).
    """
    from kl_sweep.core.divergences import DIVERGENCES, divergence_value
    from kl_sweep.core.estimators import Quadrature

    mm, ll = np.meshgrid(mu, log_sigma)
    cells = pd.DataFrame(
        {k: np.full(GRID_CHUNK, float(cell[k])) for k in ("separation", "weight", "center", "component_var")}
    )
    mus, log_sigmas = mm.ravel(), ll.ravel()
    loss = np.empty(mm.size)
    with float64(), torch.no_grad():
        for start in range(0, mm.size, GRID_CHUNK):  # chunks of the grid, each a batch
            part = slice(start, start + GRID_CHUNK)
            n = len(mus[part])
            loss[part] = divergence_value(
                DIVERGENCES[divergence],
                Quadrature(),
                mixtures(cells.iloc[:n]),
                tensor(mus[part]),
                tensor(log_sigmas[part]),
            ).numpy()
    return loss.reshape(mm.shape)


def hessian_eigenvalues(
    optima: pd.DataFrame, divergence: str, chunk: int = 20_000, alpha: np.ndarray | None = None
) -> np.ndarray:
    """Eigenvalues [n, 2] (ascending) of the Hessian of ``divergence`` in (mu, log sigma) at each fit."""
    return np.linalg.eigvalsh(hessians(optima, divergence, chunk, alpha))


def hessians(
    optima: pd.DataFrame, divergence: str, chunk: int = 20_000, alpha: np.ndarray | None = None
) -> np.ndarray:
    """The Hessians [n, 2, 2] (symmetrised) of ``divergence`` in (mu, log sigma) at each row's fit.

    Uses the core's :class:`~kl_sweep.core.fit.Objective` with :class:`~kl_sweep.core.estimators.Quadrature`,
    ``chunk`` rows at a time to bound memory. ``alpha`` gives each row's order for the divergences
    that take one (``divergence.alpha``).
    """
    from kl_sweep.core.divergences import DIVERGENCES
    from kl_sweep.core.estimators import Quadrature
    from kl_sweep.core.fit import Objective

    out = np.empty((len(optima), 2, 2))
    with float64():
        for start in range(0, len(optima), chunk):  # chunks of optima, each a batch
            part = optima.iloc[start : start + chunk]
            theta = torch.stack([tensor(part["mu"]), 0.5 * torch.log(tensor(part["sigma2"]))], -1)
            order = None if alpha is None else tensor(alpha[start : start + chunk])
            objective = Objective.build(DIVERGENCES[divergence], Quadrature(), mixtures(part), theta, order)
            _, _, hess = objective.derivatives(theta, hessian=True)
            out[start : start + len(part)] = (0.5 * (hess + hess.transpose(-1, -2))).numpy()
    return out
