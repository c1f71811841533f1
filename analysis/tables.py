"""The tables: phase boundaries (CSV and Markdown), a Markdown summary of every cell's optima, and CSVs.

Files written by :func:`write_tables` into ``SWEEP_DIR/tables/``:

- ``phase_boundaries.csv`` / ``.md``: :func:`analysis.classify.phase_boundaries`, one row per
  divergence and weight (and per estimator / center / component_var if the sweep varies them).
- ``summary.md``: per divergence, separation and weight, the distinct optima found.
- ``optima.csv``: the distinct optima with full precision; ``phases.csv``: one row per cell.
- ``bifurcation_set.csv`` / ``.md``: the exact special points (folds, pitchforks, cusps,
  coexistence and crossover points) of :mod:`analysis.structure`, one row each.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import classify
from analysis.data import CELL_KEYS, CONTEXT_KEYS, divergence_order
from analysis.pipeline import SweepAnalysis

#: How each divergence is named in headings.
DIVERGENCE_TITLES = {
    "forward": "forward KL(P||Q)",
    "reverse": "reverse KL(Q||P)",
    "hellinger": "squared Hellinger H^2(P, Q)",
}


def divergence_title(name: str) -> str:
    return DIVERGENCE_TITLES.get(name, name)


def varying_context(table: pd.DataFrame) -> list[str]:
    """The context columns (estimator, center, component_var) that take more than one value."""
    return [k for k in CONTEXT_KEYS if k in table.columns and table[k].nunique(dropna=False) > 1]


def format_value(value: object, digits: int = 6) -> str:
    """A table cell: floats to ``digits`` significant digits, missing values as an em dash."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return "—"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}g}"
    return str(value)


#: Rows of a Markdown table formatted at once (a summary of a very large sweep is written in pieces).
MARKDOWN_ROWS = 20_000


def markdown_table(table: pd.DataFrame, digits: int = 6) -> str:
    """``table`` as a GitHub-flavoured Markdown table (numbers right-aligned)."""
    return "".join(markdown_pieces(table, digits))


def markdown_pieces(table: pd.DataFrame, digits: int = 6) -> Iterator[str]:
    """:func:`markdown_table` in pieces of at most :data:`MARKDOWN_ROWS` rows."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    numeric = [
        pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]) for c in table
    ]
    rule = "|" + "|".join("---:" if n else "---" for n in numeric) + "|"
    yield header + "\n" + rule + "\n"
    for start in range(0, len(table), MARKDOWN_ROWS):
        cells = table.iloc[start : start + MARKDOWN_ROWS].map(lambda v: format_value(v, digits)).to_numpy()
        yield "".join("| " + " | ".join(row) + " |\n" for row in cells)


def boundary_table(result: SweepAnalysis) -> pd.DataFrame:
    """The phase-boundary table without context columns that do not vary."""
    keep = varying_context(result.boundaries)
    drop = [k for k in CONTEXT_KEYS if k not in keep]
    return result.boundaries.drop(columns=drop)


def boundaries_markdown(result: SweepAnalysis) -> str:
    table = boundary_table(result)
    return "\n".join(
        [
            "# Phase boundaries",
            "",
            "One row per divergence and weight. Where `boundary_method` is `exact`, `onset_separation` is",
            "the smallest separation where a minimum is born (a fold, from continuation) and",
            "`global_switch_separation` the first coexistence (`switch_kind` maxwell: the global minimum",
            "jumps between branches) or crossover point (its sigma^2 / Var_P passes 1/2 without a jump);",
            "`n_minima_max` is the exact largest number of minima. The sweep's own estimates stay beside",
            "them: `onset_grid` is the smallest swept separation with two or more distinct converged minima",
            "(`onset_lower` the swept separation below), `switch_grid` where the lowest-loss minimum turns",
            "mode-seeking, bracketed by `switch_lower` and `switch_upper` (`method`: interpolated or grid).",
            "Separations are in component standard deviations; — means none in the swept range.",
            f"Distinct means apart by more than a relative tolerance of {result.tol:g} "
            "(see analysis/README.md).",
            "",
            markdown_table(table),
        ]
    )


def summary_markdown(result: SweepAnalysis) -> str:
    """Every cell's distinct optima (mu, sigma2, loss, share of converged runs), a section per divergence."""
    return "".join(summary_pieces(result))


def summary_pieces(result: SweepAnalysis) -> Iterator[str]:
    """:func:`summary_markdown` in pieces: one divergence's rows at a time, formatted
    :data:`MARKDOWN_ROWS` at a time (what :func:`write_tables` writes)."""
    counts = result.cells.groupby("divergence").agg(rows=("n_runs", "sum"), converged=("n_converged", "sum"))
    counts["not converged"] = counts["rows"] - counts["converged"]
    counts["saddle runs"] = result.cells.groupby("divergence")["n_saddle_runs"].sum()
    counts = counts.reset_index()
    lines = [
        "# Sweep summary: distinct optima per configuration",
        "",
        f"{int(result.cells['n_runs'].sum())} runs; only converged runs define optima. Two converged "
        "endpoints are the",
        f"same optimum when their means differ by at most {result.tol:g} of the fitted sd and their",
        f"variances by at most {result.tol:g} relatively (chained; analysis/README.md has the exact rule).",
        "`share` is the fraction of the configuration's converged runs reaching the optimum; `loss` is",
        "the optimised divergence in nats; `type` is covering if sigma^2 >= 1/2 of the moment-matched",
        "variance, else the mode it sits on (the left mode is called heavier at weight 1/2).",
        "",
        markdown_table(counts),
        *mismatch_markdown(result),
    ]
    yield "\n".join(lines)
    extra = varying_context(result.cells)
    columns = extra + ["separation", "weight", "outcome", "optimum", "type", "mu", "sigma2", "loss", "share"]
    columns += ["reached", "n_runs", "n_not_converged"]
    names = {
        "sigma2": "sigma^2",
        "loss": "loss (nats)",
        "reached": "runs reaching",
        "n_runs": "runs",
        "n_not_converged": "not converged",
    }
    for divergence in divergence_order(result.cells["divergence"]):
        part = summary_rows(result, divergence)[columns].rename(columns=names)
        yield f"\n\n## {divergence_title(divergence)}\n\n"
        yield from markdown_pieces(part)


def summary_rows(result: SweepAnalysis, divergence: str) -> pd.DataFrame:
    """The rows of ``divergence``'s section of the summary: a row per optimum, or per cell without one."""
    optima = result.optima[result.optima["divergence"] == divergence]
    optima = optima[CELL_KEYS + ["optimum", "type", "kind", "mu", "sigma2", "loss", "share", "n_runs"]]
    cells = result.cells[result.cells["divergence"] == divergence]
    rows = cells[CELL_KEYS + ["outcome", "n_runs", "n_not_converged"]].merge(
        optima.rename(columns={"n_runs": "reached"}), on=CELL_KEYS, how="left"
    )
    rows["type"] = np.where(rows["kind"] == classify.SADDLE, "saddle (not counted)", rows["type"])
    # Six decimals are far finer than the optimum tolerance; + 0.0 turns -0.0 into 0.0.
    rows[["mu", "sigma2", "loss"]] = rows[["mu", "sigma2", "loss"]].round(6) + 0.0
    rows["share"] = rows["share"].round(3)
    return rows.sort_values(CELL_KEYS + ["optimum"])


def bifurcation_markdown(points: pd.DataFrame, notes: list[str]) -> str:
    """The bifurcation set as Markdown: what each kind means, then one table per divergence."""
    lines = [
        "# Bifurcation set: exact special points",
        "",
        "Computed by numerical continuation of the stationary points of each divergence (see",
        "analysis/README.md). `fold`: a minimum and a saddle merge (`event` birth or death as separation",
        "grows). `pitchfork`: the symmetric case at weight 1/2. `cusp`: two fold lines meet.",
        "`maxwell`: two minima with equal loss, where the global minimum jumps (`*_other`: the other",
        "minimum). `crossover`: the global minimum's sigma^2 / Var_P passes 1/2 without a jump (`branch`:",
        "its type above, `branch_other` below). `residual`: max of |grad| and the system's other",
        "equations (|det H| / |H|^2 for folds and cusps). Separations are in component sd when",
        "component_var = 1.",
        "",
    ]
    lines += [f"- {n}" for n in notes]
    if points.empty:
        return "\n".join(
            [*lines, "", "No special points: every weight has one minimum over the whole range.", ""]
        )
    shown = points.drop(columns=["center", "component_var"]).rename(columns={"sigma2": "sigma^2"})
    for divergence in divergence_order(points["divergence"]):
        part = shown[shown["divergence"] == divergence].drop(columns="divergence")
        lines += ["", f"## {divergence_title(divergence)}", "", markdown_table(part, digits=9)]
    return "\n".join(lines)


def mismatch_markdown(result: SweepAnalysis) -> list[str]:
    """Cells where the sweep found another number of distinct minima than the exact structure has."""
    if "n_minima_exact" not in result.cells:
        return []
    cells = result.cells.dropna(subset=["n_minima_exact"])
    wrong = cells[cells["n_optima"] != cells["n_minima_exact"]]
    lines = [
        "",
        "## Checked against the exact structure",
        "",
        f"{len(cells)} cells have an exact count of minima (from continuation); in {len(wrong)} the",
        "sweep's converged runs found a different number of distinct minima: fewer means a basin that no",
        "initialisation reached (or runs that did not converge), more means endpoints the same-optimum",
        "tolerance did not merge.",
    ]
    lines += [f"- note: {n}" for n in result.notes]
    if len(wrong):
        cols = [
            "divergence",
            "weight",
            "separation",
            "n_optima",
            "n_minima_exact",
            "n_runs",
            "n_not_converged",
        ]
        lines += ["", markdown_table(wrong[cols].rename(columns={"n_optima": "sweep minima"}))]
    return lines


def write_pieces(pieces: Iterable[str], path: Path, mode: str = "w") -> None:
    """Write (``mode`` "a": append) the text ``pieces`` to ``path``, one at a time."""
    with path.open(mode) as handle:
        handle.writelines(pieces)


def write_tables(result: SweepAnalysis, directory: Path) -> list[Path]:
    """Write all tables into ``directory`` (created if needed); return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "phase_boundaries.csv": lambda p: boundary_table(result).to_csv(p, index=False),
        "phase_boundaries.md": lambda p: p.write_text(boundaries_markdown(result)),
        "summary.md": lambda p: write_pieces(summary_pieces(result), p),
        "optima.csv": lambda p: result.optima.to_csv(p, index=False),
        "phases.csv": lambda p: result.cells.to_csv(p, index=False),
    }
    if result.structures:
        paths["bifurcation_set.csv"] = lambda p: result.bifurcation_set.to_csv(p, index=False)
        paths["bifurcation_set.md"] = lambda p: p.write_text(
            bifurcation_markdown(result.bifurcation_set, result.notes)
        )
    written = []
    for name, write in paths.items():
        write(directory / name)
        written.append(directory / name)
    return written


# ---------------------------------------------------------------------------------------------
# The alpha family (analysis.alpha)

#: Alphas of the folds table in summary.md (the CSV has every point).
FOLD_SUMMARY_ALPHAS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 0.6, 0.75, 0.9, 0.95, 0.98)


def alpha_onsets_markdown(analysis) -> str:
    """The onset table of :func:`analysis.alpha.onset_table` as Markdown, alphas rounded to 4 digits."""
    table = analysis.onsets.copy()
    table["alpha"] = table["alpha"].round(10) + 0.0  # range() leaves 5.6e-17 where it meant 0
    table = table.drop(columns=["n_runs", "n_not_converged"]).rename(
        columns={
            "onset_grid": "multistable from (grid)",
            "onset_lower": "grid below",
            "n_optima_max": "minima at most",
            "boundary_cells": "cells with an edge minimum",
            "fold_separation": "exact first birth",
            "fold_branch": "born",
            "edge_split": "exact edge split",
            "exact_onset": "exact onset",
            "exact_multistable": "exact: two minima or more",
        }
    )
    return markdown_table(table)


def alpha_folds_markdown(analysis) -> str:
    """The exact folds at :data:`FOLD_SUMMARY_ALPHAS` (a column per fold) and where each continuation ends."""
    folds = analysis.folds
    if folds.empty:
        return "No exact folds (not computed, or none at alpha = 1/2).\n"
    folds = folds.assign(fold=folds["branch"] + " " + folds["event"], alpha=folds["alpha"].round(10) + 0.0)
    shown = folds[folds["requested"] & folds["alpha"].isin(FOLD_SUMMARY_ALPHAS)]
    wide = shown.pivot_table(index="alpha", columns=["weight", "fold"], values="separation", aggfunc="first")
    for weight in wide.columns.get_level_values(0).unique():  # at weight 1/2 the modes are born together
        pair = [(weight, "heavier mode birth"), (weight, "lighter mode birth")]
        if all(c in wide for c in pair) and np.allclose(
            wide[pair[0]], wide[pair[1]], rtol=1e-9, equal_nan=True
        ):
            wide = wide.drop(columns=pair[1]).rename(
                columns={"heavier mode birth": "both modes birth"}, level=1
            )
    wide.columns = [f"w = {w:g}: {f}" for w, f in wide.columns]
    wide = wide.reset_index()
    ends = folds[folds["end"] != ""][["weight", "fold", "alpha", "separation", "end"]]
    return "\n".join(
        [
            markdown_table(wide),
            "Where each continuation ends (its last point):",
            "",
            markdown_table(ends.rename(columns={"end": "why"})),
        ]
    )


def alpha_summary_markdown(analysis) -> str:
    """The alpha section of summary.md: counts, the onset table, the exact folds, notes."""
    counts = analysis.statuses
    lines = [
        "# The alpha family: D_a(P||Q) across its order",
        "",
        f"{analysis.n_runs} runs with divergence=alpha at {len(analysis.alphas)} alphas (a -> 0: reverse KL,",
        "mode-seeking; a = 1/2: 4 H^2; a -> 1: forward KL, mass-covering). Each alpha is its own objective,",
        "so these rows are analysed here, apart from any other divergence of the sweep. A minimum on the",
        "edge of the region where D_a is finite (a < 0: sigma^2 < v(1-a)/(-a); `on_boundary`) counts as a",
        f"minimum. Distinct minima by the relative tolerance {analysis.tol:g} (analysis/README.md); interior",
        "optima are checked by the Hessian of D_a at their alpha. Figures: `figures/alpha_*`.",
        "",
        markdown_table(counts),
        "## Onset of multistability against alpha",
        "",
        "`multistable from (grid)`: the smallest swept separation where the sweep found two or more distinct",
        "minima (`grid below`: the swept separation below it). `exact first birth`: the smallest separation",
        "where a minimum is born (a fold), from the exact continuation in alpha, and `born`: which; `exact:",
        "two minima or more`: where the folds give two minima or more (interior minima only: for a < 0 a",
        "minimum can also be born on the edge, which `note` says). — where there is none. Separations in",
        "component sd.",
        "",
        alpha_onsets_markdown(analysis),
        "## Exact folds against alpha",
        "",
        "Separation (component sd) of each fold, continued in alpha from the exact structure at a = 1/2",
        "(`tables/alpha_folds.csv` has every point, with mu, sigma^2 and the residual).",
        "",
        alpha_folds_markdown(analysis),
    ]
    lines += [f"- note: {n}" for n in analysis.notes]
    return "\n".join(lines) + "\n"


def write_alpha_tables(analysis, directory: Path) -> list[Path]:
    """The alpha section's tables into ``directory``: onsets (CSV, Markdown), folds, optima, cells."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "alpha_onsets.csv": lambda p: analysis.onsets.to_csv(p, index=False),
        "alpha_onsets.md": lambda p: p.write_text(
            "# Onset of multistability against alpha\n\n" + alpha_onsets_markdown(analysis)
        ),
        "alpha_folds.csv": lambda p: analysis.folds.to_csv(p, index=False),
        "alpha_optima.csv": lambda p: analysis.optima.to_csv(p, index=False),
        "alpha_phases.csv": lambda p: analysis.cells.to_csv(p, index=False),
    }
    for name, write in paths.items():
        write(directory / name)
    return [directory / name for name in paths]
