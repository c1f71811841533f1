"""Pyro's SVI running the runs a stochastic kl-sweep row describes: the peer of test_pyro_peer.py
and benchmarks/stochastic_throughput.py.

Which Pyro objective is which kl-sweep divergence (P is normalised, so log Z = 0):

- ``Trace_ELBO(num_particles=N)``: ELBO = E_Q[log p - log q] = -KL(Q||P), so minimising its loss
  is ``divergence=reverse`` with the plain reparameterisation gradient.
- ``RenyiELBO(alpha=a, num_particles=N)``: the VR bound (1/(1-a)) log (1/N) sum_i (p/q)(x_i)^(1-a)
  (``log_weights = (1 - alpha) * elbo_particles`` in pyro/infer/renyi_elbo.py), minus kl-sweep's
  Monte Carlo ``divergence=renyi`` with ``divergence.alpha=a``: R_a(Q||P) = 1/(a-1) log int q^a p^(1-a).
  The same alpha on both sides.

Replicas (seeds) run in one SVI inside a ``pyro.plate``: a plate shared by every site is not summed
into a particle's weight (``get_dependent_plate_dims``), so each replica keeps its own objective
(its own log-mean-exp for RenyiELBO), and Adam updates each parameter entry on its own gradient:
R independent runs, checked in test_pyro_peer.py against runs made one at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO


def pyro_runs(
    *,
    separation: float,
    weight: float,
    init_mu: float | list[float],
    replicas: int,
    center: float = 0.0,
    component_var: float = 1.0,
    init_sigma2: float = 1.0,
    lr: float = 0.05,
    steps: int = 1000,
    num_samples: int = 4,
    divergence: str = "reverse",
    alpha: float | None = None,
    average: float = 0.5,
    schedule: str = "constant",
    decay: float = 0.6,
    decay_steps: float = 100.0,
    rng_seed: int = 0,
) -> pd.DataFrame:
    """``replicas`` independent SVI runs (``init_mu``: one start, or one a replica); their
    averaged (mu, log sigma) over the last ceil(average * steps) iterates, as kl-sweep averages."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        pyro.set_rng_seed(rng_seed)
        half = 0.5 * separation
        mixture = dist.MixtureSameFamily(
            dist.Categorical(probs=torch.tensor([weight, 1.0 - weight])),
            dist.Normal(torch.tensor([center - half, center + half]), math.sqrt(component_var)),
        ).expand([replicas])

        def model():
            with pyro.plate("replicas", replicas):
                pyro.sample("x", mixture)

        def guide():
            loc = pyro.param("loc", torch.as_tensor(init_mu, dtype=torch.float64).expand(replicas).clone())
            log_scale = pyro.param("log_scale", torch.full((replicas,), 0.5 * math.log(init_sigma2)))
            with pyro.plate("replicas", replicas):
                pyro.sample("x", dist.Normal(loc, log_scale.exp()))

        if divergence == "reverse":
            elbo = Trace_ELBO(num_particles=num_samples, vectorize_particles=True)
        else:
            elbo = RenyiELBO(alpha=alpha, num_particles=num_samples, vectorize_particles=True)
        if schedule == "constant":
            optim = pyro.optim.Adam({"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8})
        else:
            optim = pyro.optim.LambdaLR(
                {
                    "optimizer": torch.optim.Adam,
                    "optim_args": {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8},
                    "lr_lambda": lambda t: (1.0 + t / decay_steps) ** -decay,
                }
            )
        svi = SVI(model, guide, optim, elbo)
        window = max(1, math.ceil(average * steps))
        total = torch.zeros(replicas, 2)
        for t in range(steps):
            svi.step()
            if schedule != "constant":
                optim.step()
            if t >= steps - window:
                store = pyro.get_param_store()
                total += torch.stack([store["loc"].detach(), store["log_scale"].detach()], -1)
        mean = (total / window).numpy()
        return pd.DataFrame({"mu": mean[:, 0], "log_sigma": mean[:, 1], "sigma2": np.exp(2.0 * mean[:, 1])})
    finally:
        torch.set_default_dtype(dtype)
