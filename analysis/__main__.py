"""``python -m analysis [SWEEP_DIR]``: figures to SWEEP_DIR/figures/, tables to SWEEP_DIR/tables/.

The sweep's rows are read once, a batch of whole cells at a time
(:func:`analysis.stream.analyse_sweep`), so its memory does not grow with the number of rows. Rows
of the alpha family (``divergence=alpha``) are analysed apart (:mod:`analysis.alpha`): their
tables and figures are named ``alpha_*`` and their section ends ``summary.md``.

Exit codes: 0 on success; 2 when SWEEP_DIR does not exist or holds no usable results (one line
on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import pandas as pd

matplotlib.use("Agg")

from analysis.alpha import alpha_notes  # noqa: E402 (after the backend)
from analysis.classify import DEFAULT_TOL  # noqa: E402
from analysis.dims import (  # noqa: E402
    dimension_figure,
    onsets_by_dim,
    weight_plane_figure,
    weight_planes,
    write_dims_figures,
)
from analysis.figures import save  # noqa: E402
from analysis.pipeline import DEFAULT_WEIGHT  # noqa: E402
from analysis.report import write_report  # noqa: E402
from analysis.source import Sweep  # noqa: E402
from analysis.stochastic import write_stochastic  # noqa: E402
from analysis.stream import analyse_sweep  # noqa: E402
from analysis.structure_nd import exact_points, one_table  # noqa: E402
from kl_sweep.allocator import keep_freed_memory, small_pages  # noqa: E402
from kl_sweep.collect import DamagedFileError  # noqa: E402
from kl_sweep.io import write_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Phase diagrams, bifurcation and basin charts, fit overlays, a loss landscape and "
        "phase-boundary tables for one sweep; for its divergence=alpha rows, the onset of multistability "
        "against alpha.",
    )
    parser.add_argument(
        "sweep_dir",
        nargs="?",
        default="multirun/latest",
        type=Path,
        help="sweep directory holding the results table (default: multirun/latest)",
    )
    parser.add_argument(
        "--weight",
        type=float,
        default=None,
        help=f"weight for the basin map, fit overlays and loss landscape; the nearest swept weight is "
        f"used (default: nearest to {DEFAULT_WEIGHT})",
    )
    parser.add_argument(
        "--tol",
        type=float,
        default=DEFAULT_TOL,
        help=f"relative tolerance under which two converged endpoints are one optimum "
        f"(default: {DEFAULT_TOL:g})",
    )
    return parser.parse_args(argv)


def bad_input(sweep_dir: Path, err: Exception) -> int:
    """Say on one line why ``sweep_dir`` cannot be analysed; the exit code 2."""
    message = str(err).removeprefix("kl_sweep: ")  # the collect step names itself; say it once
    message = message if str(sweep_dir) in message else f"{sweep_dir}: {message}"
    print(f"analysis: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()  # the exact structure's fits and continuations reuse their temporaries
    small_pages()  # reading a million-row table stalls less (kl_sweep.allocator)
    try:
        sweep = Sweep.open(args.sweep_dir)  # every check but a page damaged inside a file
        report = analyse_sweep(sweep, tol=args.tol, weight=args.weight)
    except (FileNotFoundError, DamagedFileError) as err:
        return bad_input(args.sweep_dir, err)
    except ValueError as err:
        if "sweep" in locals():  # (raised by the analysis of a readable sweep: not bad input)
            raise
        return bad_input(args.sweep_dir, err)
    result, alpha, higher = report.result, report.alpha, report.higher
    lines = result is not None or alpha is not None
    written = write_report(result, args.sweep_dir, weight=args.weight, alpha=alpha) if lines else []
    for folder, kind in (("tables", "table"), ("figures", "figure")) if lines else ():
        files = [p for p in written if p.parent.name == folder]
        print(f"wrote {len(files)} {kind} files to {args.sweep_dir / folder}")
    for note in result.notes if result is not None else []:  # what the exact structure could not do
        print(f"note: {note}")
    for note in alpha_notes(alpha) if alpha is not None else []:
        print(f"note: {note}")
    for note in report.notes:  # the figures that draw a regular sub-grid of a very large sweep's runs
        print(f"note: {note}")
    nd_points = None
    if higher is not None:
        dims = ", ".join(str(d) for d in report.higher_dims)
        print(f"note: {report.higher_rows} rows with dim {dims} are left out of the 1-D figures and tables")
        nd_points, skipped = exact_points(higher.grid)
        drawn, more = write_dims_figures(higher, args.sweep_dir / "figures")
        planes = weight_planes(higher.grid)
        if isinstance(planes, str):
            more.append(planes)
        else:
            lines, cusps, dim = planes
            drawn += save(weight_plane_figure(lines, cusps, dim), args.sweep_dir / "figures", "weight_plane")
            nd_points = pd.concat(
                [p for p in (nd_points, cusps) if p is not None and len(p)], ignore_index=True
            )
        onsets = onsets_by_dim(nd_points)
        if isinstance(onsets, str):
            more.append(onsets)
        else:
            drawn += save(dimension_figure(onsets), args.sweep_dir / "figures", "dimension_onsets")
            path = args.sweep_dir / "tables" / "onsets_by_dim.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(onsets.to_csv(index=False), path)
        print(f"wrote {len(drawn)} figure files of the d > 1 rows to {args.sweep_dir / 'figures'}")
        for note in skipped + more:
            print(f"note: {note}")
    line_points = result.bifurcation_set if result is not None and result.structures else None
    if line_points is not None or (nd_points is not None and len(nd_points)):
        table = one_table(line_points if line_points is not None else nd_points.iloc[:0], nd_points)
        path = args.sweep_dir / "tables" / "bifurcation_set.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(table.to_csv(index=False), path)
        print(f"{len(table)} special points (every dimension, family and direction) -> {path}")
    if sweep.stochastic_rows:
        print(
            f"note: {sweep.stochastic_rows} stochastic rows (estimator.resample=true) are analysed apart "
            "(stochastic_* figures and tables), not as starts of the phase diagram"
        )
    stochastic, notes = write_stochastic(sweep, args.weight)
    if stochastic:
        print(f"wrote {len(stochastic)} files of the stochastic rows (basin shares, boundary, bias)")
    for note in notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
