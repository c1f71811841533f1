r"""Stochastic VI rows (``estimator=mc estimator.resample=true``, issue 25): where practitioners'
runs end against the exact structure.

A stochastic row is one replica (``seed``) of a configuration. Its averaged iterate lies nearest to
one of the deterministic problem's exact minima (``basin_mu``, ``basin_sigma2``), whose **type** is
the one :func:`analysis.classify.optimum_types` gives any optimum: covering, heavier mode or lighter
mode. Grouping the replicas of a configuration:

- **basin shares** (:func:`basin_shares`): the share of its seeds ending in each type of minimum,
  with the run count, the mean number of basin crossings and the share converged;
- **the effective boundary** (:func:`effective_boundary`): along the separation at fixed weight
  and practice, where a type's share crosses 1/2 (linear interpolation between swept
  separations), beside the separation where the exact fit *from the same start* changes type
  (:func:`deterministic_outcomes`) and the exact fold lines (:mod:`analysis.structure`);
- **bias and spread** (:func:`bias_spread`): per configuration and type, the mean offset of the
  averaged iterate from its minimum in (mu, log sigma) and its standard deviation over seeds.

The shares and the bias are aggregated by DuckDB over the sweep's files, so memory does not grow
with the number of seeds; the figures draw from those aggregates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis import classify
from analysis.figures import COLOURS, PALETTE, draw_exact_lines, save, separation_label, style
from kl_sweep.collect import sweep_sql
from kl_sweep.io import write_text

#: The weight of the shares figure when none is asked for: near the study's folds.
DEFAULT_WEIGHT = 0.6
#: What a stochastic configuration is apart from its (separation, weight) and seed.
PRACTICE = [
    "divergence",
    "alpha",
    "center",
    "component_var",
    "init_mu",
    "init_sigma2",
    "optimizer",
    "lr",
    "num_samples",
    "gradient",
    "schedule",
    "average",
    "max_steps",
]
CELL = ["separation", "weight"]
#: The 1/2 contour of the covering share, and the exact fit's switch, on the cividis map.
BOUNDARY_COLOUR = PALETTE[6]
EXACT_MARKER = {"marker": "o", "markersize": 6, "markerfacecolor": "white", "markeredgecolor": "black"}
#: The panels of one figure vary these; the other practice keys make separate figures.
FACETS = ["num_samples", "lr"]
TYPES = [classify.COVERING, classify.HEAVIER, classify.LIGHTER]
SHARE = {classify.COVERING: "p_covering", classify.HEAVIER: "p_heavier", classify.LIGHTER: "p_lighter"}
#: At most this many figures of each kind (one per setting of the non-facet practice keys).
MAX_SETTINGS = 4
#: Configurations with fewer seeds are left out of the bias and spread figure.
MIN_SEEDS = 10
#: The exact fits from each start: as the exact minima's (kl_sweep.core.stochastic.exact_minima).
EXACT_LR, EXACT_STEPS, EXACT_TOL = 0.05, 20_000, 1e-10


def _quoted(columns: list[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def basin_type_sql(mu: str = "basin_mu", sigma2: str = "basin_sigma2") -> str:
    """:func:`analysis.classify.optimum_types` as a DuckDB expression of the row's columns."""
    moment_var = "(component_var + weight * (1 - weight) * separation * separation)"
    heavier_left = "weight >= 0.5"
    return (
        f"CASE WHEN {mu} IS NULL THEN NULL "
        f"WHEN {sigma2} / {moment_var} >= {classify.COVERING_RATIO} THEN '{classify.COVERING}' "
        f"WHEN ({mu} < center) = ({heavier_left}) THEN '{classify.HEAVIER}' "
        f"ELSE '{classify.LIGHTER}' END"
    )


def _stochastic_source(sweep_dir: Path, columns: list[str]) -> str:
    wanted = [*PRACTICE, *CELL, "mu", "sigma2", "status", "basin", "basin_mu", "basin_sigma2", "crossings"]
    present = [c for c in wanted if c in columns]
    return (
        f"(SELECT *, {basin_type_sql()} AS basin_type FROM ({sweep_sql(sweep_dir, present)}) "
        "WHERE basin IS NOT NULL)"
    )


def has_stochastic_rows(con, sweep_dir: Path, columns: list[str]) -> bool:
    """Whether the sweep holds stochastic rows (a non-null ``basin``)."""
    if "basin" not in columns:
        return False
    source = sweep_sql(sweep_dir, ["basin"])
    return con.execute(f"SELECT count(*) FROM ({source}) WHERE basin IS NOT NULL").fetchall()[0][0] > 0


def basin_shares(con, sweep_dir: Path, columns: list[str]) -> pd.DataFrame:
    """One row per stochastic configuration (practice and cell): ``runs`` (seeds), the share of
    them ending in each type of minimum (``p_covering``, ``p_heavier``, ``p_lighter``), the mean
    ``crossings`` and the share ``converged``."""
    keys = _quoted(PRACTICE + CELL)
    shares = ", ".join(
        f"avg(CASE WHEN basin_type = '{t}' THEN 1.0 ELSE 0.0 END) AS {SHARE[t]}" for t in TYPES
    )
    query = (
        f"SELECT {keys}, count(*) AS runs, {shares}, avg(crossings) AS crossings, "
        "avg(CASE WHEN status = 'converged' THEN 1.0 ELSE 0.0 END) AS converged "
        f"FROM {_stochastic_source(sweep_dir, columns)} GROUP BY {keys} ORDER BY {keys}"
    )
    return con.execute(query).df()


def bias_spread(con, sweep_dir: Path, columns: list[str]) -> pd.DataFrame:
    """One row per stochastic configuration and type of minimum reached: ``runs``, the mean offset
    of the averaged iterate from its minimum (``bias_mu``; ``bias_log_sigma`` in log sigma) and
    its standard deviation over those runs (``spread_mu``, ``spread_log_sigma``)."""
    keys = _quoted(PRACTICE + CELL)
    log_ratio = "0.5 * ln(sigma2 / basin_sigma2)"
    query = (
        f"SELECT {keys}, basin_type, count(*) AS runs, avg(mu - basin_mu) AS bias_mu, "
        f"avg({log_ratio}) AS bias_log_sigma, stddev_samp(mu) AS spread_mu, "
        f"stddev_samp(0.5 * ln(sigma2)) AS spread_log_sigma "
        f"FROM {_stochastic_source(sweep_dir, columns)} WHERE status = 'converged' "
        f"GROUP BY {keys}, basin_type ORDER BY {keys}, basin_type"
    )
    return con.execute(query).df()


def deterministic_outcomes(shares: pd.DataFrame) -> pd.DataFrame:
    """The type of minimum the exact fit reaches from each configuration's start (its divergence,
    cell and ``init_mu``, ``init_sigma2``; the Quadrature rule, Adam and the Newton polish to
    |grad| <= 1e-10): the deterministic answer the seeds spread around. Column ``exact_type``."""
    from kl_sweep.table import run_rows

    keys = ["divergence", "alpha", "center", "component_var", "init_mu", "init_sigma2", *CELL]
    starts = shares[keys].drop_duplicates(ignore_index=True)
    parts = []
    for (divergence, alpha), rows in starts.groupby(["divergence", "alpha"], dropna=False):  # a few
        frame = rows.drop(columns=["divergence", "alpha"]).assign(
            **{"optimizer.lr": EXACT_LR, "optimizer.max_steps": EXACT_STEPS, "optimizer.tol": EXACT_TOL}
        )
        if not pd.isna(alpha):
            frame["divergence.alpha"] = float(alpha)
        shared = {
            "divergence.name": str(divergence),
            "estimator.name": "quadrature",
            "optimizer.name": "adam",
            "polish": True,
        }
        fitted = run_rows(frame.reset_index(drop=True), shared)
        types = np.where(fitted["status"] == "converged", classify.optimum_types(fitted), None)
        parts.append(rows.assign(exact_type=types, exact_mu=fitted["mu"].to_numpy()))
    return pd.concat(parts, ignore_index=True)


def _crossing(x: np.ndarray, y: np.ndarray, level: float = 0.5) -> list[tuple[float, str]]:
    """Where the piecewise-linear y(x) crosses ``level``, and whether it rises or falls there."""
    out = []
    for i in range(len(x) - 1):  # along one line of separations
        a, b = y[i] - level, y[i + 1] - level
        if a == 0.0 or a * b < 0.0:
            t = 0.0 if a == 0.0 else a / (a - b)
            out.append((float(x[i] + t * (x[i + 1] - x[i])), "rises" if b > a else "falls"))
    return out


def effective_boundary(shares: pd.DataFrame, exact: pd.DataFrame) -> pd.DataFrame:
    """Along the separation, per practice and weight: where each type's share of seeds crosses
    1/2 (``kind`` = ``stochastic``) and where the exact fit from the same start starts or stops
    reaching that type (``kind`` = ``exact from the start``, midway between swept separations)."""
    rows = []
    start_keys = ["divergence", "alpha", "center", "component_var", "init_mu", "init_sigma2", *CELL]
    merged = shares.merge(exact, on=start_keys, how="left")
    for key, line in merged.groupby([*PRACTICE, "weight"], dropna=False, sort=True):  # lines
        line = line.sort_values("separation")
        x = line["separation"].to_numpy(float)
        base = dict(zip([*PRACTICE, "weight"], key, strict=True))
        for t in TYPES:
            for s, way in _crossing(x, line[SHARE[t]].to_numpy(float)):
                rows.append({**base, "type": t, "kind": "stochastic", "separation": s, "direction": way})
            reached = (line["exact_type"] == t).to_numpy(float)
            for s, way in _crossing(x, reached):
                rows.append(
                    {**base, "type": t, "kind": "exact from the start", "separation": s, "direction": way}
                )
    columns = [*PRACTICE, "weight", "type", "kind", "separation", "direction"]
    return pd.DataFrame(rows, columns=columns)


def _settings(shares: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """The non-facet practice settings of the sweep, each with its rows (at most MAX_SETTINGS)."""
    others = [k for k in PRACTICE if k not in FACETS]
    groups = list(shares.groupby(others, dropna=False, sort=True))  # one figure each
    return [(dict(zip(others, key, strict=True)), rows) for key, rows in groups[:MAX_SETTINGS]]


def _title(setting: dict) -> str:
    alpha = "" if pd.isna(setting["alpha"]) else f" (alpha {setting['alpha']:g})"
    return (
        f"{setting['divergence']}{alpha}, start mu {setting['init_mu']:g}, "
        f"sigma2 {setting['init_sigma2']:g}; "
        f"{setting['optimizer']} {setting['schedule']}, {setting['gradient']} gradient, "
        f"{setting['max_steps']:g} steps, last {setting['average']:g} averaged"
    )


def _grid(rows: pd.DataFrame, **kw) -> tuple[Figure, np.ndarray, list, list]:
    samples = sorted(rows["num_samples"].unique())
    rates = sorted(rows["lr"].unique())
    fig, axes = plt.subplots(
        len(samples),
        len(rates),
        figsize=(max(9.0, 3.6 * len(rates) + 1.4), 2.9 * len(samples) + 1.9),
        squeeze=False,
        **kw,
    )
    return fig, axes, samples, rates


def share_lines_figure(
    setting: dict, rows: pd.DataFrame, exact: pd.DataFrame, weight: float, folds
) -> Figure:
    """Shares of seeds ending in each type of minimum against the separation at ``weight``: a panel
    per (num_samples, lr), the exact fit from the same start as a strip under the shares, and the
    exact fold separations at that weight as dotted lines."""
    rows = rows[rows["weight"] == weight]
    fig, axes, samples, rates = _grid(rows, sharex=True, sharey=True)
    keys = ["divergence", "alpha", "center", "component_var", "init_mu", "init_sigma2", *CELL]
    for i, n in enumerate(samples):
        for j, lr in enumerate(rates):
            ax = axes[i, j]
            part = rows[(rows["num_samples"] == n) & (rows["lr"] == lr)].sort_values("separation")
            part = part.merge(exact, on=keys, how="left")
            x = part["separation"].to_numpy(float)
            shares = [part[SHARE[t]].to_numpy(float) for t in TYPES]
            if len(x) > 1:
                ax.stackplot(x, *shares, colors=[COLOURS[t] for t in TYPES], alpha=0.85)
            else:  # one separation: a stacked bar
                below = np.zeros(len(x))
                for t, share in zip(TYPES, shares, strict=True):
                    ax.bar(x, share, bottom=below, width=0.5, color=COLOURS[t], alpha=0.85)
                    below = below + share
            for t in TYPES:  # the deterministic answer from the same start, as a strip below
                hit = part["exact_type"] == t
                ax.scatter(
                    x[hit], np.full(hit.sum(), -0.07), marker="s", s=14, color=COLOURS[t], clip_on=False
                )
            for s in folds:
                ax.axvline(s, color="black", linestyle=":", linewidth=1.2)
            ax.axhline(0.5, color="white", linewidth=0.8, linestyle="--")
            ax.set_ylim(-0.12, 1.0)
            ax.set_title(f"{int(n)} draw{'s' if n != 1 else ''} a step, lr {lr:g}", fontsize=10)
            if j == 0:
                ax.set_ylabel("share of seeds")
            if i == len(samples) - 1:
                ax.set_xlabel(separation_label(setting["component_var"]))
    handles = [Line2D([], [], color=COLOURS[t], linewidth=8, label=f"ends in the {t} minimum") for t in TYPES]
    handles += [
        Line2D([], [], marker="s", linestyle="", color="grey", label="exact fit from the start (strip)"),
        Line2D([], [], color="black", linestyle=":", label="exact fold (a minimum is born or dies)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=9)
    fig.suptitle(f"Stochastic VI: where the seeds end, weight {weight:g}\n{_title(setting)}", fontsize=11)
    fig.tight_layout(rect=(0, 0.75 / fig.get_figheight(), 1, 1))
    return fig


def share_map_figure(setting: dict, rows: pd.DataFrame, structure, boundary: pd.DataFrame) -> Figure:
    """The share of seeds ending in the covering minimum over (separation, weight): a panel per
    (num_samples, lr), its 1/2 contour (the effective boundary), the exact fit's switch from the same
    start and the exact fold and coexistence lines."""
    fig, axes, samples, rates = _grid(rows, sharex=True, sharey=True)
    mesh = None
    handles: dict[str, Line2D] = {}
    for i, n in enumerate(samples):
        for j, lr in enumerate(rates):
            ax = axes[i, j]
            part = rows[(rows["num_samples"] == n) & (rows["lr"] == lr)]
            grid = part.pivot_table(index="weight", columns="separation", values=SHARE[classify.COVERING])
            x, y = grid.columns.to_numpy(float), grid.index.to_numpy(float)
            mesh = ax.pcolormesh(x, y, grid.to_numpy(), cmap="cividis", vmin=0.0, vmax=1.0, shading="nearest")
            if len(x) > 1 and len(y) > 1:
                ax.contour(x, y, grid.to_numpy(), levels=[0.5], colors=[BOUNDARY_COLOUR], linewidths=2.5)
                handles["half"] = Line2D(
                    [],
                    [],
                    color=BOUNDARY_COLOUR,
                    linewidth=2.5,
                    label="share 1/2: stochastic VI's effective boundary",
                )
            line = boundary[
                (boundary["num_samples"] == n)
                & (boundary["lr"] == lr)
                & (boundary["type"] == classify.COVERING)
                & (boundary["kind"] == "exact from the start")
            ]
            if len(line):
                ax.plot(line["separation"], line["weight"], linestyle="", **EXACT_MARKER)
                handles["exact"] = Line2D(
                    [],
                    [],
                    linestyle="",
                    **EXACT_MARKER,
                    label="the exact fit from the same start stops covering",
                )
            if structure is not None:
                handles |= draw_exact_lines(ax, structure, label_regions=False)
            ax.set_title(f"{int(n)} draw{'s' if n != 1 else ''} a step, lr {lr:g}", fontsize=10)
    fig.supylabel("weight of the left component")
    height = fig.get_figheight()  # the legend takes about 1.1 in at the bottom, the x label above it
    fig.supxlabel(separation_label(setting["component_var"]), y=1.2 / height)
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=2, frameon=False, fontsize=9)
    fig.suptitle(
        f"Stochastic VI: the covering basin's share over (separation, weight)\n{_title(setting)}", fontsize=11
    )
    fig.tight_layout(rect=(0.02, 1.2 / height, 0.88, 1))
    bar = fig.add_axes((0.9, 0.2, 0.018, 0.62))
    fig.colorbar(mesh, cax=bar, label="share of seeds ending in the covering minimum")
    return fig


def bias_figure(bias: pd.DataFrame) -> Figure:
    """Bias and spread of the averaged iterate against the draws a step, a line per learning rate
    (the median over the cells and minima with at least MIN_SEEDS converged seeds); the spread over
    sqrt(seeds) is the bias's own noise floor, dotted."""
    kept = bias[bias["runs"] >= MIN_SEEDS].copy()
    kept["bias"] = np.hypot(kept["bias_mu"], kept["bias_log_sigma"])
    kept["spread"] = np.hypot(kept["spread_mu"], kept["spread_log_sigma"])
    kept["floor"] = kept["spread"] / np.sqrt(kept["runs"])
    pooled = kept.groupby(["lr", "num_samples"])[["bias", "spread", "floor"]].median().reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    rates = sorted(pooled["lr"].unique())
    colours = dict(zip(rates, PALETTE, strict=False))
    for lr, part in pooled.groupby("lr"):  # a line per learning rate
        axes[0].plot(part["num_samples"], part["bias"], "o-", color=colours[lr], label=f"lr {lr:g}")
        axes[0].plot(part["num_samples"], part["floor"], ":", color=colours[lr])
        axes[1].plot(part["num_samples"], part["spread"], "o-", color=colours[lr], label=f"lr {lr:g}")
    for ax, what in zip(axes, ("bias: |mean offset from the minimum|", "spread: sd over seeds"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("Monte Carlo draws a step (num_samples)")
        ax.set_ylabel(f"{what}\nin (mu, log sigma), median over cells")
    axes[0].plot([], [], ":", color="grey", label="the bias's own noise floor (spread / sqrt(seeds))")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)
    fig.suptitle("Stochastic VI: the averaged iterate against its exact minimum", fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


@dataclass
class StochasticAnalysis:
    """The stochastic rows of a sweep, aggregated: :func:`basin_shares`, :func:`bias_spread`, the
    exact fit from each start (:func:`deterministic_outcomes`) and :func:`effective_boundary`."""

    shares: pd.DataFrame
    bias: pd.DataFrame
    exact: pd.DataFrame
    boundary: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "stochastic_shares": self.shares,
            "stochastic_boundary": self.boundary,
            "stochastic_bias": self.bias,
        }


def analyse_stochastic(sweep) -> StochasticAnalysis | None:
    """The stochastic rows of ``sweep`` (an :class:`analysis.source.Sweep`) aggregated, or None."""
    con, path, columns = sweep.con, sweep.path, sweep.columns
    if not has_stochastic_rows(con, path, columns):
        return None
    shares = basin_shares(con, path, columns)
    exact = deterministic_outcomes(shares)
    return StochasticAnalysis(
        shares, bias_spread(con, path, columns), exact, effective_boundary(shares, exact)
    )


def stochastic_figures(
    analysis: StochasticAnalysis, weight: float | None = None
) -> Iterator[tuple[str, Figure]]:
    """(name, figure) of the shares along the separation at the swept weight nearest ``weight``
    (default 0.6), the covering share's map (two weights or more) for each practice setting (at
    most MAX_SETTINGS), and the bias and spread (configurations with MIN_SEEDS converged seeds)."""
    from analysis.structure import exact_structure

    for k, (setting, rows) in enumerate(_settings(analysis.shares)):  # at most MAX_SETTINGS
        suffix = "" if k == 0 else f"_{k + 1}"
        weights = np.unique(rows["weight"].to_numpy(float))
        w = weights[np.argmin(np.abs(weights - (DEFAULT_WEIGHT if weight is None else weight)))]
        separations = np.unique(rows["separation"].to_numpy(float))
        structure, folds = None, []
        if len(separations) > 1:
            alpha = None if pd.isna(setting["alpha"]) else float(setting["alpha"])
            structure = exact_structure(
                str(setting["divergence"]),
                weights,
                (float(separations.min()), float(separations.max())),
                center=float(setting["center"]),
                component_var=float(setting["component_var"]),
                alpha=alpha,
                separations=separations,
            )
            p = structure.points
            folds = p[(p["kind"] == "fold") & np.isclose(p["weight"], w)]["separation"].tolist()
        yield f"stochastic_shares{suffix}", share_lines_figure(setting, rows, analysis.exact, float(w), folds)
        if len(weights) > 1 and len(separations) > 1:
            mine = analysis.boundary.merge(pd.DataFrame([setting]), on=list(setting))
            yield f"stochastic_map{suffix}", share_map_figure(setting, rows, structure, mine)
    if (analysis.bias["runs"] >= MIN_SEEDS).any():
        yield "stochastic_bias", bias_figure(analysis.bias)


def write_stochastic(sweep, weight: float | None = None) -> tuple[list[Path], list[str]]:
    """The stochastic rows' tables (``stochastic_shares``, ``stochastic_boundary``,
    ``stochastic_bias``) and figures; the paths written and notes."""
    analysis = analyse_stochastic(sweep)
    if analysis is None:
        return [], []
    written, notes = [], []
    for name, table in analysis.tables().items():
        target = sweep.path / "tables" / f"{name}.csv"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text(table.to_csv(index=False), target)
        written.append(target)
    if len(analysis.shares.groupby([k for k in PRACTICE if k not in FACETS], dropna=False)) > MAX_SETTINGS:
        notes.append(f"stochastic rows: figures for the first {MAX_SETTINGS} practice settings only")
    if not (analysis.bias["runs"] >= MIN_SEEDS).any():
        notes.append(f"stochastic rows: no configuration has {MIN_SEEDS} converged seeds, no bias figure")
    with style():
        for name, fig in stochastic_figures(analysis, weight):  # a handful
            written += save(fig, sweep.path / "figures", name)
            plt.close(fig)
    return written, notes
