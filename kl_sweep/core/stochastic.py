r"""Stochastic VI as practitioners run it: fresh draws every step, a fixed budget, an average.

Pyro's and NumPyro's SVI do not minimise an exact divergence: every step draws a few fresh samples
from Q (reparameterised, x = mu + sigma eps), takes the gradient of the Monte Carlo estimate and
lets Adam move at a constant (or slowly decaying) learning rate for a fixed number of steps. This
module runs exactly that for a batch of rows (``estimator=mc estimator.resample=true``):

- the draws of step t come from a counter-based generator (:mod:`kl_sweep.core.counter`) keyed by
  the row's configuration hash, its ``seed`` and t, so a row's run is the same bits whatever batch,
  chunk, shard or launcher it is in;
- the objective is the registry's own Monte Carlo estimate (:func:`divergence_value` with these
  draws): one implementation per divergence, the same as the fixed-draws estimator's;
- the gradient is the plain reparameterisation gradient, or "sticking the landing" (Roeder, Wu and
  Duvenaud 2017: log q evaluated with its parameters held, so the score term, whose expectation is
  zero for the reverse KL, is dropped);
- the learning rate at update t = 0, 1, ... is ``lr`` or ``lr (1 + t / decay_steps)^-decay``
  (Robbins-Monro: the sum of the rates diverges and the sum of their squares converges for a decay
  in (0.5, 1]);
- what is reported is the Polyak-Ruppert average of theta = (mu, log sigma) over the last
  ``ceil(average * max_steps)`` iterates (the iterates after each update).

A stochastic run never reaches a gradient of 1e-8, so it has its own "converged": the whole step
budget ran with every iterate finite and inside the bounds of a healthy fit
(:data:`~kl_sweep.core.problem.MAX_ABS_MU`, :data:`~kl_sweep.core.problem.MAX_ABS_LOG_SIGMA`).
Where an iterate stops being finite the row is ``diverged`` and keeps its last finite iterate.

Each row is placed against the deterministic problem: its exact minima (:func:`exact_minima`, by
the exact fit from every component and from the moment-matched Q) and which of them the averaged
iterate lies nearest to, in (mu, log sigma); the same rule labels every iterate of the run, and
``crossings`` counts how often that label changed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kl_sweep.core import native
from kl_sweep.core.counter import counter_normals, counter_uniforms
from kl_sweep.core.divergences import divergence_value
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam
from kl_sweep.core.problem import MAX_ABS_LOG_SIGMA, MAX_ABS_MU, Problem, Result, Settings, Status

#: Counter streams: Q's normals, P's normals and P's component choices never share a counter.
STREAM_Q, STREAM_P, STREAM_COMPONENT = 0, 1, 2
#: Two exact minima closer than this in (mu, log sigma) are one.
SAME_MINIMUM = 1e-6
#: The exact fits that find the minima: a tight tolerance and budget enough for any start.
MINIMA_TOL, MINIMA_STEPS, MINIMA_LR = 1e-10, 20_000, 0.05


@dataclass(frozen=True)
class Practice:
    """How a stochastic fit is run (the ``optimizer.*`` keys of issue 25)."""

    schedule: str = "constant"
    decay: float = 0.6
    decay_steps: float = 100.0
    average: float = 0.5

    def rate(self, lr: Tensor, t: int) -> Tensor:
        """The learning rate of update ``t`` (0-based) for rows of base rate ``lr``."""
        if self.schedule == "constant":
            return lr
        return lr * (1.0 + t / self.decay_steps) ** -self.decay

    def window(self, budget: Tensor) -> Tensor:
        """How many of the last iterates are averaged, per row: ceil(average * budget), >= 1."""
        return torch.clamp(torch.ceil(self.average * budget.to(torch.float64)).to(torch.long), min=1)


@dataclass(frozen=True)
class FreshDraws:
    """The Monte Carlo estimator at one step: ``num_samples`` draws per row from the counters
    (``key``, ``seed``, ``step``). Under Q, x = mu + sigma eps keeps the gradient; under P a
    component is chosen by inverse CDF of a uniform draw and x = m_k + sqrt(v_k) eps."""

    num_samples: int
    key: Tensor
    seed: Tensor
    step: int
    #: Sticking the landing: log q at the draws with (mu, log sigma) held (see the module docstring).
    stick: bool = False
    static_p: bool = False
    fixed_nodes: bool = False

    def nodes(self, measure: str, mixture: Mixture, mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        n = self.num_samples
        weights = torch.full((mu.shape[0], n), 1.0 / n, dtype=mu.dtype)
        if measure == "q":
            eps = counter_normals(self.key, self.seed, self.step, STREAM_Q, n)
            return mu.unsqueeze(-1) + torch.exp(log_sigma).unsqueeze(-1) * eps, weights
        eps = counter_normals(self.key, self.seed, self.step, STREAM_P, n)
        u = counter_uniforms(self.key, self.seed, self.step, STREAM_COMPONENT, n).contiguous()
        k = torch.searchsorted(torch.cumsum(mixture.weights, -1), u).clamp_max(mixture.means.shape[-1] - 1)
        means = torch.gather(mixture.means, -1, k)
        return means + torch.sqrt(torch.gather(mixture.variances, -1, k)) * eps, weights

    def density_parameters(self, measure: str, mu: Tensor, log_sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The (mu, log sigma) that log q is evaluated with at draws under ``measure``."""
        if self.stick and measure == "q":
            return mu.detach(), log_sigma.detach()
        return mu, log_sigma


@dataclass
class Placement:
    """Where rows lie against their exact minima: index of the nearest (minima ordered by mu), its
    (mu, log sigma) and the distance to it in (mu, log sigma); -1 and NaN where there is none."""

    basin: Tensor
    theta: Tensor
    distance: Tensor


def place(theta: Tensor, minima: Tensor) -> Placement:
    """The nearest of each row's ``minima`` [B, M, 2] (NaN-padded) to ``theta`` [B, 2]."""
    d = torch.linalg.vector_norm(minima - theta.unsqueeze(1), dim=-1)
    distance, basin = torch.where(torch.isnan(d), torch.inf, d).min(-1)
    none = torch.isinf(distance)
    chosen = torch.gather(minima, 1, basin.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)
    return Placement(
        basin.masked_fill(none, -1),
        torch.where(none.unsqueeze(-1), torch.nan, chosen),
        torch.where(none, torch.nan, distance),
    )


def exact_minima(problem: Problem, settings: Settings) -> tuple[Tensor, Tensor]:
    """Every row's exact minima of its divergence, [B, M, 2] in (mu, log sigma) ordered by mu
    (NaN-padded), and how many [B].

    The minima are those of the deterministic problem: exact fits (the Quadrature rule, Adam and the
    Newton polish, so each ends with gradient norm <= 1e-10 and a positive definite Hessian) from
    each component of P (its mean and variance) and from the moment-matched Q. They are computed
    once per distinct P (and alpha) of the batch: the seeds, starts and learning rates of the
    stochastic rows do not change them.
    """
    mixture = problem.mixture
    parts = [mixture.means, mixture.variances, mixture.log_weights]
    if problem.alpha is not None:
        parts.append(problem.alpha.unsqueeze(-1))
    keys, inverse = torch.unique(torch.cat(parts, -1), dim=0, return_inverse=True)
    first = torch.zeros(len(keys), dtype=torch.long).scatter_(
        0, inverse.flip(0), torch.arange(len(inverse)).flip(0)
    )
    unique = mixture[first]
    K = unique.means.shape[-1]
    starts_mu = torch.cat([unique.means, unique.mean().unsqueeze(-1)], -1)  # [U, K + 1]
    starts_var = torch.cat([unique.variances, unique.variance().unsqueeze(-1)], -1)
    S = K + 1
    index = torch.arange(len(keys)).repeat_interleave(S)
    n = len(index)
    exact = Problem(
        mixture=unique[index],
        init_mu=starts_mu.reshape(-1),
        init_sigma2=starts_var.reshape(-1),
        lr=torch.full((n,), MINIMA_LR, dtype=torch.float64),
        max_steps=torch.full((n,), MINIMA_STEPS, dtype=torch.long),
        tol=torch.full((n,), MINIMA_TOL, dtype=torch.float64),
        alpha=None if problem.alpha is None else problem.alpha[first][index],
    )
    from kl_sweep.core.fit import fit  # here: fit imports this module

    deterministic = Settings(settings.divergence, Quadrature(), Adam(), polish=True)
    out = fit(exact, deterministic)
    theta = torch.stack([out.mu, 0.5 * torch.log(out.sigma2)], -1).view(len(keys), S, 2)
    good = (out.status == Status.CONVERGED).view(len(keys), S)
    if out.on_boundary is not None:  # an edge optimum of the alpha family is not a minimum's basin
        good &= ~out.on_boundary.view(len(keys), S)
    theta = torch.where(good.unsqueeze(-1), theta, torch.nan)
    order = torch.argsort(torch.where(good, theta[..., 0], torch.inf), -1)
    theta = torch.gather(theta, 1, order.unsqueeze(-1).expand(-1, -1, 2))
    # Drop repeats: a minimum within SAME_MINIMUM of the one before it (in mu order) is that one.
    step = torch.linalg.vector_norm(theta[:, 1:] - theta[:, :-1], dim=-1)
    repeat = torch.cat([torch.zeros(len(keys), 1, dtype=torch.bool), step <= SAME_MINIMUM], -1)
    theta = torch.where(repeat.unsqueeze(-1), torch.nan, theta)
    order = torch.argsort(torch.where(torch.isnan(theta[..., 0]), torch.inf, theta[..., 0]), -1)
    theta = torch.gather(theta, 1, order.unsqueeze(-1).expand(-1, -1, 2))
    count = (~torch.isnan(theta[..., 0])).sum(-1)
    return theta[inverse], count[inverse]


@dataclass
class StochasticResult(Result):
    """A stochastic fit's :class:`Result` with the rows' placement against the exact minima."""

    n_minima: Tensor | None = None
    basin: Tensor | None = None
    basin_theta: Tensor | None = None
    basin_distance: Tensor | None = None
    crossings: Tensor | None = None


def fit_stochastic(problem: Problem, settings: Settings, practice: Practice) -> StochasticResult:
    """Run every row of ``problem`` for its ``max_steps`` updates on fresh draws; see the module
    docstring. ``problem.key`` and ``problem.seed`` key the draws. The runs themselves are the
    native kernel's (:func:`kl_sweep.core.native.stochastic_fit`) where it is available and the
    optimiser is Adam, else :func:`_torch_runs`: the same rules, equal to about 1e-12."""
    div = settings.divergence
    B = problem.init_mu.shape[0]
    theta = torch.stack([problem.init_mu, 0.5 * torch.log(problem.init_sigma2)], -1)
    minima, count = exact_minima(problem, settings)
    budget = problem.max_steps.to(torch.long)
    start = budget - practice.window(budget)  # the first update whose iterate is averaged
    with torch.no_grad():
        loss0 = divergence_value(div, Quadrature(), problem.mixture, theta[:, 0], theta[:, 1], problem.alpha)
    infinite = ~torch.isfinite(loss0)
    setup = native_setup(settings, practice)
    if setup is not None:
        runs = _native_runs(problem, settings, setup, theta, minima, start, ~infinite)
    else:
        runs = _torch_runs(problem, settings, practice, theta, minima, start, ~infinite)
    theta, total, steps, alive, crossings = runs
    finished = alive & ~infinite
    averaged = total / practice.window(budget).unsqueeze(-1).to(theta.dtype)
    theta = torch.where(finished.unsqueeze(-1), averaged, theta)
    where = place(theta, minima)
    value, grad_norm = exact_value_and_gradient(div, problem.mixture, theta, problem.alpha)
    status = torch.full((B,), int(Status.CONVERGED), dtype=torch.long)
    status = status.masked_fill(~alive, int(Status.DIVERGED)).masked_fill(infinite, int(Status.INFINITE))
    return StochasticResult(
        mu=theta[:, 0],
        sigma2=torch.exp(2.0 * theta[:, 1]),
        loss=value,
        grad_norm=grad_norm,
        steps=steps,
        status=status,
        n_minima=count,
        basin=where.basin,
        basin_theta=where.theta,
        basin_distance=where.distance,
        crossings=crossings,
    )


def native_setup(settings: Settings, practice: Practice) -> native.StochasticSetup | None:
    """The kernel's form of these settings' stochastic fit (without its per-row parts), or None
    where the torch loop runs: no kernel, or an optimiser other than Adam."""
    opt, est, div = settings.optimizer, settings.estimator, settings.divergence
    if not (native.available() and isinstance(opt, Adam)):
        return None
    form = native.MC_FORMS["renyi" if div.transform is not None else div.native]
    scale = div.scale if div.pointwise else 1.0
    decaying = practice.schedule != "constant"
    return native.StochasticSetup(
        form, None, scale, None, est.gradient == "stl", est.num_samples,
        (opt.beta1, opt.beta2, opt.eps), (decaying, practice.decay, practice.decay_steps),
    )  # fmt: skip


def _native_runs(problem, settings, setup, theta, minima, start, alive):
    """The runs in the kernel (:func:`native.stochastic_fit`), ``setup`` completed per row: the
    alpha family's orders and finite region. Returns what :func:`_torch_runs` does."""
    from kl_sweep.core.divergences import native_member

    div, B = settings.divergence, theta.shape[0]
    if div.pointwise and div.orders(problem.alpha, B) is not None:  # the alpha family: its orders, region
        member = native_member(div, problem.mixture, problem.alpha, B)
        setup = replace(setup, order=member.a, region=member.region)
    out = native.stochastic_fit(
        theta,
        problem.mixture,
        problem.key,
        problem.seed,
        setup,
        problem.lr,
        problem.max_steps,
        start,
        minima,
        alive,
    )
    return out.theta, out.total, out.steps, out.alive, out.crossings


def _torch_runs(problem, settings, practice, theta, minima, start, alive):
    """The runs stepped in torch, all rows a step at a time, autograd through the registry's own
    Monte Carlo estimate: (last iterate, sum of the averaged iterates, updates, alive, crossings)."""
    est, div, opt = settings.estimator, settings.divergence, settings.optimizer
    budget = problem.max_steps.to(torch.long)
    total = torch.zeros_like(theta)
    state = opt.init_state(theta)
    bounds = torch.tensor([MAX_ABS_MU, MAX_ABS_LOG_SIGMA], dtype=theta.dtype)
    steps = torch.zeros(theta.shape[0], dtype=torch.long)
    label = place(theta, minima).basin
    crossings = torch.zeros(theta.shape[0], dtype=torch.long)
    for t in range(int(budget.max()) if len(budget) else 0):  # over steps; every row advances at once
        run = alive & (t < budget)
        if not run.any():
            break
        draws = FreshDraws(est.num_samples, problem.key, problem.seed, t, est.gradient == "stl")
        live = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = divergence_value(div, draws, problem.mixture, live[:, 0], live[:, 1], problem.alpha)
            (grad,) = torch.autograd.grad(loss.sum(), live)
        with torch.no_grad():
            new = opt.step(theta, grad, practice.rate(problem.lr, t), state)
            ok = torch.isfinite(grad).all(-1) & torch.isfinite(new).all(-1) & (new.abs() < bounds).all(-1)
            alive = alive & (ok | ~run)
            moved = run & ok
            theta = torch.where(moved.unsqueeze(-1), new, theta)
            steps += moved
            total += torch.where((moved & (t >= start)).unsqueeze(-1), theta, 0.0)
            now = place(theta, minima).basin
            crossings += moved & (now != label)
            label = torch.where(moved, now, label)
    return theta, total, steps, alive, crossings


def exact_value_and_gradient(
    div, mixture: Mixture, theta: Tensor, alpha: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The divergence by the Quadrature rule at ``theta`` and its gradient norm in (mu, log sigma)."""
    live = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        value = divergence_value(div, Quadrature(), mixture, live[:, 0], live[:, 1], alpha)
        (grad,) = torch.autograd.grad(torch.where(torch.isfinite(value), value, 0.0).sum(), live)
    norm = torch.linalg.vector_norm(grad, dim=-1)
    return value.detach(), torch.where(torch.isfinite(value), norm, torch.nan)
