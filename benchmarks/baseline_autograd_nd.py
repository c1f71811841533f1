"""A fixed reference for dims_throughput.py: the 2-D full-covariance reverse-KL fit in plain autograd.

Written once, to be read and never tuned: do not make it faster. It imports nothing from
``kl_sweep``, so speeding up the core cannot speed it up, and a throughput ratio against it stays
meaningful (issue #21, "Speed"). No closed forms, no reduction to 1-D, no Newton steps.

Each row fits Q = N(mean, L L^T) to P = w N(m_1, Sigma) + (1 - w) N(m_2, Sigma) in R^d, with
m_{1,2} = c 1 -/+ (s/2) u, u = e_1 (the ``axis`` direction) and Sigma = v ((1 - rho) I + rho 1 1^T),
by minimising the reverse KL, KL(Q||P) = E_Q[log q - log p], over
theta = (mean, the lower triangle of L row by row with log L_ii on the diagonal): P = d + d(d+1)/2
parameters a row, the core's ``full`` family in the same order. The expectation is a tensor-product
Gauss-Hermite rule in Q's standard frame: n nodes z_j per axis (n^d in all), x = mean + L z, so the
nodes follow Q and the estimate is differentiable in theta; log q(x) = -d/2 log 2 pi - sum log L_ii
- |z|^2 / 2 and log p(x) is a logsumexp over the two components. Adam (beta 0.9, 0.999, eps 1e-8,
bias-corrected, learning rate ``lr``) with the gradient from ``torch.autograd`` at every step, until
|grad| <= tol (converged) or ``max_steps`` steps; finished rows leave the batch.

    python benchmarks/baseline_autograd_nd.py [--rows 200] [--nodes 40]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
import torch

f64 = torch.float64
LOG_2PI = math.log(2 * math.pi)


def hermite_rule(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product nodes z [n^d, d] and weights [n^d] (summing to 1) for E over N(0, I_d)."""
    t, w = np.polynomial.hermite_e.hermegauss(n)  # weight exp(-t^2 / 2), total sqrt(2 pi)
    t, w = torch.tensor(t, dtype=f64), torch.tensor(w / math.sqrt(2 * math.pi), dtype=f64)
    z = torch.cartesian_prod(*[t] * d).reshape(-1, d)
    weights = torch.cartesian_prod(*[w] * d).reshape(-1, d).prod(-1)
    return z, weights


def unpack(theta: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B, d], L [B, d, d]) from theta [B, d + d(d+1)/2]."""
    mean, tri = theta[:, :d], theta[:, d:]
    rows, cols = torch.tril_indices(d, d)
    values = torch.where(rows == cols, torch.exp(tri), tri)
    L = torch.zeros(theta.shape[0], d, d, dtype=theta.dtype)
    L = L.index_put((torch.arange(theta.shape[0])[:, None], rows, cols), values)
    return mean, L


def reverse_kl(theta, d, z, weights, means, log_w, prec_tril, log_det_sigma):
    """KL(Q||P) per row [B]. ``means`` [B, 2, d], ``log_w`` [B, 2], ``prec_tril`` [B, d, d] the
    inverse of Sigma's Cholesky factor (so |prec_tril (x - m)|^2 is the Mahalanobis form),
    ``log_det_sigma`` [B]."""
    mean, L = unpack(theta, d)
    x = mean[:, None, :] + torch.einsum("bij,nj->bni", L, z)  # [B, N, d]
    log_q = -0.5 * d * LOG_2PI - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)[:, None]
    log_q = log_q - 0.5 * (z * z).sum(-1)[None, :]
    comps = []
    for k in range(2):  # over the two components
        y = torch.einsum("bij,bnj->bni", prec_tril, x - means[:, None, k, :])  # whitened
        comps.append(log_w[:, k, None] - 0.5 * (d * LOG_2PI + log_det_sigma[:, None] + (y * y).sum(-1)))
    log_p = torch.logsumexp(torch.stack(comps, -1), -1)
    return ((log_q - log_p) * weights).sum(-1)


def fit_reverse(
    separation,
    weight,
    init_mu,
    correlation=0.5,
    d=2,
    center=0.0,
    component_var=1.0,
    init_sigma2=1.0,
    nodes=40,
    lr=0.05,
    max_steps=5000,
    tol=1e-8,
):
    """Fit every row; returns (theta [B, P], loss [B], grad_norm [B], steps [B], converged [B])."""
    B = separation.shape[0]
    z, weights = hermite_rule(nodes, d)
    u = torch.zeros(d, dtype=f64)
    u[0] = 1.0
    half = (0.5 * separation)[:, None] * u
    means = torch.stack([center - half, center + half], 1)  # [B, 2, d]
    log_w = torch.stack([torch.log(weight), torch.log1p(-weight)], -1)
    sigma = component_var * ((1 - correlation) * torch.eye(d, dtype=f64) + correlation)
    chol = torch.linalg.cholesky(sigma)
    prec_tril = torch.linalg.inv(chol).expand(B, d, d)  # y = chol^-1 (x - m): |y|^2 the Mahalanobis form
    log_det_sigma = torch.full((B,), 2.0 * float(torch.log(torch.diagonal(chol)).sum()), dtype=f64)

    P = d + d * (d + 1) // 2
    rows, cols = torch.tril_indices(d, d)
    theta = torch.zeros(B, P, dtype=f64)
    theta[:, :d] = init_mu[:, None] * u
    theta[:, d:] = torch.where(rows == cols, 0.5 * math.log(init_sigma2), 0.0)
    m, v = torch.zeros(B, P, dtype=f64), torch.zeros(B, P, dtype=f64)
    steps = torch.zeros(B, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool)
    converged = torch.zeros(B, dtype=torch.bool)
    loss = torch.full((B,), float("nan"), dtype=f64)
    grad_norm = torch.full((B,), float("nan"), dtype=f64)
    while not finished.all():
        idx = torch.nonzero(~finished).flatten()
        t = theta[idx].requires_grad_(True)
        f = reverse_kl(t, d, z, weights, means[idx], log_w[idx], prec_tril[idx], log_det_sigma[idx])
        (g,) = torch.autograd.grad(f.sum(), t)  # rows are independent: each row's own gradient
        f = f.detach()
        gn = g.norm(dim=-1)
        loss[idx], grad_norm[idx] = f, gn
        ok = torch.isfinite(f) & torch.isfinite(g).all(-1)
        conv = ok & (gn <= tol)
        done = conv | ~ok | (steps[idx] >= max_steps)
        converged[idx], finished[idx] = conv, done
        ia, ga = idx[~done], g[~done]
        steps[ia] += 1
        k = steps[ia].to(f64).unsqueeze(-1)
        m[ia] = 0.9 * m[ia] + 0.1 * ga
        v[ia] = 0.999 * v[ia] + 0.001 * ga * ga
        m_hat, v_hat = m[ia] / (1 - 0.9**k), v[ia] / (1 - 0.999**k)
        theta[ia] -= lr * m_hat / (torch.sqrt(v_hat) + 1e-8)
    return theta, loss, grad_norm, steps, converged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--max-steps", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as dims_throughput.py measures it
    grid = list(itertools.product([0.4 * i for i in range(20)], [0.5, 0.7, 0.9], [-3.0, -1.0, 1.0, 3.0]))
    grid = torch.tensor(grid[: args.rows], dtype=f64)
    tic = time.perf_counter()
    theta, loss, _, steps, conv = fit_reverse(
        grid[:, 0], grid[:, 1], grid[:, 2], nodes=args.nodes, max_steps=args.max_steps
    )
    seconds = time.perf_counter() - tic
    print(
        f"{len(grid)} rows in {seconds:.1f} s ({len(grid) / seconds:.1f} fits/s): "
        f"{conv.double().mean():.1%} converged, median {steps.median()} steps, max {steps.max()}"
    )


if __name__ == "__main__":
    main()
