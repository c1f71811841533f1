"""The original notebook's three cases, fitted properly and placed on the exact phase structure.

The notebook that started this study fitted P = 0.75 N(m1, 0.05) + 0.25 N(m2, 0.05) with Q started
at mu = 1, sigma^2 = 1: forward and reverse KL for (m1, m2) = (0, 1.5), then the reverse KL for
(-1, 1.5). In component standard deviations (sd = sqrt(0.05)) the modes are 6.7 and 11.2 sd apart,
both beyond the reverse KL's fold at weight 0.75 (5.36 sd), so the reverse KL has two minima there.

:func:`case_table` lists, per case and divergence, every exact minimum (from
:func:`analysis.structure.exact_structure` in the case's own units) and the fit from the notebook's
start (the core's fit, as ``python -m kl_sweep -m experiment=notebook_cases`` runs it).
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
#: The notebook's mixtures: its name for the case and P's two means.
CASES = {"small separation": (0.0, 1.5), "large separation": (-1.0, 1.5)}


def case_frame() -> pd.DataFrame:
    """One row per case: the means, the separation and center, and the separation in component sd."""
    rows = []
    for name, (m1, m2) in CASES.items():
        d = m2 - m1
        rows.append(
            {
                "case": name,
                "m1": m1,
                "m2": m2,
                "separation": d,
                "center": 0.5 * (m1 + m2),
                "separation_sd": d / math.sqrt(COMPONENT_VAR),
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
        torch.full((n,), COMPONENT_VAR),
    )
    problem = Problem(
        mixture,
        torch.full((n,), INIT_MU),
        torch.full((n,), INIT_SIGMA2),
        torch.full((n,), 0.05),
        torch.full((n,), 20_000, dtype=torch.long),
        torch.full((n,), 1e-10),
    )
    result = fit(problem, Settings(get_divergence(divergence), Quadrature(), Adam()))
    return pd.DataFrame({"mu": result.mu.numpy(), "sigma2": result.sigma2.numpy()})


def case_table(divergences: tuple[str, ...] = ("forward", "reverse")) -> pd.DataFrame:
    """Every exact minimum of every case and divergence, in the case's units, and which one the
    notebook's start reaches.

    Columns: case, divergence, separation_sd, center, mu, sigma2, loss (nats), type, global (the lowest
    minimum), reached (the fit from mu = 1, sigma^2 = 1 ends there).
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
                    component_var=COMPONENT_VAR,
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
                            "case": case["case"],
                            "divergence": divergence,
                            "separation_sd": case["separation_sd"],
                            "center": case["center"],
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


__all__ = ["CASES", "COMPONENT_VAR", "WEIGHT", "case_frame", "case_table"]
