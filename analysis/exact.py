"""``python -m analysis.exact DIVERGENCE``: the exact phase structure without a sweep.

Computes :func:`analysis.structure.exact_structure` for one or more divergences over a weight
range and a separation range, and writes what ``python -m analysis`` writes for a sweep's exact
structure: ``tables/bifurcation_set.{csv,md}``, ``tables/exact_counts.csv`` (number of minima per
weight and separation) and ``figures/exact_phase_diagram`` and ``figures/exact_branches_*``
(PNG and SVG)::

    python -m analysis.exact reverse --weights 0.5 0.97 0.01 --separations 0 8 --out multirun/exact

Exit codes: 0 on success; 2 for bad input (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402 (after choosing the backend)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.exact",
        description="Exact branches, folds, cusps, coexistence and crossover points of a divergence over a "
        "weight range, by numerical continuation (no sweep needed).",
    )
    parser.add_argument("divergence", nargs="+", help="divergence name(s), e.g. reverse")
    parser.add_argument(
        "--weights",
        nargs=3,
        type=float,
        default=(0.5, 0.97, 0.01),
        metavar=("FIRST", "LAST", "STEP"),
        help="weights FIRST, FIRST+STEP, ..., up to LAST (default: 0.5 0.97 0.01)",
    )
    parser.add_argument(
        "--separations",
        nargs=2,
        type=float,
        default=(0.0, 8.0),
        metavar=("LOW", "HIGH"),
        help="separation range (default: 0 8)",
    )
    parser.add_argument("--center", type=float, default=0.0, help="P's center (default 0)")
    parser.add_argument("--component-var", type=float, default=1.0, help="P's component variance (default 1)")
    parser.add_argument("--out", type=Path, default=Path("multirun/exact"), help="output directory")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the arguments, as one line; None if they are fine."""
    from kl_sweep.core.divergences import DIVERGENCES

    for name in args.divergence:
        if name not in DIVERGENCES:
            return f"invalid divergence={name}: allowed are {', '.join(DIVERGENCES)}"
    first, last, step = args.weights
    if not all(math.isfinite(v) for v in args.weights) or not 0 < first <= last < 1:
        return f"invalid --weights {first:g} {last:g} {step:g}: allowed is 0 < FIRST <= LAST < 1"
    if not step > 0:
        return f"invalid --weights step {step:g}: allowed is a number > 0"
    if (last - first) / step > 10_000:
        return f"invalid --weights step {step:g}: more than 10000 weights"
    low, high = args.separations
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
        return f"invalid --separations {low:g} {high:g}: allowed is 0 <= LOW < HIGH"
    if not (math.isfinite(args.component_var) and args.component_var > 0):
        return f"invalid --component-var {args.component_var:g}: allowed is a number > 0"
    if not math.isfinite(args.center):
        return f"invalid --center {args.center:g}: allowed is a finite number"
    if args.out.exists() and not args.out.is_dir():
        return f"invalid --out {args.out}: it is a file, not a directory"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check(args)
    if problem:
        print(f"analysis.exact: {problem}", file=sys.stderr)
        return 2
    from analysis import figures
    from analysis.structure import exact_structure
    from analysis.tables import bifurcation_markdown

    first, last, step = args.weights
    weights = np.round(np.arange(first, last + step / 2, step), 12)
    structures = [
        exact_structure(
            name,
            weights,
            tuple(args.separations),
            center=args.center,
            component_var=args.component_var,
        )
        for name in args.divergence  # one batched computation per divergence
    ]
    import pandas as pd

    points = pd.concat([s.points for s in structures], ignore_index=True)
    notes = [f"{s.divergence}: {n}" for s in structures for n in s.notes]
    notes += [f"{s.divergence}: no special point in the range" for s in structures if s.points.empty]
    tables = args.out / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    points.to_csv(tables / "bifurcation_set.csv", index=False)
    (tables / "bifurcation_set.md").write_text(bifurcation_markdown(points, notes))
    counts = pd.concat([s.counts().assign(divergence=s.divergence) for s in structures], ignore_index=True)
    counts.to_csv(tables / "exact_counts.csv", index=False)
    written = figures.save(
        figures.exact_phase_diagram(structures), args.out / "figures", "exact_phase_diagram"
    )
    for s in structures:
        written += figures.save(
            figures.exact_branches(s), args.out / "figures", f"exact_branches_{s.divergence}"
        )
    kinds = points["kind"].value_counts().to_dict() if len(points) else {}
    print(f"{len(points)} special points {kinds} -> {tables / 'bifurcation_set.csv'}")
    print(f"wrote {len(written)} figure files to {args.out / 'figures'}")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
