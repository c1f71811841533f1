"""What a fit is given and what it returns: the problem, the settings, the result and the row status.

Shared by the fit loop (:mod:`kl_sweep.core.loop`), its entry points (:mod:`kl_sweep.core.fit`)
and the objectives. In d = 1, theta = (mu, log sigma); in d > 1 theta is the family's parameters
(:class:`kl_sweep.core.gaussians.Family`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
from torch import Tensor

from kl_sweep.core.divergences import Divergence
from kl_sweep.core.estimators import Estimator
from kl_sweep.core.gaussians import Family
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import FirstOrder
from kl_sweep.core.reduction import SharedPair


class Status(IntEnum):
    RUNNING = 0
    CONVERGED = 1
    MAX_STEPS = 2
    DIVERGED = 3
    #: The divergence is infinite at the start (alpha outside [0, 1] with Q too narrow or wide).
    INFINITE = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Problem:
    """What to fit, one row per configuration: P, the start of Q and the optimiser's budget."""

    mixture: Mixture
    init_mu: Tensor
    init_sigma2: Tensor
    lr: Tensor
    max_steps: Tensor
    tol: Tensor
    #: The divergence's parameter per row (``divergence.alpha``), or None.
    alpha: Tensor | None = None
    #: In d > 1: the target in R^d (``mixture`` is then its 1-D line mixture p_1) and Q's family;
    #: Q starts at N(init_mu u, init_sigma2 I). None in d = 1.
    target: SharedPair | None = None
    family: Family | None = None
    #: Stochastic fits: each row's 64-bit configuration hash (as int64) and replica seed [B], which
    #: key its draws (:mod:`kl_sweep.core.stochastic`). None elsewhere.
    key: Tensor | None = None
    seed: Tensor | None = None

    @property
    def dim(self) -> int:
        return 1 if self.family is None else self.family.dim


@dataclass(frozen=True)
class Settings:
    divergence: Divergence
    estimator: Estimator
    optimizer: FirstOrder
    polish: bool = True
    #: Newton decrement below which a row is handed to the polish (the quadratic model then puts
    #: it within 0.05 nats of its local minimum, with a positive definite Hessian).
    handover: float = 0.1
    #: How often (in steps) the first-order phase looks for rows ready for the polish.
    check_every: int = 5
    #: Run whole fits in the native kernel where it applies (:func:`fused`); False: step by step
    #: here (the same rules, to rounding).
    fused: bool = True
    #: How a stochastic fit runs (``estimator.resample=true``): its schedule and averaging, a
    #: :class:`kl_sweep.core.stochastic.Practice`. None: the defaults.
    practice: Any = None


@dataclass
class Result:
    """Final values per row, all [B]; ``loss`` is the estimator's objective at (mu, sigma2)."""

    mu: Tensor
    sigma2: Tensor
    loss: Tensor
    grad_norm: Tensor
    steps: Tensor
    status: Tensor
    #: True where the fit ended on the edge of the region where the divergence is finite.
    on_boundary: Tensor | None = None
    #: In d > 1: the family's final parameters [B, P] (mu and sigma2 are then u^T mean and u^T S u).
    theta: Tensor | None = None


#: Where a fit counts as diverged: sigma^2 outside (e^-200, e^200) ~ (1e-87, 1e87), or |mu| past
#: 1e100. Nothing meaningful lies out there, and inside these bounds every reported quantity (both
#: KLs, their gradients) stays representable in float64.
MAX_ABS_LOG_SIGMA = 100.0
MAX_ABS_MU = 1e100


def healthy(loss: Tensor, grad: Tensor, theta: Tensor, bounds: Tensor) -> Tensor:
    """Rows whose loss, gradient and parameters are finite and within ``bounds`` [P] (|theta|)."""
    # Few ops: each costs microseconds on the handful of rows a fit's last steps have.
    values = torch.cat([loss.unsqueeze(-1), grad], -1)
    return torch.isfinite(values).all(-1) & (theta.abs() < bounds).all(-1)


def status_codes(*pairs: tuple[Tensor, Status]) -> Tensor:
    """One status code per row from disjoint masks (RUNNING where none holds)."""
    code = torch.zeros_like(pairs[0][0], dtype=torch.long)
    for mask, status in pairs:  # over the few statuses, not over rows
        code = code.masked_fill(mask, int(status))
    return code
