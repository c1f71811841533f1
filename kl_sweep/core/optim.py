"""Batched first-order updates and the Newton polish, on parameters theta = (mu, log sigma) [B, 2].

Every tensor has one row per configuration, and every row has its own learning rate, so one call
advances the whole batch; nothing here loops over configurations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma and Ba, 2015) with per-row learning rates and bias correction."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        zeros = torch.zeros_like(theta)
        return {"m": zeros, "v": zeros.clone(), "t": torch.zeros_like(theta[:, 0])}

    def step(self, theta: Tensor, grad: Tensor, lr: Tensor, state: dict[str, Tensor]) -> Tensor:
        """One update of every row; ``lr`` is [B]. Updates ``state`` (moments, step count) in place."""
        state["t"].add_(1)
        state["m"].mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        state["v"].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        t = state["t"].unsqueeze(-1)
        # 1 - beta^t as -expm1(t log beta): exact to rounding, and exp (unlike pow) gives the
        # same bits wherever a row sits in the batch.
        m_hat = state["m"] / -torch.expm1(t * math.log(self.beta1))
        v_hat = state["v"] / -torch.expm1(t * math.log(self.beta2))
        return theta - lr.unsqueeze(-1) * m_hat / (torch.sqrt(v_hat) + self.eps)


@dataclass(frozen=True)
class SGD:
    """Gradient descent with heavy-ball momentum and per-row learning rates."""

    momentum: float = 0.9

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        return {"velocity": torch.zeros_like(theta)}

    def step(self, theta: Tensor, grad: Tensor, lr: Tensor, state: dict[str, Tensor]) -> Tensor:
        state["velocity"].mul_(self.momentum).add_(grad)
        return theta - lr.unsqueeze(-1) * state["velocity"]


FirstOrder = Adam | SGD


def make_optimizer(name: str, **options) -> FirstOrder:
    """The update rule called ``name``; ``options`` are its own hyperparameters."""
    kinds = {"adam": Adam, "sgd": SGD}
    return kinds[name](**options)


def newton(grad: Tensor, hess: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Newton step :math:`-H^{-1}g`, decrement :math:`g^T H^{-1} g` and positive-definiteness.

    ``grad`` is [B, P] and ``hess`` [B, P, P]; 2x2 systems (the 1-D fits) are solved in closed
    form, larger ones by a batched Cholesky factorisation. Rows whose Hessian is not positive
    definite get ``pd = False`` (their step is meaningless).
    """
    if grad.shape[-1] != 2:
        sym = 0.5 * (hess + hess.transpose(-1, -2))
        chol, info = torch.linalg.cholesky_ex(sym)
        pd = (info == 0) & torch.isfinite(sym).all(-1).all(-1)
        eye = torch.eye(grad.shape[-1], dtype=grad.dtype)
        safe = torch.where(pd[:, None, None], chol, eye)
        step = -torch.cholesky_solve(torch.where(pd[:, None], grad, 0.0).unsqueeze(-1), safe).squeeze(-1)
        decrement = -(step * grad).sum(-1)
        return step, decrement, pd
    a, b, d = hess[:, 0, 0], 0.5 * (hess[:, 0, 1] + hess[:, 1, 0]), hess[:, 1, 1]
    det = a * d - b * b
    pd = (a > 0) & (det > 0) & torch.isfinite(det)
    safe = torch.where(pd, det, 1.0)
    g0, g1 = grad[:, 0], grad[:, 1]
    step = -torch.stack([d * g0 - b * g1, a * g1 - b * g0], -1) / safe.unsqueeze(-1)
    decrement = -(step * grad).sum(-1)
    return step, decrement, pd
