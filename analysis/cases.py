"""The original notebook's three cases, fitted properly and placed on the exact phase structure.

The notebook that started this study fitted P = 0.75 N(m1, 0.05) + 0.25 N(m2, 0.05) with Q started
at mu = 1, sigma^2 = 1: forward and reverse KL for (m1, m2) = (0, 1.5), then the reverse KL for
(-1, 1.5). In component standard deviations (sd = sqrt(0.05)) the modes are 6.7 and 11.2 sd apart,
both beyond the reverse KL's fold at weight 0.75 (5.36 sd), so the reverse KL has two minima there.

:func:`case_table` lists, per case and divergence, every exact minimum (from
:func:`analysis.structure.exact_structure` in the case's own units) and the fit from the notebook's
start (the core's fit, as ``python -m kl_sweep -m experiment=notebook_cases`` runs it), for the
cases as the notebook states them and as its code computed them (:data:`AS_COMPUTED`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from analysis.numerics import float64, tensor

WEIGHT = 0.75
COMPONENT_VAR = 0.05
INIT_MU, INIT_SIGMA2 = 1.0, 1.0
#: The notebook's N(mu, s2) was exp(-(x - mu)^2 / (2 pi s2)) / sqrt(2 pi s2) = sqrt(pi) N(mu, pi s2):
#: its "variance 0.05" components had variance pi * 0.05 and its start sigma^2 = 1 was pi. Its loss,
#: a plain sum over a grid of step 0.004 of densities scaled by sqrt(pi), was the KL of those
#: Gaussians times sqrt(pi) / 0.004.
AS_COMPUTED = math.pi
#: The two readings of the notebook's numbers: as its text states them, and as its code computed.
VARIANTS = {"as stated": 1.0, "as computed": AS_COMPUTED}
#: The notebook's mixtures: its name for the case and P's two means.
CASES = {"small separation": (0.0, 1.5), "large separation": (-1.0, 1.5)}


def case_frame() -> pd.DataFrame:
    """One row per case and variant: means, separation, center, component_var, start variance, and
    the separation in component sd."""
    rows = []
    for variant, scale in VARIANTS.items():
        for name, (m1, m2) in CASES.items():
            d, v = m2 - m1, scale * COMPONENT_VAR
            rows.append(
                {
                    "variant": variant,
                    "case": name,
                    "m1": m1,
                    "m2": m2,
                    "separation": d,
                    "center": 0.5 * (m1 + m2),
                    "component_var": v,
                    "init_sigma2": scale * INIT_SIGMA2,
                    "separation_sd": d / math.sqrt(v),
                }
            )
    return pd.DataFrame(rows)


def _fit_from_start(divergence: str, cases: pd.DataFrame) -> pd.DataFrame:
    """The core's fit from the notebook's start for every case (one batch)."""
    from kl_sweep.core.divergences import get_divergence
    from kl_sweep.core.estimators import Quadrature
    from kl_sweep.core.fit import Problem, Settings, fit
    from kl_sweep.core.mixture import Mixture
    from kl_sweep.core.optim import Adam

    n = len(cases)
    mixture = Mixture.two_component(
        tensor(cases["separation"]),
        torch.full((n,), WEIGHT),
        tensor(cases["center"]),
        tensor(cases["component_var"]),
    )
    problem = Problem(
        mixture,
        torch.full((n,), INIT_MU),
        tensor(cases["init_sigma2"]),
        torch.full((n,), 0.05),
        torch.full((n,), 20_000, dtype=torch.long),
        torch.full((n,), 1e-10),
    )
    result = fit(problem, Settings(get_divergence(divergence), Quadrature(), Adam()))
    return pd.DataFrame({"mu": result.mu.numpy(), "sigma2": result.sigma2.numpy()})


def case_table(divergences: tuple[str, ...] = ("forward", "reverse")) -> pd.DataFrame:
    """Every exact minimum of every case and divergence, in the case's units, and which one the
    notebook's start reaches.

    Columns: variant (``as stated``: component variance 0.05 and start sigma^2 = 1, as the notebook
    says; ``as computed``: both times pi, what its code fitted), case, divergence, separation_sd,
    center, component_var, mu, sigma2, loss (nats), type, global (the lowest minimum), reached
    (the fit from the notebook's start ends there).
    """
    from analysis.structure import exact_structure

    cases = case_frame()
    out = []
    with float64():
        for divergence in divergences:  # two divergences, two cases: a handful of small batches
            fits = _fit_from_start(divergence, cases)
            for i, case in cases.iterrows():
                d = case["separation"]
                s = exact_structure(
                    divergence,
                    [WEIGHT],
                    (0.5 * d, d),
                    center=case["center"],
                    component_var=case["component_var"],
                    separations=[d],
                )
                m = s.minima[s.minima["minimum"] & np.isclose(s.minima["separation"], d)]
                m = m.sort_values("loss", ignore_index=True)
                reached = np.maximum(
                    np.abs(m["mu"] - fits["mu"][i]),
                    np.abs(m["log_sigma"] - 0.5 * math.log(fits["sigma2"][i])),
                )
                out.append(
                    pd.DataFrame(
                        {
                            "variant": case["variant"],
                            "case": case["case"],
                            "divergence": divergence,
                            "separation_sd": case["separation_sd"],
                            "center": case["center"],
                            "component_var": case["component_var"],
                            "mu": m["mu"],
                            "sigma2": m["sigma2"],
                            "loss": m["loss"],
                            "type": m["type"],
                            "global": np.arange(len(m)) == 0,
                            "reached": reached <= 1e-6,
                        }
                    )
                )
    return pd.concat(out, ignore_index=True)


__all__ = ["AS_COMPUTED", "CASES", "COMPONENT_VAR", "VARIANTS", "WEIGHT", "case_frame", "case_table"]
