r"""Figures of d-dimensional sweeps (``dim`` > 1): Bishop's figures 10.2 and 10.3 and the
shrinkage-delinkage trade-off of a mean-field Q.

Each figure is drawn from the sweep's rows (``mean``, ``cov`` and the keys), or from what
:class:`HigherRows` keeps of them when ``python -m analysis`` reads a sweep a batch at a time: the
rows the figures drawn from single rows choose from, the minima found in every cell and the grid
of swept values. A sweep that lacks the rows a figure needs gets a one-line note instead of the
figure. The closed forms drawn through the points are written out here from their textbook
formulas, independently of the core:

- Bishop fig. 10.2: P = N(c, v R) in 2-D with correlation rho. A diagonal Q under the reverse KL
  has variances :math:`v/(R^{-1})_{ii} = v(1 - \rho^2)`, and under the forward KL it has v.
- Margossian and Saul (UAI 2023): for P = N(0, R) equicorrelated in d dimensions, the diagonal
  reverse-KL fit has :math:`S_{ii} = 1/(R^{-1})_{ii} = (1-\rho)(1 + (d-1)\rho)/(1 + (d-2)\rho)`.
  Its variance ratio is that value (P's marginal variances are 1). Its entropy gap
  :math:`H(P) - H(Q) = \tfrac12[\log\det R - d\log S_{ii}]` is never negative: the fit reports
  too little uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Ellipse
from matplotlib.ticker import NullFormatter

from analysis.data import ND_GRID_KEYS
from analysis.figures import DIVERGENCE_COLOURS, PALETTE, save, style
from analysis.source import numpy_lists


def higher_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows with ``dim`` > 1 that converged."""
    if "dim" not in table.columns:
        return table.iloc[:0]
    rows = table[(table["dim"].fillna(1).astype(int) > 1) & table["converged"].astype(bool)]
    return rows.reset_index(drop=True)


def direction_vector(direction: str, dim: int) -> np.ndarray:
    return np.eye(dim)[0] if direction == "axis" else np.ones(dim) / math.sqrt(dim)


def target_moments(row: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(m_1, m_2, Sigma, w) of a row's two-component target."""
    d, rho = int(row["dim"]), float(row["correlation"])
    u = direction_vector(str(row["direction"]), d)
    R = (1 - rho) * np.eye(d) + rho * np.ones((d, d))
    c = float(row["center"]) * np.ones(d)
    half = 0.5 * float(row["separation"]) * u
    return c - half, c + half, float(row["component_var"]) * R, float(row["weight"])


def q_moments(row: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(mean, S) of a row's fitted Q, from its ``mean`` and ``cov`` (lower triangle) columns."""
    d = int(row["dim"])
    S = np.zeros((d, d))
    S[np.tril_indices(d)] = np.asarray(row["cov"], dtype=float)
    return np.asarray(row["mean"], dtype=float), S + np.tril(S, -1).T


def ellipse(mean: np.ndarray, cov: np.ndarray, sds: float, **style_) -> Ellipse:
    """The contour of N(mean, cov) in 2-D at ``sds`` Mahalanobis units."""
    values, vectors = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    width, height = 2 * sds * np.sqrt(values[::-1])
    return Ellipse(tuple(mean), width, height, angle=angle, fill=False, **style_)


def mixture_log_density(x: np.ndarray, y: np.ndarray, row: pd.Series) -> np.ndarray:
    """log p on a 2-D grid for a row's target (``dim`` = 2)."""
    m1, m2, cov, w = target_moments(row)
    points = np.stack([x, y], -1)
    inv, (_, log_det) = np.linalg.inv(cov), np.linalg.slogdet(cov)

    def log_n(m):
        diff = points - m
        return -0.5 * (np.einsum("...i,ij,...j->...", diff, inv, diff) + log_det + 2 * math.log(2 * math.pi))

    return np.logaddexp(math.log(w) + log_n(m1), math.log1p(-w) + log_n(m2))


def _pick(rows: pd.DataFrame, **equal) -> pd.DataFrame:
    mask = np.ones(len(rows), dtype=bool)
    for key, value in equal.items():
        column = rows[key]
        mask &= np.isclose(column.astype(float), value) if isinstance(value, float) else (column == value)
    return rows[mask]


def bishop_10_2_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows :func:`bishop_10_2` chooses from: d = 2, separation 0, a diagonal Q, either KL."""
    cells = _pick(rows, dim=2, separation=0.0, q_family="diag")
    return cells[cells["divergence"].isin(["forward", "reverse"])]


def bishop_10_3_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows :func:`bishop_10_3` chooses from: d = 2, a full Q, the largest separation above 0."""
    cells = _pick(rows, dim=2)
    cells = cells[(cells["separation"] > 0) & (cells["q_family"] == "full")]
    return _pick(cells, separation=float(cells["separation"].max())) if len(cells) else cells


def shrinkage_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows :func:`shrinkage` draws: separation 0, a diagonal Q, component_var 1."""
    cells = _pick(rows, separation=0.0, q_family="diag")
    return cells[cells["component_var"].astype(float) == 1.0]


#: The rows each of the figures drawn from single rows chooses from.
FIGURE_ROWS = (bishop_10_2_rows, bishop_10_3_rows, shrinkage_rows)


# --- Bishop fig. 10.2 ---------------------------------------------------------------------------


def bishop_10_2(rows: pd.DataFrame) -> Figure | str:
    """P = N(c, v R) in 2-D (separation 0) with a diagonal Q by the forward and the reverse KL."""
    cells = bishop_10_2_rows(rows)
    if cells.empty or set(cells["divergence"]) != {"forward", "reverse"}:
        return "Bishop fig. 10.2 needs dim=2, separation=0, q_family=diag rows of both KLs"
    rho = float(cells["correlation"].max())
    cells = _pick(cells, correlation=rho)
    with style():
        fig = Figure(figsize=(9.0, 4.6), layout="constrained")
        axes = fig.subplots(1, 2, sharex=True, sharey=True)
        for ax, name, letter in zip(axes, ("forward", "reverse"), "ab"):
            row = cells[cells["divergence"] == name].iloc[0]
            m1, _, cov, _ = target_moments(row)
            for k, sds in enumerate((1, 2, 3)):
                ax.add_patch(ellipse(m1, cov, sds, color=PALETTE[2], lw=1.6, alpha=1.0 - 0.25 * k))
            mean, S = q_moments(row)
            ax.add_patch(ellipse(mean, S, 1, color=DIVERGENCE_COLOURS[name], lw=2.4))
            ax.add_patch(ellipse(mean, S, 2, color=DIVERGENCE_COLOURS[name], lw=1.4, ls="--"))
            ax.set_aspect("equal")
            lim = 3.4 * math.sqrt(float(row["component_var"]))
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xlabel("$x_1$ (component sd)")
            what = "KL(P‖Q): covers" if name == "forward" else "KL(Q‖P): shrinks"
            var = np.diag(S)
            ax.set_title(f"({letter}) {name} {what}\nQ variances {var[0]:.3f}, {var[1]:.3f}", fontsize=11)
        axes[0].set_ylabel("$x_2$ (component sd)")
        handles = [
            Line2D([], [], color=PALETTE[2], lw=1.6, label="P = N(0, R): 1, 2, 3 sd"),
            Line2D([], [], color=DIVERGENCE_COLOURS["forward"], lw=2.4, label="diag Q, forward KL: 1, 2 sd"),
            Line2D([], [], color=DIVERGENCE_COLOURS["reverse"], lw=2.4, label="diag Q, reverse KL: 1, 2 sd"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=9)
        fig.suptitle(f"Bishop fig. 10.2: a factorised Q fitted to a correlated Gaussian (rho = {rho:g})")
    return fig


# --- Bishop fig. 10.3 ---------------------------------------------------------------------------


def bishop_10_3(rows: pd.DataFrame) -> Figure | str:
    """A 2-D two-component mixture: the forward KL covers it, the reverse KL locks onto either mode."""
    cells = bishop_10_3_rows(rows)
    if cells.empty or set(cells["divergence"]) < {"forward", "reverse"}:
        return "Bishop fig. 10.3 needs dim=2, separation > 0, q_family=full rows of both KLs"
    separation = float(cells["separation"].max())
    cells = _pick(cells, correlation=float(cells["correlation"].min()))
    reverse = cells[cells["divergence"] == "reverse"]
    modes = reverse.assign(side=np.sign(reverse["mu"].round(6))).drop_duplicates("side")
    modes = modes.sort_values("mu")
    if len(modes) < 2:
        return f"Bishop fig. 10.3: the reverse KL found one mode at separation {separation:g}; it needs two"
    panels = [cells[cells["divergence"] == "forward"].iloc[0], modes.iloc[0], modes.iloc[-1]]
    first = panels[0]
    m1, m2, cov, _ = target_moments(first)
    centre = 0.5 * (m1 + m2)
    reach = 0.5 * np.abs(m2 - m1).max() + 3.2 * math.sqrt(float(first["component_var"]))
    grid = np.linspace(-reach, reach, 241)
    x, y = np.meshgrid(centre[0] + grid, centre[1] + grid)
    density = np.exp(mixture_log_density(x, y, first))
    with style():
        fig = Figure(figsize=(12.0, 4.5), layout="constrained")
        axes = fig.subplots(1, 3, sharex=True, sharey=True)
        titles = [
            "(a) forward KL(P‖Q): covers both",
            "(b) reverse KL(Q‖P) from one start",
            "(c) … from another",
        ]
        for ax, row, title in zip(axes, panels, titles):
            ax.contour(x, y, density, levels=6, colors=[PALETTE[2]], linewidths=1.1)
            mean, S = q_moments(row)
            name = str(row["divergence"])
            for sds, lw in ((1, 2.4), (2, 1.4)):
                ax.add_patch(
                    ellipse(mean, S, sds, color=DIVERGENCE_COLOURS[name], lw=lw, ls="-" if sds == 1 else "--")
                )
            start = float(row["init_mu"]) * direction_vector(str(row["direction"]), 2)
            ax.plot(*start, marker="x", color="black", ms=8, mew=2)
            ax.set_aspect("equal")
            ax.set_title(f"{title}\nloss {row['loss']:.3f} nats", fontsize=11)
            ax.set_xlabel("$x_1$ (component sd)")
        axes[0].set_ylabel("$x_2$ (component sd)")
        handles = [
            Line2D([], [], color=PALETTE[2], lw=1.1, label="P: density contours"),
            Line2D([], [], color=DIVERGENCE_COLOURS["forward"], lw=2.4, label="Q, forward KL: 1, 2 sd"),
            Line2D([], [], color=DIVERGENCE_COLOURS["reverse"], lw=2.4, label="Q, reverse KL: 1, 2 sd"),
            Line2D([], [], color="black", marker="x", ls="none", mew=2, label="start of the fit"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False, fontsize=9)
        rho = float(first["correlation"])
        fig.suptitle(
            f"Bishop fig. 10.3: a full Gaussian Q fitted to a two-component mixture "
            f"(separation {separation:g}, weight {float(first['weight']):g}, correlation {rho:g})"
        )
    return fig


# --- the shrinkage-delinkage trade-off ------------------------------------------------------------


def diag_reverse_variance(dim: np.ndarray, rho: np.ndarray) -> np.ndarray:
    r""":math:`1/(R^{-1})_{ii}` for the equicorrelated R: the diag reverse-KL variance (Margossian, Saul)."""
    return (1 - rho) * (1 + (dim - 1) * rho) / (1 + (dim - 2) * rho)


def diag_reverse_entropy_gap(dim: np.ndarray, rho: np.ndarray) -> np.ndarray:
    r""":math:`\tfrac12[\log\det R - d\log S_{ii}]`, with
    :math:`\log\det R = (d-1)\log(1-\rho) + \log(1+(d-1)\rho)`."""
    log_det = (dim - 1) * np.log1p(-rho) + np.log1p((dim - 1) * rho)
    return 0.5 * (log_det - dim * np.log(diag_reverse_variance(dim, rho)))


def shrinkage(rows: pd.DataFrame) -> Figure | str:
    """Variance ratio and entropy gap of the diag fit against d and rho (P a single Gaussian), with
    the reverse KL's closed forms drawn through the points and the other divergences beside."""
    cells = shrinkage_rows(rows)
    if cells.empty or "reverse" not in set(cells["divergence"]):
        return (
            "the shrinkage figure needs separation=0, q_family=diag, component_var=1 rows of the reverse KL"
        )
    label = cells["divergence"].astype(str)
    if "alpha" in cells.columns:
        label = label.where(cells["alpha"].isna(), label + " a=" + cells["alpha"].astype(str))
    cells = cells.assign(member=label)
    members = sorted(cells["member"].unique(), key=lambda m: (m != "reverse", m))
    rhos = sorted(cells["correlation"].astype(float).unique())
    colours = dict(zip(rhos, sns.color_palette("viridis", len(rhos))))
    markers = dict(zip(members, "osD^v<>ph*"))
    with style():
        fig = Figure(figsize=(11.0, 4.6), layout="constrained")
        axes = fig.subplots(1, 2, sharex=True)
        dims = np.arange(2, max(3, int(cells["dim"].max())) + 1)
        for rho in rhos:
            ok = 1 + (dims - 1) * rho > 0
            d = dims[ok]
            axes[0].plot(d, diag_reverse_variance(d, rho), color=colours[rho], lw=1.3)
            axes[1].plot(d, diag_reverse_entropy_gap(d, rho), color=colours[rho], lw=1.3)
            if "forward" in members:  # the forward KL keeps the marginals: ratio 1, gap log det R / 2
                log_det = (d - 1) * np.log1p(-rho) + np.log1p((d - 1) * rho)
                axes[0].plot(d, np.ones(len(d)), color=colours[rho], lw=1.0, ls="--")
                axes[1].plot(d, 0.5 * log_det, color=colours[rho], lw=1.0, ls="--")
        for (member, rho), part in cells.groupby(["member", cells["correlation"].astype(float)]):
            part = part.sort_values("dim")
            for ax, column in zip(axes, ("var_ratio", "entropy_gap")):
                ax.plot(
                    part["dim"],
                    part[column],
                    ls="none",
                    marker=markers[member],
                    ms=7,
                    mfc=colours[rho] if member == "reverse" else "white",
                    mec=colours[rho],
                    mew=1.6,
                )
        axes[0].set_ylabel("variance ratio: mean of $S_{ii}$ / marginal variance")
        axes[1].set_ylabel("entropy gap H(P) − H(Q) (nats)")
        for ax in axes:
            ax.set_xlabel("dimension d")
            ax.set_xscale("log")
            ax.set_xticks(sorted(cells["dim"].unique()), [str(d) for d in sorted(cells["dim"].unique())])
            ax.xaxis.set_minor_formatter(NullFormatter())
        handles = [Line2D([], [], color=colours[r], lw=1.3, label=f"rho = {r:g}") for r in rhos]
        handles += [Line2D([], [], color="grey", lw=1.3, label="closed form, reverse KL")]
        if "forward" in members:
            handles += [Line2D([], [], color="grey", lw=1.0, ls="--", label="closed form, forward KL")]
        handles += [
            Line2D(
                [],
                [],
                ls="none",
                marker=markers[m],
                mfc="grey" if m == "reverse" else "white",
                mec="grey",
                label=f"fits: {m}",
            )
            for m in members
        ]
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)
        fig.suptitle("Shrinkage-delinkage: a mean-field Q fitted to P = N(0, R), R equicorrelated")
    return fig


# --- where multistability begins, as the sweep found it ----------------------------------------

#: Two minima of a cell are distinct when their means along u differ by more than this.
DISTINCT_MU = 1e-4
ONSET_KEYS = ["divergence", "direction", "dim", "q_family", "correlation", "weight"]


def minima_found(rows: pd.DataFrame) -> pd.DataFrame:
    """The number of distinct minima the sweep's starts reached in each cell (its keys and separation)."""
    keys = [*ONSET_KEYS, "separation"]

    def count(mu: pd.Series) -> int:
        values = np.sort(mu.to_numpy(dtype=float))
        return 1 + int((np.diff(values) > DISTINCT_MU).sum()) if len(values) else 0

    return rows.groupby(keys, dropna=False)["mu"].apply(count).rename("minima").reset_index()


def multistability_onsets(found: pd.DataFrame) -> pd.DataFrame:
    """Per (divergence, direction, dim, family, correlation, weight): the smallest swept separation
    where the starts reached two or more minima (NaN: none in the swept range), and the largest
    swept separation, from the minima of every cell (:func:`minima_found`). A sweep-based figure:
    it is as fine as the separation grid and the starts."""
    onset = found[found["minima"] >= 2].groupby(ONSET_KEYS, dropna=False)["separation"].min()
    largest = found.groupby(ONSET_KEYS, dropna=False)["separation"].max().rename("largest_separation")
    return pd.concat([onset.rename("onset_separation"), largest], axis=1).reset_index()


def onset_figure(found: pd.DataFrame) -> Figure | str:
    """Onset of multistability against correlation, per family (colour), direction (panel) and d,
    from the minima of every cell (:func:`minima_found`)."""
    cells = found[found["divergence"] == "reverse"]
    if cells.empty or cells["correlation"].nunique() < 2 or cells["separation"].nunique() < 3:
        return "the onset figure needs reverse-KL rows over several correlations and separations"
    onsets = multistability_onsets(cells)
    weight = float(onsets["weight"].mode().iloc[0])
    onsets = onsets[np.isclose(onsets["weight"], weight)]
    families = [f for f in ("full", "diag", "iso") if f in set(onsets["q_family"])]
    colours = dict(zip(("full", "diag", "iso"), (PALETTE[0], PALETTE[3], PALETTE[2])))
    dims = sorted(onsets["dim"].unique())
    if len(dims) > 4:  # (four line styles: the smallest, the largest and two between)
        dims = [dims[0], dims[len(dims) // 3], dims[2 * len(dims) // 3], dims[-1]]
        onsets = onsets[onsets["dim"].isin(dims)]
    styles = dict(zip(dims, ("-", "--", ":", "-.")))
    markers = {"full": "o", "diag": "s", "iso": "^"}
    shift = {"full": -0.012, "diag": 0.0, "iso": 0.012}  # families that coincide stay visible
    directions = [d for d in ("axis", "diagonal") if d in set(onsets["direction"])]
    with style():
        fig = Figure(figsize=(5.2 * len(directions) + 2.0, 4.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(directions), sharey=True))
        top = float(onsets["largest_separation"].max())
        for ax, direction in zip(axes, directions):
            for (family, dim), part in onsets[onsets["direction"] == direction].groupby(["q_family", "dim"]):
                part = part.sort_values("correlation")
                y = part["onset_separation"].fillna(top + 0.5)  # none found: drawn above the range
                x = part["correlation"] + shift[family]
                ax.plot(
                    x, y, color=colours[family], ls=styles[dim], marker=markers[family], ms=5, mfc="white"
                )
            ax.axhline(top, color="grey", lw=0.8)
            ax.text(ax.get_xlim()[0], top + 0.5, " none found in the swept range", va="center", fontsize=8)
            ax.set_title(f"modes along the {direction} ({'e_1' if direction == 'axis' else '1/sqrt(d)'})")
            ax.set_xlabel("correlation rho inside each component")
        axes[0].set_ylabel("smallest separation with two minima (component sd)")
        handles = [
            Line2D([], [], color=colours[f], lw=2, marker=markers[f], mfc="white", label=f"{f} Q")
            for f in families
        ]
        handles += [Line2D([], [], color="grey", ls=styles[d], label=f"d = {d}") for d in dims]
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)
        fig.suptitle(f"Reverse KL: where the sweep's starts first reach two minima (weight {weight:g})")
    return fig


def most_rows(rows: pd.DataFrame, key: str) -> float:
    """The value of ``key`` the most rows have (the smallest of a tie); a row with a count ``n``
    (:attr:`HigherRows.grid`) stands for that many."""
    counts = rows.groupby(key)["n"].sum() if "n" in rows.columns else rows.groupby(key).size()
    return float(counts.idxmax())


def plane_lines(rows: pd.DataFrame) -> tuple[pd.DataFrame, int, float] | str:
    """The exact fold and pitchfork lines in the (separation, correlation) plane of the smallest
    d > 1 of the sweep's reverse-KL rows (or their :attr:`HigherRows.grid`), at their most common
    weight, per family and direction: (lines with ``q_family`` and ``direction`` columns, d,
    weight), or why there are none."""
    from analysis.structure import exact_structure
    from analysis.structure_nd import NEEDED, exact_lines, full_lines
    from kl_sweep.core.gaussians import Family

    missing = [k for k in NEEDED if k not in rows.columns]
    if missing:
        return f"the (separation, correlation) phase diagram needs the column(s) {', '.join(missing)}"
    cells = rows[(rows["divergence"] == "reverse") & (rows["center"] == 0.0) & (rows["component_var"] == 1.0)]
    if cells.empty or cells["separation"].nunique() < 3:
        return "the (separation, correlation) phase diagram needs reverse-KL rows over several separations"
    dim = int(cells["dim"].min())
    cells = cells[cells["dim"] == dim]
    weight = most_rows(cells, "weight")
    cells = cells[np.isclose(cells["weight"], weight)]
    hi = float(cells["separation"].max())
    frames = []
    for (name, direction), part in cells.groupby(["q_family", "direction"]):
        correlations = sorted(part["correlation"].unique())
        if name == "full":
            line = exact_structure("reverse", [weight], (0.0, 3.0 * hi)).points
            lines = full_lines(line, dim, str(direction))
        else:
            lines = exact_lines(Family(str(name), dim), str(direction), weight, correlations, (0.0, hi))
        frames.append(lines.assign(q_family=name, direction=direction))
    return pd.concat(frames, ignore_index=True), dim, weight


#: (colour, line style) of each kind of exact line in the (separation, correlation) plane.
LINE_STYLES = {"fold": (PALETTE[3], "-"), "pitchfork": (PALETTE[0], "--"), "maxwell": ("black", ":")}


def phase_plane(rows: pd.DataFrame, found: pd.DataFrame) -> Figure | str:
    """Reverse KL: the exact fold and pitchfork lines in the (separation, correlation) plane per
    family (columns) and direction (rows), over the sweep's multistart counts (``found``:
    :func:`minima_found`; ``rows``: the sweep's d > 1 rows or their :attr:`HigherRows.grid`)."""
    planes = plane_lines(rows)
    if isinstance(planes, str):
        return planes
    lines, dim, weight = planes
    counts = found[
        (found["divergence"] == "reverse") & (found["dim"] == dim) & np.isclose(found["weight"], weight)
    ]
    families = [f for f in ("full", "diag", "iso") if f in set(lines["q_family"])]
    directions = [d for d in ("axis", "diagonal") if d in set(lines["direction"])]
    top = float(counts["separation"].max())
    with style():
        fig = Figure(figsize=(3.9 * len(families) + 1.6, 3.6 * len(directions) + 0.8), layout="constrained")
        axes = np.atleast_2d(
            fig.subplots(len(directions), len(families), sharex=True, sharey=True, squeeze=False)
        )
        for i, direction in enumerate(directions):
            for j, family in enumerate(families):
                ax = axes[i, j]
                here = counts[(counts["q_family"] == family) & (counts["direction"] == direction)]
                many = here["minima"] >= 2
                ax.scatter(here["separation"][~many], here["correlation"][~many], s=14, color="0.75", lw=0)
                ax.scatter(here["separation"][many], here["correlation"][many], s=22, color=PALETTE[4], lw=0)
                part = lines[(lines["q_family"] == family) & (lines["direction"] == direction)]
                for _, line in part.groupby("line"):
                    colour, ls = LINE_STYLES[line["kind"].iloc[0]]
                    ax.plot(line["separation"], line["correlation"], color=colour, ls=ls, lw=2.0)
                ax.set_xlim(0, top)
                ax.set_ylim(-0.32, 0.97)
                ax.set_title(f"{family} Q, modes along the {direction}", fontsize=10)
                if i == len(directions) - 1:
                    ax.set_xlabel("separation of the modes (component sd)")
                if j == 0:
                    ax.set_ylabel("correlation rho in each component")
        handles = [
            Line2D([], [], color=PALETTE[3], lw=2, label="fold: a minimum is born (exact)"),
            Line2D(
                [], [], color=PALETTE[0], lw=2, ls="--", label="pitchfork: the centred fit splits (exact)"
            ),
            Line2D(
                [], [], color="black", lw=2, ls=":", label="coexistence: the global minimum jumps (exact)"
            ),
            Line2D([], [], color="0.75", marker="o", lw=0, label="sweep: one minimum found"),
            Line2D([], [], color=PALETTE[4], marker="o", lw=0, label="sweep: two or more minima found"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False, fontsize=9)
        fig.suptitle(
            f"Reverse KL in d = {dim}, weight {weight:g}: where each family of Q becomes multistable"
        )
    return fig


#: Each family's colour, marker and marker size in the figures of exact onsets.
FAMILY_COLOURS = dict(zip(("full", "diag", "iso"), (PALETTE[0], PALETTE[3], PALETTE[2])))
FAMILY_MARKERS = {"full": "o", "diag": "s", "iso": "^"}
FAMILY_SIZES = {"full": 7, "diag": 9, "iso": 6}


def _family_kind_legend(fig: Figure, families: list[str]) -> None:
    """The legend of the exact-onset figures: a line per family, filled fold and open pitchfork."""
    handles = [
        Line2D(
            [],
            [],
            color=FAMILY_COLOURS[f],
            lw=1.5,
            marker=FAMILY_MARKERS[f],
            ms=FAMILY_SIZES[f],
            label=f"{f} Q",
        )
        for f in families
    ]
    handles += [
        Line2D([], [], color="grey", marker="o", lw=0, label="fold: a minimum is born"),
        Line2D(
            [], [], color="grey", marker="o", mfc="white", lw=0, label="pitchfork: the centred fit splits"
        ),
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)


def exact_onsets(points: pd.DataFrame) -> Figure:
    """The separation where each family first has a second minimum, against the correlation, from
    exact special points (:func:`analysis.structure_nd.exact_points`): one panel per direction,
    filled markers for folds, open ones for pitchforks."""
    families = [f for f in ("full", "diag", "iso") if f in set(points["q_family"])]
    colours, markers, sizes = FAMILY_COLOURS, FAMILY_MARKERS, FAMILY_SIZES
    directions = [d for d in ("axis", "diagonal") if d in set(points["direction"])]
    first = points.sort_values("separation").groupby(["q_family", "direction", "correlation"]).head(1)
    with style():
        fig = Figure(figsize=(4.8 * len(directions) + 1.8, 4.2), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(directions), sharey=True))
        for ax, direction in zip(axes, directions):
            for family in families:
                part = first[(first["q_family"] == family) & (first["direction"] == direction)]
                part = part.sort_values("correlation")
                colour, marker = colours[family], markers[family]
                ax.plot(part["correlation"], part["separation"], color=colour, lw=1.5)
                for kind, fill in (("fold", colour), ("pitchfork", "white")):
                    sub = part[part["kind"] == kind]
                    ax.plot(
                        sub["correlation"],
                        sub["separation"],
                        marker,
                        color=colour,
                        mfc=fill,
                        ms=sizes[family],
                    )
            ax.set_title(f"modes along the {direction}")
            ax.set_xlabel("correlation rho in each component")
        axes[0].set_ylabel("separation (component sd)")
        _family_kind_legend(fig, families)
        weight = ", ".join(f"{w:g}" for w in sorted(points["weight"].unique()))
        dims = ", ".join(str(d) for d in sorted(points["dim"].unique()))
        fig.suptitle(
            f"Reverse KL, d = {dims}, weight {weight}: "
            "the exact separation where each family first has two minima"
        )
    return fig


def weight_planes(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, int] | str:
    """The fold lines and cusps in the (separation, weight) plane of the smallest d > 1 of the
    sweep's reverse-KL rows, per family, direction and correlation, where the sweep has three
    weights or more: (lines, cusps, d), or why there are none. ``full`` is the line's structure at
    the Mahalanobis separation."""
    from analysis.structure import exact_structure
    from analysis.structure_nd import ND_COLUMNS, NEEDED, mahalanobis_unit, weight_plane
    from kl_sweep.core.gaussians import Family

    if [k for k in NEEDED if k not in rows.columns]:
        return "the (separation, weight) phase diagram needs the d > 1 keys of every row"
    cells = rows[(rows["divergence"] == "reverse") & (rows["center"] == 0.0) & (rows["component_var"] == 1.0)]
    if cells.empty or cells["weight"].nunique() < 3 or cells["separation"].nunique() < 3:
        return "the (separation, weight) phase diagram needs reverse-KL rows over three weights or more"
    dim = int(cells["dim"].min())
    cells = cells[cells["dim"] == dim]
    hi = float(cells["separation"].max())
    lines, cusps = [], []
    for (name, direction, rho), _ in cells.groupby(["q_family", "direction", "correlation"]):
        keys = {"q_family": name, "direction": direction, "correlation": rho}
        if name == "full":
            scale = mahalanobis_unit(dim, str(direction), float(rho))
            line = exact_structure("reverse", list(np.linspace(0.5, 0.99, 50)), (0.0, 1.5 * hi * scale))
            lines.append(line.fold_lines.assign(separation=line.fold_lines["separation"] / scale, **keys))
            cusp = line.points[line.points["kind"] == "cusp"]
            cusps.append(
                cusp.assign(
                    dim=dim, mahalanobis=cusp["separation"], separation=cusp["separation"] / scale,
                    mu=np.nan, sigma2=np.nan, **keys,
                )
            )  # fmt: skip
        else:
            found, cusp = weight_plane(Family(str(name), dim), str(direction), float(rho), (0.0, hi))
            lines.append(found.assign(**keys))
            cusps.append(cusp)
    cusp_table = pd.concat(cusps, ignore_index=True).reindex(columns=ND_COLUMNS) if cusps else None
    return pd.concat(lines, ignore_index=True), cusp_table, dim


def weight_plane_figure(lines: pd.DataFrame, cusps: pd.DataFrame | None, dim: int) -> Figure:
    """Fold lines and cusps in the (separation, weight) plane (:func:`weight_planes`): one panel
    per direction and correlation, one colour per family."""
    colours = dict(zip(("full", "diag", "iso"), (PALETTE[0], PALETTE[3], PALETTE[2])))
    panels = lines[["direction", "correlation"]].drop_duplicates().sort_values(["direction", "correlation"])
    with style():
        fig = Figure(figsize=(max(4.2 * len(panels) + 2.4, 9.0), 4.4), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
        for ax, (_, panel) in zip(axes, panels.iterrows()):
            here = lines[
                (lines["direction"] == panel["direction"]) & (lines["correlation"] == panel["correlation"])
            ]
            for (family, _), line in here.groupby(["q_family", "line"]):
                ax.plot(line["separation"], line["weight"], color=colours[family], lw=1.8)
            if cusps is not None and len(cusps):
                at = cusps[
                    (cusps["direction"] == panel["direction"])
                    & (cusps["correlation"] == panel["correlation"])
                ]
                for family, part in at.groupby("q_family"):
                    ax.plot(
                        part["separation"], part["weight"], "*", color=colours[family], ms=13, mec="black"
                    )
            ax.set_title(f"modes along the {panel['direction']}, rho = {panel['correlation']:g}", fontsize=10)
            ax.set_xlabel("separation of the modes (component sd)")
            ax.set_ylim(0.5, 1.0)
        axes[0].set_ylabel("weight of the first component")
        families = [f for f in ("full", "diag", "iso") if f in set(lines["q_family"])]
        handles = [Line2D([], [], color=colours[f], lw=1.8, label=f"{f} Q: fold lines") for f in families]
        handles.append(Line2D([], [], color="grey", marker="*", ms=12, mec="black", lw=0, label="cusp"))
        fig.legend(handles=handles, loc="outside right center", frameon=False, fontsize=9)
        fig.suptitle(f"Reverse KL in d = {dim}: exact fold lines and cusps over separation and weight")
    return fig


#: Most rows kept for the figures drawn from single rows (:data:`FIGURE_ROWS`); beyond it they are
#: thinned to a regular sub-grid of the swept starting means.
MAX_FIGURE_ROWS = 100_000
#: What the exact structure and the planes read of the d > 1 rows (with ``target_file``, if present).
GRID_COLUMNS = [*ND_GRID_KEYS, "target_file"]


@dataclass
class HigherRows:
    """What the d > 1 figures, tables and exact structure need of a sweep's rows with ``dim`` > 1,
    gathered a batch of whole cells at a time (:meth:`add`) in bounded memory.

    - ``grid``: the converged rows' distinct values of :data:`GRID_COLUMNS`, each with its number
      of rows ``n``: what :func:`analysis.structure_nd.exact_points`, :func:`weight_planes` and
      :func:`plane_lines` read;
    - ``found``: the distinct minima the starts reached in every cell (:func:`minima_found`);
    - ``rows``: the converged rows the figures drawn from single rows choose from
      (:data:`FIGURE_ROWS`), at most :data:`MAX_FIGURE_ROWS`: beyond it, the rows of every k-th
      swept starting mean (``inits``, sorted), and ``notes`` says so.
    """

    inits: np.ndarray
    grid: pd.DataFrame = field(default_factory=pd.DataFrame)
    found: pd.DataFrame = field(default_factory=pd.DataFrame)
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    step: int = 1
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, table: pd.DataFrame) -> HigherRows:
        """The summary of a table in memory (its d > 1 rows as one batch)."""
        return cls(np.unique(table["init_mu"].to_numpy(float)) if "init_mu" in table else np.empty(0)).add(
            table
        )

    def add(self, table: pd.DataFrame) -> HigherRows:
        """Take in a batch of whole cells (its rows with ``dim`` > 1; other rows are ignored)."""
        rows = higher_rows(table)
        if rows.empty:
            return self
        keys = [c for c in GRID_COLUMNS if c in rows.columns]
        grid = rows.groupby(keys, dropna=False).size().rename("n").reset_index()
        self.grid = _joined(self.grid, grid).groupby(keys, dropna=False)["n"].sum().reset_index()
        found = _joined(self.found, minima_found(rows))
        self.found = found.sort_values([*ONSET_KEYS, "separation"], ignore_index=True)
        chosen = np.zeros(len(rows), dtype=bool)
        for pick in FIGURE_ROWS:
            chosen[rows.index.get_indexer(pick(rows).index)] = True
        kept = _joined(self.rows, numpy_lists(rows[chosen]))
        kept = kept.loc[np.unique(np.concatenate([pick(kept).index.to_numpy() for pick in FIGURE_ROWS]))]
        self.rows = self._thinned(kept.reset_index(drop=True))
        return self

    def _thinned(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` at every ``step``-th swept starting mean, ``step`` doubled until at most
        :data:`MAX_FIGURE_ROWS` are left."""
        if len(rows) <= MAX_FIGURE_ROWS and self.step == 1:
            return rows
        while len(rows[rows["init_mu"].isin(self.inits[:: self.step])]) > MAX_FIGURE_ROWS:
            self.step *= 2
        if self.step > 1:
            rows = rows[rows["init_mu"].isin(self.inits[:: self.step])].reset_index(drop=True)
            self.notes = [
                f"d > 1 figures (Bishop's, shrinkage): over the cap of {MAX_FIGURE_ROWS} rows, drawn "
                f"from one swept starting mean in {self.step} "
                f"({len(self.inits[:: self.step])} of {len(self.inits)})"
            ]
        return rows

    def drawn_rows(self) -> pd.DataFrame:
        """The kept rows in job order (the order the figures pick their first rows in)."""
        if "job_num" not in self.rows.columns:
            return self.rows
        return self.rows.sort_values("job_num", kind="stable", ignore_index=True)


def _joined(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    return new.reset_index(drop=True) if old.empty else pd.concat([old, new], ignore_index=True)


FIGURES = {
    "bishop_10_2": lambda higher: bishop_10_2(higher.drawn_rows()),
    "bishop_10_3": lambda higher: bishop_10_3(higher.drawn_rows()),
    "shrinkage": lambda higher: shrinkage(higher.drawn_rows()),
    "multistability_onset": lambda higher: onset_figure(higher.found),
    "phase_plane": lambda higher: phase_plane(higher.grid, higher.found),
}


def write_dims_figures(table: pd.DataFrame | HigherRows, directory: Path) -> tuple[list[Path], list[str]]:
    """Every figure of :data:`FIGURES` the sweep's d > 1 rows allow (``table``: the rows, or their
    :class:`HigherRows`): (paths written, notes for the rest)."""
    higher = table if isinstance(table, HigherRows) else HigherRows.of(table)
    written, notes = [], []
    if higher.grid.empty:
        return written, notes
    for name, make in FIGURES.items():
        fig = make(higher)
        if isinstance(fig, str):
            notes.append(fig)
        else:
            written += save(fig, directory, name)
    tables = directory.parent / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    multistability_onsets(higher.found).to_csv(tables / "dims_onsets.csv", index=False)
    written.append(tables / "dims_onsets.csv")
    return written, notes


#: The kinds of special point where a second minimum can first appear along the separation.
ONSET_KINDS = ("fold", "pitchfork")


def onsets_by_dim(points: pd.DataFrame) -> pd.DataFrame | str:
    """The exact onset of multistability against the dimension: per family, direction, correlation
    and d of the d > 1 special points (:func:`analysis.structure_nd.exact_points`), at their most
    common weight, the smallest separation where a minimum is born (a fold) or the centred fit
    splits (a pitchfork), with its kind and Mahalanobis separation; d = 1 (where the families are
    one) from the line's own structure, and ``full`` where the sweep has none from the line's at
    the Mahalanobis separation. Or why there is none: it needs two dimensions above 1."""
    from analysis.structure import exact_structure
    from analysis.structure_nd import mahalanobis_unit

    points = points[points["kind"].isin(ONSET_KINDS) & (points["dim"] > 1)]
    if points.empty or points["dim"].nunique() < 2:
        return "the onset against the dimension needs the exact points of two dimensions above 1"
    weight = float(points["weight"].mode().iloc[0])
    points = points[np.isclose(points["weight"], weight)]
    keys = ["q_family", "direction", "correlation", "dim"]
    first = points.sort_values("separation").groupby(keys).head(1)
    columns = [*keys, "weight", "kind", "separation", "mahalanobis"]
    reach = max(float(first["mahalanobis"].max()) + 1.0, 10.0)
    line = exact_structure("reverse", [weight], (0.0, reach)).points
    line = line[line["kind"].isin(ONSET_KINDS)].sort_values("separation").head(1)
    if len(line):
        kind, sep = line["kind"].iloc[0], float(line["separation"].iloc[0])
        # full Q's, where the sweep has none: the line's at the Mahalanobis separation (exact)
        cells = (
            points[["direction", "correlation"]]
            .drop_duplicates()
            .merge(pd.DataFrame({"dim": sorted(points["dim"].unique())}), how="cross")
        )
        have = set(
            map(tuple, first.loc[first["q_family"] == "full", ["direction", "correlation", "dim"]].values)
        )
        cells = cells[[tuple(c) not in have for c in cells.values]]
        unit = [mahalanobis_unit(int(d), str(u), float(r)) for u, r, d in cells.values]
        full = cells.assign(
            q_family="full", weight=weight, kind=kind, separation=sep / np.array(unit), mahalanobis=sep
        )
        # d = 1, where the families are one and the correlation and direction mean nothing
        ones = first[["q_family", "direction", "correlation"]].drop_duplicates()
        ones = pd.concat([ones, full[["q_family", "direction", "correlation"]]]).drop_duplicates()
        first = pd.concat(
            [first, full, ones.assign(dim=1, weight=weight, kind=kind, separation=sep, mahalanobis=sep)]
        )
    return first[columns].sort_values(keys).reset_index(drop=True)


def dimension_figure(onsets: pd.DataFrame) -> Figure:
    """The exact onset of multistability against d (:func:`onsets_by_dim`): one panel per direction
    (rows) and correlation (columns), one line per family, filled markers for folds and open ones
    for pitchforks."""
    families = [f for f in ("full", "diag", "iso") if f in set(onsets["q_family"])]
    colours, markers, sizes = FAMILY_COLOURS, FAMILY_MARKERS, FAMILY_SIZES
    directions = [d for d in ("axis", "diagonal") if d in set(onsets["direction"])]
    correlations = sorted(onsets["correlation"].unique())
    dims = sorted(onsets["dim"].unique())
    with style():
        width = max(3.6 * len(correlations) + 2.2, 8.5)
        fig = Figure(figsize=(width, 3.2 * len(directions) + 0.6), layout="constrained")
        axes = fig.subplots(len(directions), len(correlations), sharex=True, sharey="row", squeeze=False)
        for i, direction in enumerate(directions):
            for j, rho in enumerate(correlations):
                ax = axes[i, j]
                cell = onsets[(onsets["direction"] == direction) & np.isclose(onsets["correlation"], rho)]
                for family in families:
                    part = cell[cell["q_family"] == family].sort_values("dim")
                    colour, marker = colours[family], markers[family]
                    ax.plot(part["dim"], part["separation"], color=colour, lw=1.5, alpha=0.9)
                    for kind, fill in (("fold", colour), ("pitchfork", "white")):
                        sub = part[part["kind"] == kind]
                        ax.plot(
                            sub["dim"], sub["separation"], marker, color=colour, mfc=fill, ms=sizes[family]
                        )
                ax.set_xscale("log")
                ax.set_xticks(dims if len(dims) <= 8 else [d for d in (1, 2, 5, 10, 20, 50) if d <= dims[-1]])
                ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}")
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_title(f"modes along the {direction}, rho = {rho:g}", fontsize=10)
                if i == len(directions) - 1:
                    ax.set_xlabel("dimension d")
            axes[i, 0].set_ylabel("onset separation (component sd)")
        _family_kind_legend(fig, families)
        weight = ", ".join(f"{w:g}" for w in sorted(onsets["weight"].unique()))
        gap = " " if len(correlations) > 1 else "\n"
        fig.suptitle(
            f"Reverse KL, weight {weight}:{gap}the exact separation where a second minimum first appears"
        )
    return fig
