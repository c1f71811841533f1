"""The results table's columns documented in one place: a unit and a one-line meaning each.

:data:`COLUMN_DOCS` covers every column of :data:`kl_sweep.table.COLUMNS` and the two a sweep adds
(:data:`SWEEP_COLUMNS`). :func:`kl_sweep.io.write_parquet` writes each column's unit and meaning
into the Parquet schema's field metadata (keys ``unit`` and ``description``), and
``docs/results-table.md`` lists them; regenerate that list after changing this file with

    python -m kl_sweep.schema --write docs/results-table.md

(``python -m kl_sweep.schema`` alone prints it). ``tests/test_docs.py`` fails when a column of
:data:`kl_sweep.table.COLUMNS` has no entry here, or when the page and this table disagree.
This module imports nothing heavy: the sweeper's own process writes tables without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

#: Units used below. "x" is the unit of P's variable (with component_var = 1: P's component sd).
NO_UNIT = "-"

#: column -> (unit, meaning), in the table's order. Keep it in step with kl_sweep.table.COLUMNS.
COLUMN_DOCS: dict[str, tuple[str, str]] = {
    "divergence": (
        NO_UNIT,
        "the divergence fitted: forward, reverse, alpha, hellinger, chi2, renyi or jensen_shannon",
    ),
    "alpha": (
        NO_UNIT,
        "the order a of `divergence=alpha` and `renyi` (`divergence.alpha`); null for the others",
    ),
    "estimator": (NO_UNIT, "how the fit computed expectations: quadrature, grid or mc"),
    "optimizer": (NO_UNIT, "the first-order optimiser before the Newton polish: adam or sgd"),
    "lr": (NO_UNIT, "the first-order phase's learning rate (`optimizer.lr`)"),
    "separation": ("x", "distance between P's two means (in component sd when component_var = 1)"),
    "weight": (NO_UNIT, "weight of P's left component, the one at center - separation/2; in (0, 1)"),
    "center": ("x", "midpoint of P's two means"),
    "component_var": ("x^2", "variance of each of P's two components (times R in d dimensions)"),
    "dim": (NO_UNIT, "the dimension d of P and Q (`dim`); 1 for the line"),
    "correlation": (NO_UNIT, "rho of each component's covariance component_var ((1 - rho) I + rho 1 1^T)"),
    "direction": (NO_UNIT, "u, the direction of the separation: axis (e_1) or diagonal (1/sqrt(d) each)"),
    "q_family": (NO_UNIT, "Q's family: full (L L^T), diag (mean-field) or iso (sigma^2 I); alike in d = 1"),
    "target_file": (
        NO_UNIT,
        "the YAML file of a general target (`target.file`); null for the two-component P",
    ),
    "init_mu": ("x", "Q's starting mean"),
    "init_sigma2": ("x^2", "Q's starting variance"),
    "mu": ("x", "Q's fitted mean along u, u^T mean (a diverged row keeps its last finite value)"),
    "sigma2": ("x^2", "Q's fitted variance along u, u^T S u (a diverged row keeps its last finite value)"),
    "mean": ("x", "Q's fitted mean, a list of d numbers"),
    "cov": ("x^2", "Q's fitted covariance S: its lower triangle row by row, a list of d(d+1)/2 numbers"),
    "log_det_cov": ("log x^2 per dimension", "log det S"),
    "var_ratio": (NO_UNIT, "the mean over i of S_ii over P's marginal variance along axis i"),
    "entropy_gap": ("nats", "H(P) - H(Q) where P is a single Gaussian (separation 0); NaN elsewhere"),
    "loss": (
        "nats for KL, renyi, jensen_shannon; none for alpha, hellinger, chi2",
        "the fitted divergence at the final Q by accurate quadrature, whatever the estimator; inf where "
        "it is infinite",
    ),
    "loss_error": (
        "the loss's units",
        "the standard error of `loss` where it is estimated by randomised QMC (a general target in "
        "d > 3); 0 for the deterministic rules",
    ),
    "kl_forward": ("nats", "KL(P‖Q) at the final Q, whatever was fitted"),
    "kl_reverse": ("nats", "KL(Q‖P) at the final Q, whatever was fitted"),
    "grad_norm": (
        "loss per unit of (mu, log sigma)",
        "norm of the fitted loss's gradient in (mu, log sigma) at the end (on the edge: of d/d mu alone)",
    ),
    "steps": ("steps", "optimiser steps taken, the Newton polish included"),
    "converged": (NO_UNIT, "true when status is converged"),
    "on_boundary": (
        NO_UNIT,
        "true when the fit ended on the edge of the region where the divergence is finite (alpha < 0)",
    ),
    "status": (NO_UNIT, "converged, max_steps (the step budget ran out), diverged or infinite"),
    "config_hash": (
        "16 hex digits",
        "a stable hash of every key that affects the result; a resumed sweep matches rows by it",
    ),
    "numerics_version": (
        NO_UNIT,
        "VERSION+HASH: kl_sweep's version, and a hash of the code that fits rows, torch's version and "
        "whether the C kernels ran",
    ),
    "max_steps": ("steps", "the step budget, polish included (`optimizer.max_steps`)"),
    "tol": ("as grad_norm", "converged needs grad_norm <= tol (`optimizer.tol`)"),
    "seed": (NO_UNIT, "a stochastic fit's replica (`seed`, a row key); null for every other fit"),
    "num_samples": (
        "draws",
        "Monte Carlo draws per expectation (per step with `estimator.resample=true`); null for quadrature "
        "and grid",
    ),
    "gradient": (
        NO_UNIT,
        "stochastic fits: the gradient estimator, `reparam` or `stl` (sticking the landing) "
        "(`estimator.gradient`)",
    ),
    "schedule": (
        NO_UNIT,
        "stochastic fits: the learning-rate schedule, `constant` or `robbins_monro(decay, decay_steps)` "
        "(`optimizer.schedule`, `optimizer.decay`, `optimizer.decay_steps`)",
    ),
    "average": (
        NO_UNIT,
        "stochastic fits: the fraction of the last iterates averaged into mu and sigma2 "
        "(`optimizer.average`)",
    ),
    "n_minima": (NO_UNIT, "stochastic fits: how many exact minima the deterministic problem has"),
    "basin": (
        NO_UNIT,
        "stochastic fits: which exact minimum (0, 1, ... in order of mu) the averaged iterate lies nearest "
        "to, in (mu, log sigma)",
    ),
    "basin_mu": ("x", "stochastic fits: the mean of that exact minimum"),
    "basin_sigma2": ("x^2", "stochastic fits: the variance of that exact minimum"),
    "basin_distance": (
        "(x, log x)",
        "stochastic fits: the distance from the averaged iterate to that minimum in (mu, log sigma)",
    ),
    "crossings": (
        NO_UNIT,
        "stochastic fits: how many times the iterate's nearest exact minimum changed during the run",
    ),
    "fit_seconds": ("s", "the wall time of the row's chunk shared out over its rows: the only timing column"),
    "sweep_id": (
        NO_UNIT,
        "the sweep: a hash of its overrides (kl_sweep's sweeper), else its directory's name",
    ),
    "job_num": (NO_UNIT, "the configuration's position in the sweep, or its job folder (other sweepers)"),
}

#: Columns a sweep adds after :data:`kl_sweep.table.COLUMNS`.
SWEEP_COLUMNS = ("sweep_id", "job_num")

#: The lines of the page between which :func:`write_page` puts the generated table.
BEGIN = "<!-- columns: generated by python -m kl_sweep.schema; do not edit by hand -->"
END = "<!-- columns: end -->"


def markdown() -> str:
    """The columns as a Markdown table: column, unit, meaning."""
    lines = ["| column | unit | meaning |", "|---|---|---|"]
    for name, (unit, meaning) in COLUMN_DOCS.items():
        lines.append(f"| `{name}` | {unit} | {meaning} |")
    return "\n".join(lines) + "\n"


def page_with_table(page: str) -> str:
    """``page`` with the text between :data:`BEGIN` and :data:`END` replaced by :func:`markdown`."""
    head, begin, rest = page.partition(BEGIN + "\n")
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"the page has no {BEGIN!r} ... {END!r} block")
    return head + begin + markdown() + end + tail


def write_page(path: str | Path) -> bool:
    """Regenerate the column table in the page at ``path``; True if the file changed."""
    path = Path(path)
    old = path.read_text()
    new = page_with_table(old)
    if new != old:
        path.write_text(new)
    return new != old


def annotate(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the unit and meaning of each documented column in its field metadata."""
    import pyarrow as pa

    fields = []
    for field in schema:
        if field.name in COLUMN_DOCS:
            unit, meaning = COLUMN_DOCS[field.name]
            field = field.with_metadata({**(field.metadata or {}), b"unit": unit, b"description": meaning})
        fields.append(field)
    return pa.schema(fields, metadata=schema.metadata)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.stdout.write(markdown())
        return 0
    if len(argv) == 2 and argv[0] == "--write":
        changed = write_page(argv[1])
        print(f"{argv[1]}: {'updated' if changed else 'already up to date'}")
        return 0
    print("usage: python -m kl_sweep.schema [--write PAGE.md]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
