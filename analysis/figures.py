"""The five figures of a sweep, each a function of a :class:`~analysis.pipeline.SweepAnalysis`.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global state,
nothing shown), styled with seaborn's whitegrid theme and colour-blind-safe colours: seaborn's
"colorblind" palette for categories, viridis/cividis for continuous values. They show the sweep's
main context (the estimator, center and component_var with the most rows) when several are present.

- :func:`phase_diagram`: outcome class and order parameter over separation x weight.
- :func:`bifurcation_diagram`: final mu and sigma^2 against separation, every initialisation.
- :func:`basin_map`: which optimum each init_mu reaches, for one weight.
- :func:`fit_overlays`: P with the forward and reverse fits at a small and a large separation.
- :func:`loss_landscape`: the reverse KL over (mu, log sigma) with the sweep's endpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import classify
from analysis.data import RUN_KEYS, divergence_order, in_context, nearest_value
from analysis.drawn import pick_evenly
from analysis.numerics import divergence_grid, float64, gaussian_density, mixture_density
from analysis.pipeline import NOT_CONVERGED, SweepAnalysis
from analysis.tables import divergence_title

SEPARATION_LABEL = "separation (component sd)"


def separation_label(component_var) -> str:
    """The separation axis's label: in component sd when component_var is 1, else in P's own units."""
    try:
        value = float(component_var)
    except (TypeError, ValueError):
        return "separation"
    return SEPARATION_LABEL if value == 1.0 else f"separation (x units; component_var {value:g})"


PALETTE = sns.color_palette("colorblind")
#: One colour per outcome class, optimum type or run result, shared by every figure.
COLOURS = {
    classify.COVERING: PALETTE[0],
    classify.HEAVIER: PALETTE[1],
    classify.LIGHTER: PALETTE[2],
    classify.MULTISTABLE: PALETTE[4],
    classify.NO_MINIMUM: PALETTE[7],
    classify.SADDLE: PALETTE[5],
    NOT_CONVERGED: (0.82, 0.82, 0.82),
}
#: Line colour per divergence in the fit overlays.
DIVERGENCE_COLOURS = {"forward": PALETTE[0], "reverse": PALETTE[3], "hellinger": PALETTE[2]}
DPI = 150
#: Artists with more cells or points than this are embedded in the SVGs as images, keeping them small.
RASTERIZE_ABOVE = 5_000


def style() -> AbstractContextManager:
    """Seaborn's whitegrid style at notebook scale, applied only inside the ``with`` block."""
    return mpl.rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=1.0)})


def cell_edges(values: np.ndarray) -> np.ndarray:
    """Edges of cells centred on the sorted unique ``values`` (midpoints; half a gap beyond the ends)."""
    v = np.unique(np.asarray(values, dtype=float))
    if v.size == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = 0.5 * (v[1:] + v[:-1])
    return np.concatenate([[v[0] - (mid[0] - v[0])], mid, [v[-1] + (v[-1] - mid[-1])]])


def grid_of(table: pd.DataFrame, x: str, y: str, value: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``value`` of ``table`` pivoted to y rows by x columns, on every x and y value found in ``frame``.

    Pivoting every panel onto the same values keeps their cells aligned; combinations without a
    row stay NaN and are drawn blank.
    """
    grid = table.pivot_table(index=y, columns=x, values=value, aggfunc="first")
    return grid.reindex(index=np.unique(frame[y]), columns=np.unique(frame[x]))


def categorical_mesh(ax: Axes, grid: pd.DataFrame, categories: list[str]) -> None:
    """Colour the cells of ``grid`` (a pivot from :func:`grid_of`) by category (blank where NaN)."""
    codes = grid.apply(lambda col: col.map({c: i for i, c in enumerate(categories)})).to_numpy(float)
    cmap = ListedColormap([COLOURS[c] for c in categories])
    norm = BoundaryNorm(np.arange(len(categories) + 1) - 0.5, len(categories))
    ax.pcolormesh(
        cell_edges(grid.columns),
        cell_edges(grid.index),
        np.ma.masked_invalid(codes),
        cmap=cmap,
        norm=norm,
        edgecolors="face",
        linewidth=0.0,
        rasterized=codes.size > RASTERIZE_ABOVE,
    )


def mode_labels(weight: float) -> dict[str, str]:
    """Legend names for the mode types that say which side each mode is on at ``weight``."""
    heavy, light = ("left", "right") if weight >= 0.5 else ("right", "left")
    return {classify.HEAVIER: f"heavier mode ({heavy})", classify.LIGHTER: f"lighter mode ({light})"}


def patches(categories: list[str], names: dict[str, str] | None = None) -> list[Patch]:
    names = names or {}
    return [Patch(facecolor=COLOURS[c], edgecolor="0.3", label=names.get(c, c)) for c in categories]


def context_note(result: SweepAnalysis) -> str:
    """A subtitle naming the context shown, when the sweep holds more than one."""
    cells = result.cells
    if len(in_context(cells, result.context)) == len(cells):
        return ""
    return "\n(shown: " + ", ".join(f"{k}={v}" for k, v in result.context.items()) + ")"


def phase_diagram(result: SweepAnalysis) -> Figure:
    """Outcome class (top) and order parameter sigma^2 / Var_P (bottom) over separation x weight.

    The class of a cell pools all its initialisations (rule in :mod:`analysis.classify`). Where the
    exact structure is known (:mod:`analysis.structure`) its fold lines, coexistence and crossover
    lines and cusps are drawn over the cells and the regions are labelled with the exact number of
    minima; otherwise black markers give the sweep's estimate of where the global minimum turns
    mode-seeking.
    """
    cells = in_context(result.cells, result.context)
    bounds = in_context(result.boundaries, result.context)
    divergences = divergence_order(cells["divergence"])
    categories = [o for o in classify.OUTCOMES if o != classify.NO_MINIMUM or (cells["outcome"] == o).any()]
    with style():
        fig = Figure(figsize=(4.6 * len(divergences) + 2.8, 8.4), layout="constrained")
        axes = fig.subplots(2, len(divergences), squeeze=False, sharex=True, sharey=True)
        mesh = None
        switch_shown = False
        exact_handles: dict[str, Line2D] = {}
        for j, divergence in enumerate(divergences):
            part = cells[cells["divergence"] == divergence]
            top, bottom = axes[0, j], axes[1, j]
            categorical_mesh(top, grid_of(part, "separation", "weight", "outcome", cells), categories)
            grid = grid_of(part, "separation", "weight", "order_parameter", cells)
            mesh = bottom.pcolormesh(
                cell_edges(grid.columns),
                cell_edges(grid.index),
                np.ma.masked_invalid(grid.to_numpy(float)),
                cmap="cividis",
                vmin=0.0,
                vmax=1.0,
                edgecolors="face",
                linewidth=0.0,
            )
            switch = bounds[bounds["divergence"] == divergence].dropna(subset=["global_switch_separation"])
            structure = result.structures.get(divergence)
            if structure is not None:
                exact_handles.update(draw_exact_lines(top, structure, label_regions=True))
                draw_exact_lines(bottom, structure, label_regions=False)
                switch = switch.iloc[0:0]  # the exact lines replace the grid estimate
            for ax in (top, bottom):
                if len(switch):
                    ax.plot(
                        switch["global_switch_separation"],
                        switch["weight"],
                        color="black",
                        marker="o",
                        markersize=5,
                        linewidth=1.2,
                        markerfacecolor="white",
                    )
                    switch_shown = True
                ax.grid(False)
            top.set_title(f"{divergence_title(divergence)}: outcome")
            bottom.set_title(f"{divergence_title(divergence)}: order parameter")
            bottom.set_xlabel(separation_label(result.context["component_var"]))
        for ax in axes[:, 0]:
            ax.set_ylabel("weight of left component")
        handles: list = patches(categories)
        if switch_shown:
            handles.append(
                Line2D(
                    [],
                    [],
                    color="black",
                    marker="o",
                    markerfacecolor="white",
                    label="global minimum turns\nmode-seeking",
                ),
            )
        handles += list(exact_handles.values())
        fig.legend(handles=handles, loc="outside right upper", title="outcome over inits", frameon=False)
        if mesh is not None:
            fig.colorbar(
                mesh, ax=axes[1, :].tolist(), label="order parameter\nsigma^2 / Var_P (mean over inits)"
            )
        fig.suptitle("Phase diagram: where each divergence covers or seeks a mode" + context_note(result))
    return fig


#: How each kind of exact line is drawn over the phase diagram (black and white read on any cell colour).
EXACT_LINES = {
    "fold": {
        "color": "black",
        "linewidth": 1.8,
        "linestyle": "-",
        "label": "fold line (minimum born / dies)",
    },
    "maxwell": {
        "color": "black",
        "linewidth": 1.6,
        "linestyle": "--",
        "marker": "o",
        "markersize": 3,
        "label": "coexistence: global minimum jumps",
    },
    "crossover": {
        "color": "black",
        "linewidth": 1.6,
        "linestyle": ":",
        "marker": "s",
        "markersize": 3,
        "label": "crossover: global minimum turns\nmode-seeking without a jump",
    },
}
CUSP_STYLE = {
    "marker": "*",
    "markersize": 14,
    "markerfacecolor": "white",
    "markeredgecolor": "black",
    "linestyle": "none",
    "label": "cusp (two fold lines meet)",
}
OUTLINE = [patheffects.withStroke(linewidth=3, foreground="white")]


def draw_exact_lines(ax: Axes, structure, label_regions: bool = True) -> dict[str, Line2D]:
    """Fold lines, coexistence and crossover lines and cusps of ``structure`` on a (separation, weight) axis.

    Returns legend handles by kind. With ``label_regions`` each region of constant exact number of
    minima gets a label at its most central cell.
    """
    handles: dict[str, Line2D] = {}
    limits = ax.get_xlim(), ax.get_ylim()  # curves end just past the range: keep the cells' frame
    lines = structure.fold_lines
    style_ = EXACT_LINES["fold"]
    for _, line in lines.groupby("line"):  # a handful of fold curves
        ax.plot(line["separation"], line["weight"], **{k: v for k, v in style_.items() if k != "label"})
        handles["fold"] = Line2D([], [], **style_)
    points = structure.points
    for kind in ("maxwell", "crossover"):
        part = points[points["kind"] == kind].sort_values("weight")
        if len(part):
            ax.plot(
                part["separation"],
                part["weight"],
                **{k: v for k, v in EXACT_LINES[kind].items() if k != "label"},
            )
            handles[kind] = Line2D([], [], **EXACT_LINES[kind])
    cusps = points[points["kind"] == "cusp"]
    if len(cusps):
        ax.plot(cusps["separation"], cusps["weight"], **{k: v for k, v in CUSP_STYLE.items() if k != "label"})
        handles["cusp"] = Line2D([], [], **CUSP_STYLE)
    if label_regions:
        label_count_regions(ax, structure.counts())
    if ax.has_data() and len(ax.collections):
        ax.set_xlim(*limits[0])
        ax.set_ylim(*limits[1])
    return handles


def label_count_regions(ax: Axes, counts: pd.DataFrame) -> None:
    """Write the number of minima in each connected region of constant count (regions of 3+ cells)."""
    from scipy import ndimage

    grid = counts.pivot_table(index="weight", columns="separation", values="n_minima", aggfunc="first")
    values = grid.to_numpy(float)
    w, s = grid.index.to_numpy(float), grid.columns.to_numpy(float)
    for n in np.unique(values[np.isfinite(values)]).astype(int):  # the few distinct counts
        labels, found = ndimage.label(values == n)
        for region in range(1, found + 1):  # the few regions of each count
            rows, cols = np.nonzero(labels == region)
            if len(rows) < 3:
                continue
            mean_row, mean_col = rows.mean(), cols.mean()
            k = np.argmin(
                (rows - mean_row) ** 2 / max(len(w), 1) ** 2 + (cols - mean_col) ** 2 / max(len(s), 1) ** 2
            )
            text = f"{n} minim{'um' if n == 1 else 'a'}"
            ax.text(
                s[cols[k]], w[rows[k]], text, ha="center", va="center", fontsize=8.5, path_effects=OUTLINE
            )


FOLD_MARKER = {"marker": "D", "markersize": 5.5, "markerfacecolor": "white", "markeredgecolor": "black"}


def draw_branches(ax: Axes, structure, weight: float, y: str, colour) -> None:
    """The continued branches of ``structure`` at ``weight``: ``y`` (mu, sigma2 or loss) against separation.

    Minima solid, saddle points dashed (each branch is cut where its stability changes), folds and
    pitchforks as white diamonds.
    """
    branches = structure.branches
    part = branches[np.isclose(branches["weight"], weight, rtol=0, atol=1e-12)]
    for _, line in part.groupby("branch"):  # the few branches of one weight
        x, v, stable = line["separation"].to_numpy(), line[y].to_numpy(), line["minimum"].to_numpy()
        for keep, dash, width in ((stable, "-", 2.2), (~stable, "--", 1.3)):
            # Each piece includes its neighbour across a change, so the pieces meet.
            shown = keep | np.r_[keep[1:], False] | np.r_[False, keep[:-1]]
            ax.plot(
                np.where(shown, x, np.nan),
                np.where(shown, v, np.nan),
                color=colour,
                linestyle=dash,
                linewidth=width,
                zorder=1,
            )
    points = structure.points
    folds = points[
        points["kind"].isin(["fold", "pitchfork"]) & np.isclose(points["weight"], weight, rtol=0, atol=1e-12)
    ]
    if y in folds:  # the bifurcation set has mu and sigma2, not the loss
        ax.plot(folds["separation"], folds[y], linestyle="none", zorder=3, **FOLD_MARKER)


def exact_phase_diagram(structures: list) -> Figure:
    """Without a sweep: the exact number of minima over (separation, weight), with the exact lines.

    One panel per structure (divergence); the cells are the structure's query separations and
    weights, coloured by the number of minima there.
    """
    most = max([int(s.counts()["n_minima"].max()) for s in structures if len(s.minima)] or [1])
    colours = sns.color_palette("crest", most + 1)
    with style():
        fig = Figure(figsize=(5.4 * len(structures) + 3.0, 5.4), layout="constrained")
        axes = fig.subplots(1, len(structures), squeeze=False, sharey=True)[0]
        handles: dict[str, Line2D] = {}
        for ax, structure in zip(axes, structures, strict=True):
            counts = structure.counts()
            grid = counts.pivot_table(
                index="weight", columns="separation", values="n_minima", aggfunc="first"
            )
            ax.pcolormesh(
                cell_edges(grid.columns),
                cell_edges(grid.index),
                np.ma.masked_invalid(grid.to_numpy(float)),
                cmap=ListedColormap(colours),
                norm=BoundaryNorm(np.arange(most + 2) - 0.5, most + 1),
                edgecolors="face",
                linewidth=0.0,
                rasterized=grid.size > RASTERIZE_ABOVE,
            )
            handles.update(draw_exact_lines(ax, structure, label_regions=True))
            ax.grid(False)
            ax.set_title(divergence_title(structure.divergence))
            ax.set_xlabel(separation_label(structure.component_var))
        axes[0].set_ylabel("weight of left component")
        legend = [
            Patch(facecolor=colours[n], edgecolor="0.3", label=f"{n} minim{'um' if n == 1 else 'a'}")
            for n in range(1, most + 1)
        ]
        fig.legend(
            handles=legend + list(handles.values()),
            loc="outside right upper",
            frameon=False,
            title="exact structure",
        )
        first = structures[0]
        fig.suptitle(
            "Exact phase structure (continuation)\n"
            f"center={first.center:g}, component_var={first.component_var:g}",
            x=0.02,
            ha="left",
        )
    return fig


def exact_branches(structure, max_weights: int = 6) -> Figure:
    """Without a sweep: branches (mu, sigma^2 against separation) at up to ``max_weights`` weights."""
    weights = pick_evenly(structure.weights, max_weights)
    colours = dict(zip(weights, sns.color_palette("viridis", len(weights)), strict=True))
    lo, hi = structure.separation_range
    seps = np.array([lo, hi])
    with style():
        fig = Figure(figsize=(8.0, 7.6), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
        for ax, y, label in zip(
            axes, ("mu", "sigma2"), ("mu (stationary point)", "sigma^2 (stationary point)"), strict=True
        ):
            for weight in weights:
                draw_branches(ax, structure, weight, y, colours[weight])
            if y == "mu":
                for sign in (-1, 1):
                    ax.plot(
                        seps, structure.center + sign * seps / 2, color="0.35", linestyle=":", linewidth=0.9
                    )
            ax.set_ylabel(label)
        pad = 0.02 * (hi - lo)
        axes[1].set_xlim(lo - pad, hi + pad)
        axes[1].set_xlabel(separation_label(structure.component_var))
        handles = [Line2D([], [], color=colours[w], linewidth=2, label=f"{w:g}") for w in weights]
        styles = [
            Line2D([], [], color="0.2", linewidth=2.2, label="minimum"),
            Line2D([], [], color="0.2", linewidth=1.3, linestyle="--", label="saddle"),
            Line2D([], [], **FOLD_MARKER, linestyle="none", label="fold"),
            Line2D([], [], color="0.35", linestyle=":", label="component means"),
        ]
        fig.legend(
            handles=handles, loc="outside right upper", title="weight of left\ncomponent", frameon=False
        )
        fig.legend(handles=styles, loc="outside right lower", title="stationary point", frameon=False)
        axes[0].set_title(
            f"Continued branches of stationary points: {divergence_title(structure.divergence)}"
        )
    return fig


def notebook_cases(structure, cases: pd.DataFrame) -> Figure:
    """The original notebook's cases on the exact branches of one weight, in component-sd units.

    ``structure``: the reverse KL's exact structure at the cases' weight (component_var 1, center
    0, so that separation and mu are in component sd; the KL is the same in any units);
    ``cases``: :func:`analysis.cases.case_table`. Each case's minima are drawn at its separation
    (circles: the cases as the notebook states them; squares: as its code computed them), filled
    where the notebook's start ends.
    """
    from analysis.cases import WEIGHT

    colour, mark = sns.color_palette("colorblind")[0], sns.color_palette("colorblind")[1]
    reverse = cases[cases["divergence"] == "reverse"]
    lo, hi = structure.separation_range
    markers = {"as stated": "o", "as computed": "s"}
    with style():
        fig = Figure(figsize=(10.5, 7.4), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
        for ax, y in zip(axes, ("mu", "loss"), strict=True):
            draw_branches(ax, structure, WEIGHT, y, colour)
            for variant, part in reverse.groupby("variant"):  # two variants
                values = (
                    (part["mu"] - part["center"]) / np.sqrt(part["component_var"])
                    if y == "mu"
                    else part["loss"]
                )
                reached = part["reached"].to_numpy()
                for filled in (True, False):
                    ax.plot(
                        part["separation_sd"][reached == filled],
                        values[reached == filled],
                        linestyle="none",
                        marker=markers[variant],
                        markersize=10,
                        markeredgewidth=1.8,
                        markeredgecolor="0.1",
                        markerfacecolor=mark if filled else "none",
                        zorder=4,
                    )
            for row in reverse.drop_duplicates(["variant", "case"]).itertuples():
                ax.axvline(row.separation_sd, color="0.4", linestyle=":", linewidth=1.0, zorder=0)
        for row in reverse.drop_duplicates(["variant", "case"]).itertuples():
            axes[0].annotate(
                f"{row.case}, {row.variant} ({row.separation_sd:.1f} sd)",
                (row.separation_sd, 0.1),
                xycoords=("data", "axes fraction"),
                xytext=(-8, 0),
                textcoords="offset points",
                rotation=90,
                ha="right",
                va="bottom",
                fontsize="x-small",
            )
        axes[0].set_ylabel("(mu - center) / component sd")
        axes[1].set_ylabel("reverse KL (nats)")
        axes[1].set_xlabel(SEPARATION_LABEL)
        axes[1].set_xlim(lo, hi + 0.02 * (hi - lo))
        axes[0].set_title(
            f"The original notebook's cases on the exact branches: reverse KL, weight {WEIGHT:g}"
        )

        def dot(marker: str, face, label: str) -> Line2D:
            return Line2D(
                [],
                [],
                marker=marker,
                linestyle="none",
                markersize=9,
                markeredgecolor="0.1",
                markerfacecolor=face,
                label=label,
            )

        handles = [
            Line2D([], [], color=colour, linewidth=2.2, label="minimum (exact branch)"),
            Line2D([], [], color=colour, linewidth=1.3, linestyle="--", label="saddle"),
            Line2D([], [], **FOLD_MARKER, linestyle="none", label="fold"),
            dot("o", "0.6", "case as the notebook states it\n(component variance 0.05)"),
            dot("s", "0.6", "case as its code computed it\n(component variance 0.05 pi)"),
            dot("o", mark, "minimum the notebook's start reaches"),
            dot("o", "none", "the other minimum"),
        ]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
    return fig


def broken_line(part: pd.DataFrame, y: str) -> tuple[np.ndarray, np.ndarray]:
    """x (separation) and y of every run's line, sorted by ``unit`` then separation, with NaN gaps.

    A line is cut between units and wherever the run jumps to another type of optimum, so
    that a jump between basins is not drawn as if it were a branch.
    """
    unit, reached = part["unit"].to_numpy(), part["reached"].to_numpy()
    breaks = np.flatnonzero((unit[1:] != unit[:-1]) | (reached[1:] != reached[:-1])) + 1
    return (
        np.insert(part["separation"].to_numpy(float), breaks, np.nan),
        np.insert(part[y].to_numpy(float), breaks, np.nan),
    )


def bifurcation_diagram(result: SweepAnalysis) -> Figure:
    """Final mu (top) and sigma^2 (bottom) against separation: a colour per weight, a line per initialisation.

    Converged runs only. Each initialisation (init_mu, init_sigma2, optimizer, lr) is followed
    across separations, so where the fits branch the lines of one weight split; a line is cut where
    its run jumps to another type of optimum (another basin). At most 6 weights and 40 starting
    means per weight are drawn, evenly chosen among the swept ones (:mod:`analysis.drawn`, which
    also thins the separations of a very large sweep).
    """
    drawn = result.drawn
    divergences = divergence_order(in_context(result.cells, result.context)["divergence"])
    weights = drawn.bifurcation_weights
    n_skipped = int(in_context(result.cells, result.context)["n_not_converged"].sum())
    runs = result.runs[drawn.in_bifurcation(result.runs)]
    colours = dict(zip(weights, sns.color_palette("viridis", len(weights)), strict=True))
    unit_id = runs.groupby(["weight", *RUN_KEYS], dropna=False).ngroup().to_numpy()
    runs = runs.assign(unit=unit_id).sort_values(["unit", "separation"])
    seps = np.unique(runs["separation"])
    centre = float(result.context["center"]) if pd.notna(result.context["center"]) else 0.0
    with style():
        fig = Figure(figsize=(5.2 * len(divergences) + 2.0, 8.2), layout="constrained")
        axes = fig.subplots(2, len(divergences), squeeze=False, sharex=True, sharey="row")
        for j, divergence in enumerate(divergences):
            part = runs[runs["divergence"] == divergence]
            structure = result.structures.get(divergence)
            for row, y in enumerate(("mu", "sigma2")):
                ax = axes[row, j]
                for weight in weights:
                    sub = part[part["weight"] == weight]
                    if structure is not None:
                        draw_branches(ax, structure, weight, y, colours[weight])
                        ax.plot(
                            sub["separation"],
                            sub[y],
                            color=colours[weight],
                            linestyle="none",
                            marker="o",
                            markersize=2.4,
                            alpha=0.75,
                            zorder=2,
                            rasterized=len(part) > RASTERIZE_ABOVE // 2,
                        )
                        continue
                    x, yy = broken_line(sub, y)
                    ax.plot(
                        x,
                        yy,
                        color=colours[weight],
                        linewidth=1.0,
                        alpha=0.55,
                        marker="o",
                        markersize=2.5,
                        rasterized=len(part) > RASTERIZE_ABOVE // 2,
                    )
                if y == "mu":
                    for sign in (-1, 1):
                        ax.plot(seps, centre + sign * seps / 2, color="0.35", linestyle="--", linewidth=0.9)
            axes[0, j].set_title(f"{divergence_title(divergence)}")
            axes[1, j].set_xlabel(separation_label(result.context["component_var"]))
            if len(seps):  # continued branches end one step past the swept range
                pad = 0.02 * (seps.max() - seps.min())
                axes[1, j].set_xlim(seps.min() - pad, seps.max() + pad)
        axes[0, 0].set_ylabel("mu (final fit)")
        axes[1, 0].set_ylabel("sigma^2 (final fit)")
        handles = [
            Line2D([], [], color=colours[w], marker="o", markersize=4, label=f"{w:g}") for w in weights
        ]
        handles.append(Line2D([], [], color="0.35", linestyle="--", label="component means"))
        title = "Bifurcation diagram: final fit against separation, one line per initialisation"
        if result.structures:
            handles += [
                Line2D([], [], color="0.2", linewidth=1.6, label="continued minima"),
                Line2D([], [], color="0.2", linewidth=1.2, linestyle="--", label="continued saddles"),
                Line2D([], [], **FOLD_MARKER, linestyle="none", label="fold"),
                Line2D(
                    [], [], color="0.2", marker="o", linestyle="none", markersize=4, label="sweep end points"
                ),
            ]
            title = "Bifurcation diagram: exact branches (lines) and the sweep's end points (dots)"
        fig.legend(handles=handles, loc="outside right upper", title="weight", frameon=False)
        note = f"; {n_skipped} non-converged runs not shown" if n_skipped else ""
        fig.suptitle(title + note + context_note(result))
    return fig


def drawn_weight(result: SweepAnalysis, weight: float) -> float:
    """The swept weight of the figures' context nearest ``weight``: the one whose runs were kept."""
    weight = nearest_value(in_context(result.cells, result.context)["weight"], weight)
    if weight != result.drawn.weight:
        raise ValueError(
            f"the runs of weight {weight:g} were not kept: analyse(..., weight={weight:g}) keeps them "
            f"(this analysis kept weight {result.drawn.weight:g})"
        )
    return weight


def basin_map(result: SweepAnalysis, weight: float) -> Figure:
    """For one weight: which kind of optimum each init_mu (y) reaches at each separation (x), per divergence.

    Only runs with the most common (optimizer, lr, init_sigma2) are shown, so each grid cell is one run.
    Dashed lines: the component means; dotted: the mixture mean (the moment-matched fit).
    """
    weight = drawn_weight(result, weight)
    runs = result.runs[result.drawn.in_basin(result.runs)]
    divergences = divergence_order(runs["divergence"])
    order = [classify.COVERING, classify.HEAVIER, classify.LIGHTER, classify.SADDLE, NOT_CONVERGED]
    categories = [c for c in order if c in set(runs["reached"]) or c in order[:3]]
    seps = cell_edges(runs["separation"])[[0, -1]]  # straight lines: the two ends suffice
    centre = float(runs["center"].iloc[0])
    mean = centre + seps * (0.5 - weight)
    first = runs.iloc[0]
    with style():
        fig = Figure(figsize=(4.8 * len(divergences) + 2.8, 5.0), layout="constrained")
        axes = fig.subplots(1, len(divergences), squeeze=False, sharey=True)[0]
        for ax, divergence in zip(axes, divergences, strict=True):
            part = runs[runs["divergence"] == divergence]
            categorical_mesh(ax, grid_of(part, "separation", "init_mu", "reached", runs), categories)
            for sign in (-1, 1):
                ax.plot(seps, centre + sign * seps / 2, color="black", linestyle="--", linewidth=1.2)
            ax.plot(seps, mean, color="black", linestyle=":", linewidth=1.5)
            ax.set_xlim(*seps)
            ax.set_ylim(cell_edges(runs["init_mu"])[[0, -1]])
            ax.grid(False)
            ax.set_title(divergence_title(divergence))
            ax.set_xlabel(separation_label(result.context["component_var"]))
        axes[0].set_ylabel("init_mu (starting mean)")
        handles: list = patches(categories, mode_labels(weight))
        handles += [
            Line2D([], [], color="black", linestyle="--", label="component means"),
            Line2D([], [], color="black", linestyle=":", label="mixture mean"),
        ]
        fig.legend(handles=handles, loc="outside right upper", title="optimum reached", frameon=False)
        fig.suptitle(
            f"Basin map at weight {weight:g}: which optimum each starting mean reaches\n"
            f"(init_sigma2={first['init_sigma2']:g}, optimizer={first['optimizer']}, lr={first['lr']:g})"
            + context_note(result)
        )
    return fig


def overlay_separations(result: SweepAnalysis, weight: float) -> list[float]:
    """A small separation (the swept one nearest 2 component sd) and the largest swept one."""
    cells = in_context(result.cells, result.context)
    seps = np.unique(cells.loc[cells["weight"] == weight, "separation"])
    sd = float(np.sqrt(cells["component_var"].iloc[0]))
    small, large = nearest_value(seps, 2.0 * sd), float(seps.max())
    return [small] if small == large else [small, large]


def fit_overlays(result: SweepAnalysis, weight: float, separations: list[float] | None = None) -> Figure:
    """P and each divergence's distinct minima as normalised densities, at a small and a large separation.

    The legend gives each fit's type and the share of converged initialisations that reached it.
    """
    optima = in_context(result.optima, result.context)
    cells = in_context(result.cells, result.context)
    weight = nearest_value(cells["weight"], weight)
    separations = separations or overlay_separations(result, weight)
    minima = optima[classify.is_minimum(optima) & (optima["weight"] == weight)]
    styles = ["-", "--", ":", "-."]
    names = mode_labels(weight)
    with style():
        fig = Figure(figsize=(6.2 * len(separations), 5.4), layout="constrained")
        axes = fig.subplots(1, len(separations), squeeze=False)[0]
        for ax, separation in zip(axes, separations, strict=True):
            here = minima[minima["separation"] == separation]
            cell = cells.query("weight == @weight and separation == @separation")
            cell = cell.iloc[0][["separation", "weight", "center", "component_var"]].astype(float)
            sd = np.sqrt(cell["component_var"])
            left, right = cell["center"] - separation / 2, cell["center"] + separation / 2
            fit_sd = np.sqrt(here["sigma2"].to_numpy(float))
            fit_mu = here["mu"].to_numpy(float)
            lo = float(np.min(np.append(fit_mu - 3.5 * fit_sd, left - 4 * sd)))
            hi = float(np.max(np.append(fit_mu + 3.5 * fit_sd, right + 4 * sd)))
            x = np.linspace(lo, hi, 1200)
            p = mixture_density(cell, x)
            ax.fill_between(x, p, color="0.75", alpha=0.6, linewidth=0)
            ax.plot(x, p, color="0.3", linewidth=1.5, label="P (mixture)")
            for divergence in divergence_order(here["divergence"]):
                fits = here[here["divergence"] == divergence].sort_values("share", ascending=False)
                q = gaussian_density(x, fits["mu"].to_numpy(float), fits["sigma2"].to_numpy(float))
                colour = DIVERGENCE_COLOURS.get(divergence, PALETTE[len(DIVERGENCE_COLOURS) + 2])
                for k, (density, (_, fit)) in enumerate(zip(q, fits.iterrows(), strict=True)):  # a few optima
                    kind = names.get(fit["type"], fit["type"])
                    ax.plot(
                        x,
                        density,
                        color=colour,
                        linestyle=styles[k % len(styles)],
                        linewidth=2.2,
                        label=f"{divergence_title(divergence)}: {kind}, {fit['share']:.0%} of inits",
                    )
            top = max(float(np.max(line.get_ydata())) for line in ax.get_lines())
            ax.set_ylim(0, 1.5 * top)  # headroom for the legend
            ax.set_xlim(lo, hi)
            ax.set_title(f"separation {separation:g} component sd")
            ax.set_xlabel("x (component sd)")
            ax.set_ylabel("density")
            ax.legend(loc="upper right", fontsize="small", framealpha=0.9)
        fig.suptitle(
            f"P and the fitted Gaussians Q at weight {weight:g} (normalised densities)" + context_note(result)
        )
    return fig


def landscape_cell(result: SweepAnalysis, weight: float, divergence: str) -> pd.Series:
    """The configuration the landscape shows: ``divergence`` at ``weight`` and the largest separation."""
    cells = in_context(result.cells, result.context)
    cells = cells[cells["divergence"] == divergence]
    weight = nearest_value(cells["weight"], weight)
    cells = cells[cells["weight"] == weight]
    return cells[cells["separation"] == cells["separation"].max()].iloc[0]


def loss_landscape(result: SweepAnalysis, weight: float, divergence: str | None = None) -> Figure:
    """The divergence over (mu, log sigma) for one configuration (largest separation), with the sweep's runs.

    Filled contours on a log scale (one batched quadrature evaluation of the whole grid); white
    circles are the starting points, joined by a straight line to where each run ended (not its
    path); stars are the distinct minima (an X a saddle); the plus sign is the moment-matched fit.
    Defaults to the reverse KL (the runs of the cell :mod:`analysis.drawn` kept).
    """
    divergence = divergence or result.drawn.landscape["divergence"]
    cell = landscape_cell(result, weight, divergence)
    keys = ["divergence", "separation", "weight"]
    if any(cell[k] != result.drawn.landscape[k] for k in keys):
        raise ValueError(f"the runs of {divergence} at weight {cell['weight']:g} were not kept")
    keys = ["separation", "weight"]
    runs = result.runs[result.drawn.in_landscape(result.runs)]
    optima = in_context(result.optima, result.context)
    optima = optima[(optima["divergence"] == divergence) & (optima[keys] == cell[keys]).all(axis=1)]
    c, s, v, w = (float(cell[k]) for k in ("center", "separation", "component_var", "weight"))
    sd, mm_mean, mm_var = np.sqrt(v), c + s * (0.5 - w), v + w * (1 - w) * s**2
    mus = np.concatenate([[c - s / 2 - 3 * sd, c + s / 2 + 3 * sd], runs["init_mu"], runs["mu"]])
    log_sds = 0.5 * np.log(np.concatenate([[0.09 * v, 2.0 * mm_var], runs["init_sigma2"], runs["sigma2"]]))
    mu_grid = np.linspace(np.nanmin(mus) - 0.5 * sd, np.nanmax(mus) + 0.5 * sd, 241)
    ls_grid = np.linspace(np.nanmin(log_sds) - 0.2, np.nanmax(log_sds) + 0.2, 181)
    loss = divergence_grid(divergence, cell, mu_grid, ls_grid)
    floor = max(float(np.nanmin(loss)), 1e-3)
    levels = np.geomspace(floor, max(float(np.nanquantile(loss, 0.9)), 10 * floor), 22)
    conv = runs[runs["converged"]]
    outlined = [patheffects.withStroke(linewidth=2.6, foreground="black")]
    n_minima = int(classify.is_minimum(optima).sum())
    with style():
        fig = Figure(figsize=(9.6, 7.0), layout="constrained")
        ax = fig.subplots()
        filled = ax.contourf(
            mu_grid,
            ls_grid,
            np.clip(loss, floor, levels[-1]),
            levels=levels,
            norm=LogNorm(floor, levels[-1]),
            cmap="cividis",
        )
        ax.contour(mu_grid, ls_grid, loss, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.5)
        fig.colorbar(
            filled,
            ax=ax,
            label="loss (nats), log scale",
            ticks=nice_log_ticks(floor, levels[-1]),
            format="%.3g",
        )
        starts = np.column_stack([conv["init_mu"], 0.5 * np.log(conv["init_sigma2"])])
        ends = np.column_stack([conv["mu"], 0.5 * np.log(conv["sigma2"])])
        segments = np.full((3 * len(starts), 2), np.nan)
        segments[0::3], segments[1::3] = starts, ends
        ax.plot(segments[:, 0], segments[:, 1], color="white", linewidth=0.8, alpha=0.7)
        ax.plot(
            starts[:, 0],
            starts[:, 1],
            "o",
            markerfacecolor="white",
            markeredgecolor="black",
            markersize=5,
            label="starting points (init_mu, log of init sd)",
        )
        labels = mode_labels(w)
        for _, opt in optima.iterrows():  # the few distinct optima of this configuration
            saddle = opt["kind"] == classify.SADDLE
            kind = classify.SADDLE if saddle else labels.get(opt["type"], opt["type"])
            ax.plot(
                opt["mu"],
                0.5 * np.log(opt["sigma2"]),
                marker="X" if saddle else "*",
                linestyle="none",
                markersize=17,
                markerfacecolor=COLOURS[classify.SADDLE if saddle else opt["type"]],
                markeredgecolor="black",
                markeredgewidth=1.0,
                label=f"{kind}: loss {opt['loss']:.3g} nats, {opt['n_runs']} of {len(conv)} runs",
            )
        ax.plot(
            mm_mean,
            0.5 * np.log(mm_var),
            marker="P",
            markersize=12,
            linestyle="none",
            color="white",
            markeredgecolor="black",
            label="moment-matched fit (forward-KL optimum)",
        )
        for sign in (-1, 1):
            ax.axvline(c + sign * s / 2, color="white", linestyle="--", linewidth=1.2, path_effects=outlined)
        ax.plot(
            [],
            [],
            color="white",
            linestyle="--",
            linewidth=1.2,
            path_effects=outlined,
            label="component means",
        )
        ax.set_xlabel("mu")
        ax.set_ylabel("log sigma")
        ax.grid(False)
        fig.legend(loc="outside lower center", ncol=2, fontsize="small", frameon=False)
        ax.set_title(
            f"{divergence_title(divergence)} over (mu, log sigma), separation {s:g} component sd, "
            f"weight {w:g}:\n"
            f"{n_minima} distinct minima reached by the sweep's {len(conv)} converged runs"
            + context_note(result)
        )
    return fig


def nice_log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between ``lo`` and ``hi`` for a log colour scale, with both ends."""
    decades = np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
    ticks = (10.0 ** decades[:, None] * np.array([1.0, 2.0, 5.0])).ravel()
    inner = ticks[(ticks > lo * 1.15) & (ticks < hi / 1.15)]
    return [lo, *inner, hi]


#: Every figure ``python -m analysis`` writes, by file name.
FIGURES: dict[str, Callable[[SweepAnalysis, float], Figure]] = {
    "phase_diagram": lambda result, weight: phase_diagram(result),
    "bifurcation": lambda result, weight: bifurcation_diagram(result),
    "basin_map": basin_map,
    "fit_overlays": fit_overlays,
    "loss_landscape": loss_landscape,
}


def save(fig: Figure, directory: Path, name: str) -> list[Path]:
    """Write ``fig`` as PNG and SVG into ``directory``; return the two paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=DPI)
    return paths


def write_figures(result: SweepAnalysis, directory: Path, weight: float) -> list[Path]:
    """Write every figure of :data:`FIGURES` as PNG and SVG into ``directory``; return the paths."""
    written = []
    for name, make in FIGURES.items():
        written += save(make(result, weight), directory, name)
    return written


# ---------------------------------------------------------------------------------------------
# The alpha family (analysis.alpha): phase diagram over (separation, alpha), folds, fits across alpha

#: Named members of the family, drawn as reference lines on the alpha axes.
ALPHA_REFERENCES = {0.0: "a = 0: reverse KL(Q||P)", 0.5: "a = 1/2: 4 H^2", 1.0: "a = 1: forward KL(P||Q)"}
#: The alphas of the fit overlays (Minka 2005, Figure 1), each matched to the nearest swept alpha.
FIT_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)
#: Separations of the fit overlays (the swept ones nearest): a gradual change, then a split into modes.
FIT_SEPARATIONS = (4.0, 6.0)
HEAVIER_BORN = "heavier mode born\n(weight 1/2: both modes)"
#: Line style of each fold of the alpha-divergence, by the minimum it creates or destroys.
FOLD_STYLES = {
    ("heavier mode", "birth"): {"linestyle": "-", "label": HEAVIER_BORN},
    ("either mode", "birth"): {"linestyle": "-", "label": HEAVIER_BORN},
    ("lighter mode", "birth"): {"linestyle": "--", "label": "lighter mode born"},
    ("covering", "death"): {"linestyle": ":", "label": "covering minimum dies"},
}
#: Markers for the ends of fold curves that mean something: a cusp, a turn next to the edge.
FOLD_ENDS = {
    "meets another fold": {**CUSP_STYLE, "label": "cusp (two folds meet)"},
    "turns back in alpha": {
        "marker": "o",
        "markersize": 7,
        "markerfacecolor": "white",
        "markeredgecolor": "black",
        "linestyle": "none",
        "label": "fold curve turns back\nnext to the edge",
    },
}
NO_MINIMUM_COLOUR = (0.82, 0.82, 0.82)


def count_colours(most: int) -> list:
    """Distinct sequential colours for 1..``most`` minima (crest, light to dark, evenly apart)."""
    cmap = sns.color_palette("crest", as_cmap=True)
    return [cmap(x) for x in np.linspace(0.0, 1.0, most)]


def fold_curves(folds: pd.DataFrame, weight: float) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    """The fold curves of one weight, ((branch, event), points sorted by alpha); mirror images merged.

    At weight 1/2 the two modes are born at the same separation for every alpha: one curve,
    called ``either mode``.
    """
    part = folds[np.isclose(folds["weight"].astype(float), weight, rtol=0, atol=1e-12)]
    curves = {key: line.sort_values("alpha") for key, line in part.groupby(["branch", "event"])}
    heavy, light = curves.get(("heavier mode", "birth")), curves.get(("lighter mode", "birth"))
    if heavy is not None and light is not None:
        both = heavy.merge(light, on="alpha", suffixes=("", "_other"))
        if len(both) == len(heavy) == len(light) and np.allclose(
            both["separation"], both["separation_other"], rtol=1e-9, atol=0
        ):
            del curves[("heavier mode", "birth")], curves[("lighter mode", "birth")]
            curves[("either mode", "birth")] = heavy
    return list(curves.items())


def draw_fold_ends(ax: Axes, folds: pd.DataFrame, weight: float, x: str, y: str) -> dict[str, Line2D]:
    """Mark where fold curves end in a cusp or turn back next to the edge; return legend handles."""
    part = folds[np.isclose(folds["weight"].astype(float), weight, rtol=0, atol=1e-12)]
    handles = {}
    for start, style_ in FOLD_ENDS.items():  # two kinds of end
        ends = part[part["end"].str.startswith(start)].drop_duplicates(subset=["alpha"])
        if len(ends):
            ax.plot(ends[x], ends[y], zorder=5, **{k: v for k, v in style_.items() if k != "label"})
            handles[style_["label"]] = Line2D([], [], **style_)
    return handles


def alpha_reference_lines(ax: Axes, horizontal: bool) -> None:
    """Dotted lines at a = 0, 1/2 and 1, each named (reverse KL, 4 H^2, forward KL)."""
    for a, name in ALPHA_REFERENCES.items():
        if horizontal:
            ax.axhline(a, color="0.15", linestyle=":", linewidth=1.0, zorder=2)
            ax.annotate(
                name,
                (0.015, a),
                xycoords=("axes fraction", "data"),
                ha="left",
                va="bottom",
                fontsize=8,
                path_effects=OUTLINE,
                zorder=4,
            )
        else:
            ax.axvline(a, color="0.15", linestyle=":", linewidth=1.0, zorder=2)
            ax.annotate(
                name,
                (a, 0.985),
                xycoords=("data", "axes fraction"),
                ha="left",
                va="top",
                rotation=90,
                fontsize=8,
                path_effects=OUTLINE,
                zorder=4,
            )


def _alpha_label(a: float) -> str:
    """An alpha as the sweep meant it: range() leaves 5.6e-17 where it meant 0."""
    return f"{round(float(a), 10) + 0.0:g}"


def alpha_phase_diagram(analysis) -> Figure:
    """Distinct minima per (separation, alpha) cell, one panel per weight, with the exact folds.

    Cells: how many distinct minima the sweep's converged runs found (rules of
    :mod:`analysis.classify`, each alpha its own objective); hatched where one of them lies on the
    edge of the finite region (a < 0). Lines: the exact folds of
    :func:`analysis.alpha.fold_versus_alpha`, with their cusps and turning points.
    """
    cells, folds = analysis.cells, analysis.folds
    weights = analysis.weights
    most = max(3, int(cells["n_optima"].max()))
    colours = count_colours(most)
    alphas, seps = np.unique(cells["alpha"]), np.unique(cells["separation"])
    x_edges, y_edges = cell_edges(seps), cell_edges(alphas)
    with style():
        fig = Figure(figsize=(4.8 * len(weights) + 3.4, 6.2), layout="constrained")
        axes = fig.subplots(1, len(weights), squeeze=False, sharey=True)[0]
        shown: dict[str, Line2D] = {}
        ends: dict[str, Line2D] = {}
        for ax, weight in zip(axes, weights, strict=True):
            part = cells[cells["weight"] == weight]
            grid = part.pivot_table(index="alpha", columns="separation", values="n_optima", aggfunc="first")
            grid = grid.reindex(index=alphas, columns=seps)
            ax.pcolormesh(
                x_edges,
                y_edges,
                np.ma.masked_invalid(grid.to_numpy(float)),
                cmap=ListedColormap([NO_MINIMUM_COLOUR, *colours]),
                norm=BoundaryNorm(np.arange(most + 2) - 0.5, most + 1),
                edgecolors="face",
                linewidth=0.0,
            )
            edge = part[part["n_boundary"] > 0]
            ix, iy = np.searchsorted(seps, edge["separation"]), np.searchsorted(alphas, edge["alpha"])
            for i, j in zip(ix, iy, strict=True):  # hatched cells (tens to hundreds)
                ax.add_patch(
                    mpl.patches.Rectangle(
                        (x_edges[i], y_edges[j]),
                        x_edges[i + 1] - x_edges[i],
                        y_edges[j + 1] - y_edges[j],
                        fill=False,
                        hatch="///",
                        edgecolor="0.15",
                        linewidth=0.0,
                    )
                )
            for key, line in fold_curves(folds, weight):  # a few fold curves
                style_ = FOLD_STYLES[key]
                ax.plot(
                    line["separation"],
                    line["alpha"],
                    color="black",
                    linewidth=2.0,
                    linestyle=style_["linestyle"],
                    path_effects=[patheffects.withStroke(linewidth=3.8, foreground="white")],
                    zorder=3,
                )
                shown[style_["label"]] = Line2D(
                    [], [], color="black", linewidth=2.0, linestyle=style_["linestyle"], label=style_["label"]
                )
            ends.update(draw_fold_ends(ax, folds, weight, "separation", "alpha"))
            split = _edge_split_curve(analysis, weight)
            if len(split):
                ax.plot(
                    split["separation"],
                    split["alpha"],
                    color="black",
                    linewidth=2.0,
                    linestyle="-.",
                    path_effects=[patheffects.withStroke(linewidth=3.8, foreground="white")],
                    zorder=3,
                )
                shown[EDGE_SPLIT_LABEL] = Line2D(
                    [], [], color="black", linewidth=2.0, linestyle="-.", label=EDGE_SPLIT_LABEL
                )
            alpha_reference_lines(ax, horizontal=True)
            ax.set_xlim(x_edges[0], x_edges[-1])
            ax.set_ylim(y_edges[0], y_edges[-1])
            ax.grid(False)
            ax.set_title(f"weight of left component {weight:g}")
            ax.set_xlabel(separation_label(analysis.context["component_var"]))
        axes[0].set_ylabel("alpha (order a of D_a(P||Q))")
        legend = [Patch(facecolor=NO_MINIMUM_COLOUR, edgecolor="0.3", label="no converged minimum")]
        legend = legend if (cells["n_optima"] == 0).any() else []
        legend += [
            Patch(facecolor=colours[n - 1], edgecolor="0.3", label=f"{n} minim{'um' if n == 1 else 'a'}")
            for n in range(1, most + 1)
        ]
        legend.append(
            Patch(
                facecolor="white",
                edgecolor="0.15",
                hatch="///",
                label="a minimum on the edge\nof the finite region",
            )
        )
        if shown:
            legend.append(Line2D([], [], linestyle="none", label="\nexact folds:"))
            legend += list(shown.values()) + list(ends.values())
        fig.legend(handles=legend, loc="outside right upper", frameon=False, title="distinct minima (sweep)")
        fig.suptitle(
            "Alpha-divergence D_a(P||Q): distinct minima the sweep found over its starts, and the exact folds"
            + _alpha_context_note(analysis),
            x=0.02,
            ha="left",
        )
    return fig


def _alpha_context_note(analysis) -> str:
    """A subtitle naming the context shown, when the sweep's alpha rows hold several."""
    return "".join("\n(shown: " + n.split("shown: ")[-1] + ")" for n in analysis.notes if "shown:" in n)


GRID_ONSET_LABEL = (
    "sweep: first swept separation with\ntwo distinct minima (bar: from\nthe swept separation below)"
)
#: What each fold curve is, in the fold figure's legend (one entry per weight and curve).
CURVE_NAMES = {
    ("heavier mode", "birth"): "heavier mode born",
    ("either mode", "birth"): "both modes born (mirror images)",
    ("lighter mode", "birth"): "lighter mode born",
    ("covering", "death"): "covering minimum dies",
}
#: Upper limit of the left panel of :func:`alpha_fold_curve` (component sd); the right panel goes on.
FOLD_AXIS_TOP = 14.0


def _onset_on_edge(cells: pd.DataFrame, onsets: pd.DataFrame) -> np.ndarray:
    """For each onset row, whether a minimum of its cell at ``onset_grid`` lies on the edge."""
    edge = cells[cells["n_boundary"] > 0][["weight", "alpha", "separation"]].assign(on_edge=True)
    merged = onsets[["weight", "alpha", "onset_grid"]].merge(
        edge,
        left_on=["weight", "alpha", "onset_grid"],
        right_on=["weight", "alpha", "separation"],
        how="left",
    )
    return merged["on_edge"].astype("boolean").fillna(False).to_numpy(bool)


def _dots(ax: Axes, x, y, marker: str, face, edge) -> None:
    ax.plot(
        x,
        y,
        linestyle="none",
        marker=marker,
        markersize=5,
        markerfacecolor=face,
        markeredgecolor=edge,
        zorder=4,
    )


EDGE_SPLIT_LABEL = "covering fit on the edge\nsplits in two (exact)"


def _edge_split_curve(analysis, weight: float) -> pd.DataFrame:
    """The exact edge split (alpha < 0, weight 1/2) on a fine alpha grid over the swept alphas < 0."""
    if not np.isclose(weight, 0.5) or analysis.onsets["edge_split"].isna().all():
        return pd.DataFrame(columns=["alpha", "separation"])
    from kl_sweep.core.bifurcation import edge_pitchfork
    from kl_sweep.core.divergences import get_divergence
    from kl_sweep.core.landscape import Landscape

    low = float(analysis.alphas.min())
    rows = []
    with float64(), torch.no_grad():
        for a in np.linspace(low, -0.02, 40):  # points of one curve
            landscape = Landscape(
                get_divergence("alpha"),
                center=float(analysis.context["center"]),
                component_var=float(analysis.context["component_var"]),
                alpha=float(a),
            )
            found = edge_pitchfork(landscape, (1e-3, 40.0), samples=120)
            if found.numel():
                rows.append((a, float(found.min())))
    return pd.DataFrame(rows, columns=["alpha", "separation"])


def alpha_fold_curve(analysis) -> Figure:
    """The exact fold separations against alpha (left) and, on log-log axes, against 1 - alpha (right).

    Left: each fold of each weight (colour per weight, line style per minimum) under the sweep's
    grid onsets: a dot at the first swept separation with two distinct minima (a square where a
    minimum there lies on the edge of the finite region), a bar down to the swept separation
    below it (an exact onset of the same kind lies in between), an open triangle at the top of the
    swept range where the sweep never found two. Right: the births for alpha in [1/2, 1) against
    1 - alpha, with slope -1/2 for reference and the fitted slope over a >= 0.95 in the title.
    """
    folds, onsets = analysis.folds, analysis.onsets
    weights = analysis.weights
    colours = dict(zip(weights, sns.color_palette("colorblind", len(weights)), strict=True))
    top = float(analysis.separations.max())
    shift = dict(zip(weights, 0.012 * (np.arange(len(weights)) - (len(weights) - 1) / 2), strict=True))
    with style():
        fig = Figure(figsize=(13.2, 5.8), layout="constrained")
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1.0]})
        handles: dict[str, object] = {}
        ends: dict[str, Line2D] = {}
        left.axhspan(0, top, color="0.94", zorder=0)
        slopes = []
        for weight in weights:  # two or three weights
            colour = colours[weight]
            for key, line in fold_curves(folds, weight):  # a few fold curves
                dash = FOLD_STYLES[key]["linestyle"]
                left.plot(line["alpha"], line["separation"], color=colour, linestyle=dash, linewidth=2.0)
                label = f"w = {weight:g}: {CURVE_NAMES[key]}"
                handles[label] = Line2D([], [], color=colour, linestyle=dash, linewidth=2.0, label=label)
                high = line[(line["alpha"] >= 0.5) & (line["alpha"] < 1.0)]
                if key[1] == "birth" and len(high):
                    right.plot(
                        1 - high["alpha"], high["separation"], color=colour, linestyle=dash, linewidth=2.0
                    )
                    near = high[high["alpha"] >= 0.95]
                    if len(near) > 2:
                        fit = np.polyfit(np.log(1 - near["alpha"]), np.log(near["separation"]), 1)
                        slopes.append(-fit[0])
            ends.update(draw_fold_ends(left, folds, weight, "alpha", "separation"))
            split = _edge_split_curve(analysis, weight)
            if len(split):
                left.plot(split["alpha"], split["separation"], color=colour, linestyle="-.", linewidth=2.0)
                label = f"w = {weight:g}: {EDGE_SPLIT_LABEL}"
                handles[label] = Line2D([], [], color=colour, linestyle="-.", linewidth=2.0, label=label)
            mine = onsets[onsets["weight"] == weight]
            seen = mine.dropna(subset=["onset_grid"])
            x = (seen["alpha"] + shift[weight]).to_numpy()
            left.vlines(x, seen["onset_lower"].fillna(0.0), seen["onset_grid"], color=colour, linewidth=1.0)
            on_edge = _onset_on_edge(analysis.cells, seen)
            y = seen["onset_grid"].to_numpy()
            _dots(left, x[~on_edge], y[~on_edge], "o", colour, "0.1")
            _dots(left, x[on_edge], y[on_edge], "s", colour, "0.1")
            never = mine[mine["onset_grid"].isna()]
            _dots(left, never["alpha"] + shift[weight], np.full(len(never), top), "^", "white", colour)
            if on_edge.any():
                handles["edge onset"] = Line2D(
                    [],
                    [],
                    linestyle="none",
                    marker="s",
                    markerfacecolor="0.6",
                    markeredgecolor="0.1",
                    label="sweep, as above, with a minimum\non the edge of the finite region",
                )
        grid = Line2D(
            [],
            [],
            linestyle="-",
            linewidth=1.0,
            marker="o",
            color="0.4",
            markerfacecolor="0.6",
            markeredgecolor="0.1",
            label=GRID_ONSET_LABEL,
        )
        never = Line2D(
            [],
            [],
            linestyle="none",
            marker="^",
            markerfacecolor="white",
            markeredgecolor="0.3",
            label=f"sweep: never two minima up to {top:g} sd",
        )
        edge_onset = {"edge onset": handles.pop("edge onset")} if "edge onset" in handles else {}
        band = Patch(facecolor="0.94", label="swept separations")
        handles = {**handles, **ends, "grid": grid, **edge_onset, "never": never, "band": band}
        alpha_reference_lines(left, horizontal=False)
        left.set_xlabel("alpha (order a of D_a(P||Q))")
        left.set_ylabel("separation (component sd)")
        left.set_ylim(0, max(FOLD_AXIS_TOP, top * 1.1))
        left.set_title("Where a minimum is born (or dies), against alpha")
        high = folds[(folds["event"] == "birth") & (folds["alpha"] >= 0.5)]
        if len(high):  # slope -1/2 through the point nearest a = 1: d proportional to (1 - a)^(-1/2)
            anchor = high.loc[high["alpha"].idxmax()]
            eps = np.array([1 - anchor["alpha"], 0.5])
            reference = anchor["separation"] * np.sqrt((1 - anchor["alpha"]) / eps)
            right.plot(eps, reference, color="0.45", linestyle="-.", linewidth=1.2)
            handles["slope"] = Line2D(
                [], [], color="0.45", linestyle="-.", label="slope -1/2: d ~ (1 - a)^(-1/2)"
            )
            right.set_xscale("log")
            right.set_yscale("log")
            ticks = [t for t in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01) if t >= 0.9 * float(eps[0])]
            right.set_xticks(ticks, [f"{t:g}" for t in ticks])
            right.set_yticks([5, 10, 20, 40], ["5", "10", "20", "40"])
            right.minorticks_off()
            right.invert_xaxis()
        right.set_xlabel("1 - alpha (log scale)")
        right.set_ylabel("fold separation (component sd, log scale)")
        title = "Births as alpha -> 1 (log-log)"
        if slopes:
            title += f"\nslope over a >= 0.95: {min(slopes):.2f} to {max(slopes):.2f}"
        right.set_title(title)
        fig.legend(handles=list(handles.values()), loc="outside right upper", frameon=False, fontsize=8.5)
        fig.suptitle(
            "Where multistability begins for each alpha" + _alpha_context_note(analysis), x=0.02, ha="left"
        )
    return fig


def alpha_fits(
    analysis, separations: tuple[float, ...] = FIT_SEPARATIONS, alphas: tuple[float, ...] = FIT_ALPHAS
) -> Figure:
    """P and the fitted Q across alpha (Minka 2005, Figure 1): a row per separation, a column per weight.

    For each of ``alphas`` (the nearest swept alpha within 0.05), the lowest-loss distinct minimum
    the sweep found at the swept separation nearest each of ``separations`` (ties, the
    mirror-image modes at weight 1/2, go to the left one); a sequential palette over alpha, lines
    narrowing as alpha grows so that coinciding fits stay visible; dashed where the fit lies on
    the edge of the finite region.
    """
    optima = analysis.optima[classify.is_minimum(analysis.optima)]
    swept = analysis.alphas
    chosen = [(a, swept[np.argmin(np.abs(swept - a))]) for a in alphas]
    chosen = [(a, s) for a, s in chosen if abs(s - a) <= 0.05]
    separations = list(dict.fromkeys(nearest_value(analysis.separations, d) for d in separations))
    palette = sns.color_palette("viridis", len(chosen) + 1)[: len(chosen)]
    widths = np.linspace(3.4, 1.4, len(chosen))
    names = {0.0: " (reverse KL)", 0.5: " (4 H^2)", 1.0: " (forward KL)"}
    weights = analysis.weights
    center, var = float(analysis.context["center"]), float(analysis.context["component_var"])
    handles: list = [Patch(facecolor="0.8", edgecolor="0.35", label="P (mixture)")]
    handles += [
        Line2D([], [], color=c, linewidth=w, label=f"a = {_alpha_label(a)}{names.get(t, '')}")
        for (t, a), c, w in zip(chosen, palette, widths, strict=True)
    ]
    with style():
        fig = Figure(figsize=(5.4 * len(weights) + 2.8, 3.6 * len(separations) + 0.9), layout="constrained")
        axes = fig.subplots(len(separations), len(weights), squeeze=False, sharey="row")
        edge_shown = False
        for row, separation in zip(axes, separations, strict=True):
            reach = separation / 2 + 4.5 * np.sqrt(var)
            x = np.linspace(center - reach, center + reach, 1200)
            for ax, weight in zip(row, weights, strict=True):
                cell = pd.Series(
                    {"separation": separation, "weight": weight, "center": center, "component_var": var}
                )
                here = optima[(optima["weight"] == weight) & (optima["separation"] == separation)]
                best = here.sort_values(["loss", "mu"]).groupby("alpha").head(1).set_index("alpha")
                p = mixture_density(cell, x)
                ax.fill_between(x, p, color="0.8", linewidth=0)
                ax.plot(x, p, color="0.35", linewidth=1.5)
                for (_, a), colour, width in zip(chosen, palette, widths, strict=True):  # seven alphas
                    if a not in best.index:
                        continue
                    fit = best.loc[a]
                    q = gaussian_density(x, np.array([fit["mu"]]), np.array([fit["sigma2"]]))[0]
                    edge = bool(fit["on_boundary"])
                    edge_shown |= edge
                    ax.plot(x, q, color=colour, linewidth=width, linestyle="--" if edge else "-")
                ax.set_title(
                    f"separation {separation:g} sd, weight of left component {weight:g}", fontsize=11
                )
            top = max(line.get_ydata().max() for ax in row for line in ax.get_lines())
            row[0].set_ylim(0, 1.05 * top)  # the row shares it
            row[0].set_ylabel("density")
        for ax in axes[-1]:
            ax.set_xlabel("x (component sd)")
        if edge_shown:
            handles.append(
                Line2D([], [], color="0.3", linestyle="--", label="dashed: on the edge\nof the finite region")
            )
        fig.legend(
            handles=handles, loc="outside right upper", frameon=False, title="fitted Q = N(mu, sigma^2)"
        )
        fig.suptitle(
            "Fits across alpha: the lowest-loss minimum the sweep found for each alpha\n"
            "(a <= 0 locks onto a mode, zero-forcing; a >= 1 spreads over both, mass-covering)",
            x=0.02,
            ha="left",
        )
    return fig


#: The alpha section's figures, by file name.
ALPHA_FIGURES: dict[str, Callable] = {
    "alpha_phase_diagram": alpha_phase_diagram,
    "alpha_folds": alpha_fold_curve,
    "alpha_fits": alpha_fits,
}


def write_alpha_figures(analysis, directory: Path) -> list[Path]:
    """Write every figure of :data:`ALPHA_FIGURES` as PNG and SVG into ``directory``; return the paths."""
    written = []
    for name, make in ALPHA_FIGURES.items():
        written += save(make(analysis), directory, name)
    return written
