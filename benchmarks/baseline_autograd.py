"""A fixed reference for fit_throughput.py: the reverse-KL fit in plain batched autograd.

Written once, to be read and never tuned: do not make it faster. It imports nothing from
``kl_sweep``, so speeding up the core cannot speed it up, and a throughput ratio against it stays
meaningful (issue #10). Derivatives are plain autograd: gradient by backward, Hessian by double
backward, no closed forms.

Each row fits Q = N(mu, sigma^2) to P = w N(-s/2, 1) + (1 - w) N(s/2, 1) by minimising
KL(Q||P) = E_Q[log q - log p] over theta = (mu, log sigma), with the core's algorithm: Adam steps,
and every 5th step the Hessian; a row whose Hessian is positive definite and whose Newton
decrement g^T H^-1 g is at most 0.1 switches to full Newton steps (each capped so that no
component exceeds 1); one whose Hessian stops being positive definite goes back to Adam. A row is
done when |grad| <= tol or after max_steps steps. The expectation is composite Gauss-Legendre
quadrature in x on the core's panel layout, so both reach the same minima. (They differ by up to
about tol / curvature, 1e-7 here: the core takes one more Newton step once |grad| <= tol.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

f64 = torch.float64
SCALE = torch.tensor((-9.0, -6.0, -4.0, -2.5, -1.2, 0.0, 1.2, 2.5, 4.0, 6.0, 9.0), dtype=f64)  # sigmas
SWITCH = torch.tensor((-40.0, -15.0, -6.0, -2.0, 0.0, 2.0, 6.0, 15.0, 40.0), dtype=f64)  # widths
SUPPORT = 12.0  # panel edges are clipped to mu +- 12 sigma
GL_T, GL_W = (torch.tensor(a, dtype=f64) for a in np.polynomial.legendre.leggauss(6))
LOG_2PI = math.log(2 * math.pi)


def kl_reverse(theta, means, log_w, switch, width):
    """KL(Q||P) per row [b] at theta [b, 2]; differentiable in theta (the nodes are not)."""
    mu, log_sigma = theta[:, 0], theta[:, 1]
    with torch.no_grad():  # panel edges and nodes are fixed points in x: they do not follow Q
        m, s = mu.unsqueeze(-1), torch.exp(log_sigma).unsqueeze(-1)
        edges = torch.cat([m + s * SCALE, switch + width * SWITCH], -1)
        edges = torch.sort(torch.clamp(edges, m - SUPPORT * s, m + SUPPORT * s), -1).values
        left, half = edges[:, :-1, None], 0.5 * (edges[:, 1:, None] - edges[:, :-1, None])
        x = (left + half * (GL_T + 1)).flatten(1)  # [b, panels * 6]
        rule = (half * GL_W).flatten(1)
        # log p = logsumexp_k (log w_k + log N(x; m_k, 1))
        comps = log_w.unsqueeze(1) - 0.5 * (LOG_2PI + (x.unsqueeze(-1) - means.unsqueeze(1)) ** 2)
        log_p = torch.logsumexp(comps, -1)
    z = (x - mu.unsqueeze(-1)) / torch.exp(log_sigma).unsqueeze(-1)
    log_q = -0.5 * LOG_2PI - log_sigma.unsqueeze(-1) - 0.5 * z * z
    return (rule * torch.exp(log_q) * (log_q - log_p)).sum(-1)


def derivatives(theta, data, hessian):
    """Loss [b], gradient [b, 2] and (if asked) Hessian [b, 2, 2], all by autograd."""
    theta = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = kl_reverse(theta, *data)
        # Rows are independent, so the gradient of the sum is every row's own gradient.
        (grad,) = torch.autograd.grad(loss.sum(), theta, create_graph=hessian)
        if not hessian:
            return loss.detach(), grad, None
        h0 = torch.autograd.grad(grad[:, 0].sum(), theta, retain_graph=True)[0]
        h1 = torch.autograd.grad(grad[:, 1].sum(), theta)[0]
    return loss.detach(), grad.detach(), torch.stack([h0, h1], 1)


def fit_reverse(separation, weight, init_mu, lr=0.05, max_steps=5000, tol=1e-8, check_every=5):
    """Fit every row; returns (mu, sigma2, loss, converged), each [B]."""
    B = separation.shape[0]
    means = torch.stack([-0.5 * separation, 0.5 * separation], -1)
    log_w = torch.stack([torch.log(weight), torch.log1p(-weight)], -1)
    # Where the weighted components cross: their log-ratio d(x) = log(w1/w2) - s x is linear
    # (equal variances), with root r = log(w1/w2) / s and width 1/|d'(r)| = 1/s. Clamped so that
    # s = 0 stays finite (the points then fall outside the support and are clipped).
    s = separation.clamp_min(1e-300)
    switch = ((log_w[:, 0] - log_w[:, 1]) / s).clamp(-1e300, 1e300).unsqueeze(-1)
    width = (1.0 / s).clamp_max(1e300).unsqueeze(-1)

    theta = torch.stack([init_mu, torch.zeros(B, dtype=torch.float64)], -1)  # sigma^2 = 1
    m, v = torch.zeros(B, 2, dtype=torch.float64), torch.zeros(B, 2, dtype=torch.float64)
    t = torch.zeros(B, dtype=torch.float64)  # Adam steps taken per row (for bias correction)
    steps = torch.zeros(B, dtype=torch.long)  # all steps taken per row
    newton = torch.zeros(B, dtype=torch.bool)  # rows taking Newton steps
    finished = torch.zeros(B, dtype=torch.bool)
    converged = torch.zeros(B, dtype=torch.bool)
    loss = torch.full((B,), float("nan"), dtype=torch.float64)
    it = 0
    while not finished.all():
        # The active rows, by phase (fixed for this iteration): Adam rows, then Newton rows.
        groups = [(n, torch.nonzero(~finished & (newton == n)).flatten()) for n in (False, True)]
        for in_newton, idx in groups:
            if not idx.numel():
                continue
            need_h = in_newton or it % check_every == 0
            f, g, H = derivatives(theta[idx], (means[idx], log_w[idx], switch[idx], width[idx]), need_h)
            loss[idx] = f
            ok = torch.isfinite(f) & torch.isfinite(g).all(-1)
            conv = ok & (g.norm(dim=-1) <= tol)
            done = conv | ~ok | (steps[idx] >= max_steps)
            converged[idx], finished[idx] = conv, done
            to_newton = torch.zeros_like(done)
            if need_h:
                # Newton step -H^-1 g (2x2 solve) and decrement g^T H^-1 g, where H is pos. def.
                a, b, d = H[:, 0, 0], H[:, 0, 1], H[:, 1, 1]
                det = a * d - b * b
                pd = (a > 0) & (det > 0)
                step = torch.stack([b * g[:, 1] - d * g[:, 0], b * g[:, 0] - a * g[:, 1]], -1)
                step = step / torch.where(pd, det, 1.0).unsqueeze(-1)
                # Adam rows switch when close to a minimum; Newton rows stay while H is pos. def.
                to_newton = ~done & pd & (in_newton | (-(step * g).sum(-1) <= 0.1))
                newton[idx] = to_newton
                step = step / step.abs().max(-1, keepdim=True).values.clamp_min(1.0)  # cap at 1
                theta[idx[to_newton]] += step[to_newton]
            # Adam (with bias correction) on the rows neither done nor in Newton.
            use = ~done & ~to_newton
            ia, ga = idx[use], g[use]
            t[ia] += 1
            m[ia] = 0.9 * m[ia] + 0.1 * ga
            v[ia] = 0.999 * v[ia] + 0.001 * ga * ga
            m_hat = m[ia] / (1 - 0.9 ** t[ia]).unsqueeze(-1)
            v_hat = v[ia] / (1 - 0.999 ** t[ia]).unsqueeze(-1)
            theta[ia] -= lr * m_hat / (torch.sqrt(v_hat) + 1e-8)
            steps[idx[~done]] += 1
        it += 1
    return theta[:, 0], torch.exp(2 * theta[:, 1]), loss, converged
