r"""Which converged endpoints are minima and which are saddle points, from the Hessian.

A fit stops when its gradient norm falls below a tolerance, which a saddle point satisfies too: an
initialisation on a symmetry axis (init_mu = center at weight 1/2) never leaves it and can stop on a
centred saddle. Each distinct optimum is therefore checked once: the Hessian of its divergence in
:math:`\theta = (\mu, \log\sigma)` is computed by the core with accurate quadrature (whatever
estimator the sweep used), and the optimum is a ``saddle`` if its smallest eigenvalue is below
``-HESSIAN_RTOL * max(1, |largest eigenvalue|)``, otherwise a ``minimum``. Divergences the core does
not know, and non-finite Hessians, stay ``unchecked`` (and count as minima).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.classify import MINIMUM, SADDLE, UNCHECKED
from analysis.numerics import hessian_eigenvalues

#: Relative size of a negative Hessian eigenvalue that makes a stationary point a saddle.
HESSIAN_RTOL = 1e-6


def stationary_kind(optima: pd.DataFrame) -> pd.Series:
    """``minimum``, ``saddle`` or ``unchecked`` for every row of the optima table (see module doc)."""
    from kl_sweep.core.divergences import DIVERGENCES

    kind = np.full(len(optima), UNCHECKED, dtype=object)
    for divergence, part in optima.groupby("divergence"):  # one batch per divergence
        if divergence not in DIVERGENCES:
            continue
        eig = hessian_eigenvalues(part, divergence)
        saddle = eig[:, 0] < -HESSIAN_RTOL * np.maximum(1.0, np.abs(eig[:, 1]))
        finite = np.isfinite(eig).all(axis=1)
        kind[optima.index.get_indexer(part.index)] = np.where(
            finite, np.where(saddle, SADDLE, MINIMUM), UNCHECKED
        )
    return pd.Series(kind, index=optima.index, dtype="str")  # (a string column, as ``type``)
