"""Throughput of d-dimensional fits (issue #21, "Speed"), each figure beside its own baseline.

a. d = 2, ``full`` Q, reverse KL, correlation 0.5, to |grad| <= 1e-8, on a grid of
   separation x weight x init_mu (80 x 5 x 25 = 10,000 configurations by default):
   - the core: :func:`kl_sweep.core.fit.fit` on one Problem, one thread;
   - the command line: ``python -m kl_sweep -m ...`` over exactly that grid, timed as a whole
     process and by the fit phase's own log line ("fitted N configurations in T s"), with the
     basic launcher and with ``hydra/launcher=joblib hydra.sweeper.shards=2``;
   - the plain autograd baseline (``baseline_autograd_nd.py``: Gauss-Hermite, Adam, no Newton) on
     every k-th row of the grid, one thread; its rate is per fit, so it is quoted for the subset
     and scaled to the whole grid;
   with the ratios, the fraction converged, and how far the baseline's minima are from the core's.
   Target (issue #21): at least 20,000 fits/s through the command line on 2 cores, read as the
   sweep's own fit-phase figure (the whole process adds a fixed start-up of about 2.4 s: Python,
   Hydra, torch, planning and assembling the table, whatever the number of rows).
b. Fits/s against d for each family (core, reverse KL, one thread): d = 1, 2, 5, 10, 20, 50 for
   ``diag`` and ``iso``, up to 20 for ``full``. Each point's batch is doubled until it takes about
   ``--point-seconds`` (or reaches ``--max-rows``), then timed ``--repeats`` times, the points
   interleaved; medians. The growth exponent between successive d is log(t2/t1)/log(d2/d1), t the
   seconds per fit and per row-step (a row-step: one derivative evaluation of one row, first-order
   or Newton). Target: no more than 2 per step for a shared covariance. d = 1 is also timed on the
   1-D path the command line takes there (the native kernel), for reference. The batch differs
   between points, and a batched loop's fixed cost an iteration weighs more on a small batch, so
   these exponents are rough; b2 measures the pieces of a step at one batch size.
b2. One step's pieces per row against d, at a fixed batch, on the torch loop (what the d > 1 fits
   of the other divergences run; the reverse KL's run whole in the native kernel, b): the gradient
   (a first-order step), the Hessian (every ``check_every``-th first-order step and every Newton
   step) and the Newton solve, with their growth exponents.
c. The 1-D study's speed before d dimensions (commit b969bed, checked out in a temporary git
   worktree) and now (this tree, uncommitted changes included): the commands of
   ``sweep_throughput.py`` (its 10,000 grid on the kl_sweep sweeper, and its study mix at 10^5 on
   joblib shards, one per core), run alternately from each tree, medians and ratios. Also checks
   that the two trees give the same 1-D rows.

Timings on a shared machine are noisy: each section prints the load average as it starts and
ends. Nothing here asserts a timing.

    python benchmarks/dims_throughput.py [--quick] [--repeats 3] [--skip a,b,c] [--profile full:20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import math
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import baseline_autograd_nd  # noqa: E402
from sweep_throughput import GRID_10K, grid_mix  # noqa: E402

from kl_sweep.core.divergences import DIVERGENCES  # noqa: E402
from kl_sweep.core.estimators import Quadrature  # noqa: E402
from kl_sweep.core.fit import Problem, Settings, Status, fit  # noqa: E402
from kl_sweep.core.gaussians import Family  # noqa: E402
from kl_sweep.core.mixture import Mixture  # noqa: E402
from kl_sweep.core.optim import Adam, newton  # noqa: E402
from kl_sweep.core.reduction import ReducedObjective, SharedPair  # noqa: E402
from kl_sweep.threads import available_cores  # noqa: E402

f64 = torch.float64
BEFORE = "b969bed"  # the last commit before d dimensions
#: The fit phase's own line (kl_sweep.sweep.Progress.close), one per shard; its rate has more
#: digits than its seconds (printed to 0.1 s).
FITTED = re.compile(r"fitted (\d+) configurations in [0-9.]+ s: (\d+) configurations/s")
RHO = 0.5
DIMS = {"full": [1, 2, 5, 10, 20], "diag": [1, 2, 5, 10, 20, 50], "iso": [1, 2, 5, 10, 20, 50]}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def section(title: str) -> None:
    print(f"\n== {title}  [{load()}]", flush=True)


def child_env(pythonpath: Path | None = None) -> dict[str, str]:
    """The environment of a command-line run: the user's, without a thread limit of ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HYDRA_FULL_ERROR")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


# --- the grid ------------------------------------------------------------------------------------


def grid_values(n_sep: int, n_mu: int) -> dict[str, list[float]]:
    """separation in [0, 8) (n_sep values), weight 0.5..0.9, init_mu from -4.8 to 4.8 (n_mu values)."""
    mus = [0.0] if n_mu == 1 else [-4.8 + 9.6 * i / (n_mu - 1) for i in range(n_mu)]
    return {
        "separation": [round(8.0 * i / n_sep, 10) for i in range(n_sep)],
        "weight": [0.5, 0.6, 0.7, 0.8, 0.9],
        "init_mu": [round(m, 10) for m in mus],
    }


def grid_rows(values: dict[str, list[float]]) -> torch.Tensor:
    """[B, 3] (separation, weight, init_mu), in the order the command line's overrides list them."""
    return torch.tensor(list(itertools.product(*values.values())), dtype=f64)


def problem(rows: torch.Tensor, dim: int, family: str | None, rho: float = RHO) -> Problem:
    """The reverse-KL problem of ``rows`` [B, 3] with Q's ``family`` in R^dim (axis direction,
    center 0, component_var 1, init_sigma2 1, Adam at 0.05, 5,000 steps, tol 1e-8: the command
    line's defaults). ``family`` None: the 1-D path (no family; the native kernel's whole fits)."""
    B = rows.shape[0]
    sep, weight, init_mu = rows.unbind(-1)
    zero, one = torch.zeros(B, dtype=f64), torch.ones(B, dtype=f64)
    common = dict(
        init_mu=init_mu,
        init_sigma2=one,
        lr=torch.full((B,), 0.05, dtype=f64),
        max_steps=torch.full((B,), 5000, dtype=torch.long),
        tol=torch.full((B,), 1e-8, dtype=f64),
    )
    if family is None:
        return Problem(mixture=Mixture.two_component(sep, weight, zero, one), **common)
    target = SharedPair(sep, weight, zero, one, torch.full((B,), rho if dim > 1 else 0.0), dim, "axis")
    return Problem(mixture=target.line(), target=target, family=Family(family, dim), **common)


SETTINGS = Settings(DIVERGENCES["reverse"], Quadrature(6), Adam())


def timed_fit(prob: Problem):
    tic = time.perf_counter()
    result = fit(prob, SETTINGS)
    return time.perf_counter() - tic, result


# --- a. d = 2 ------------------------------------------------------------------------------------


def cli_run(overrides: list[str], directory: Path, cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds of ``python -m kl_sweep -m OVERRIDES``, seconds of its fit phase)."""
    cmd = [sys.executable, "-m", "kl_sweep", "-m", *overrides]
    cmd += [f"hydra.sweep.dir={directory}", "hydra.sweeper.latest_link=null"]
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=env)  # page cache, untimed
    tic = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(f"failed ({cwd}): {' '.join(cmd)[:300]} ...\n{done.stderr[-3000:]}")
    fitted = [int(n) / int(rate) for n, rate in FITTED.findall(done.stderr + done.stdout)]
    return wall, max(fitted)  # shards fit side by side: the slowest one ends the phase


def section_a(args, tmp: Path) -> None:
    values = grid_values(*args.grid)
    rows = grid_rows(values)
    B = rows.shape[0]
    section(f"a. d = 2, full Q, reverse KL, correlation {RHO}, B = {B:,}, tol 1e-8")
    prob = problem(rows, 2, "full")
    fit(problem(rows[:20], 2, "full"), SETTINGS)  # warm-up: the native kernel loaded
    baseline_every = max(1, B // args.baseline_rows)
    sub = torch.arange(0, B, baseline_every)
    overrides = [
        "dim=2",
        f"correlation={RHO}",
        "q_family=full",
        "divergence=reverse",
        *(f"{k}={','.join(repr(v) for v in vs)}" for k, vs in values.items()),
    ]
    cores = available_cores()
    joblib = ["hydra/launcher=joblib", f"hydra.sweeper.shards={cores}"]
    one_thread = {**child_env(), "OMP_NUM_THREADS": "1"}
    # Basic: one shard with every core's threads (the default); joblib: a shard a core; and one
    # shard on one thread, to see what threads do to the basic launcher (quick: that one alone).
    launchers = {"basic, OMP_NUM_THREADS=1": ([], one_thread)}
    if not args.quick:
        launchers = {
            "basic": ([], child_env()),
            f"joblib, {cores} shards": (joblib, child_env()),
            **launchers,
        }
    core_t: list[float] = []
    cli_t: dict[str, list[tuple[float, float]]] = {name: [] for name in launchers}
    cli_conv: dict[str, float] = {}
    result = None
    for r in range(args.repeats):  # interleaved: core, each launcher, again
        seconds, result = timed_fit(prob)
        core_t.append(seconds)
        for i, (name, (extra, env)) in enumerate(launchers.items()):
            directory = tmp / f"a-{r}-{i}"
            cli_t[name].append(cli_run([*overrides, *extra], directory, ROOT, env))
            table = pd.read_parquet(directory / "results.parquet", columns=["converged", "status"])
            assert len(table) == B, f"{len(table)} rows, expected {B}"
            cli_conv[name] = float(table["converged"].mean())
        print(
            f"  repeat {r + 1}: core {seconds:.2f} s, cli "
            + ", ".join(
                f"{n}: {w:.1f} s wall / {f:.1f} s fit" for n, (w, f) in ((n, t[-1]) for n, t in cli_t.items())
            ),
            f"[{load()}]",
            flush=True,
        )
    base_tic = time.perf_counter()
    theta_b, loss_b, _, steps_b, conv_b = baseline_autograd_nd.fit_reverse(
        rows[sub, 0], rows[sub, 1], rows[sub, 2], correlation=RHO, d=2, nodes=args.nodes
    )
    base_seconds = time.perf_counter() - base_tic
    core = B / statistics.median(core_t)
    base = len(sub) / base_seconds
    conv = (result.status == int(Status.CONVERGED)).double().mean().item()
    steps = result.steps.double()
    print(
        f"  core (fit, 1 thread)            : {core:9,.0f} fits/s   median of {args.repeats}: "
        f"{[round(t, 2) for t in core_t]} s; converged {conv:.2%}; steps mean {steps.mean():.0f}, "
        f"max {int(steps.max())}"
    )
    for name, times in cli_t.items():
        wall = statistics.median(w for w, _ in times)
        phase = statistics.median(f for _, f in times)
        print(
            f"  cli, {name:27s}: {B / wall:9,.0f} fits/s whole process ({wall:.1f} s), "
            f"{B / phase:,.0f} fits/s fit phase ({phase:.2f} s); converged {cli_conv[name]:.2%}; "
            f"target >= 20,000 fits/s in the fit phase: {B / phase / 20000:.2f} of it"
        )
    print(
        f"  baseline (autograd, GH {args.nodes}x{args.nodes}, Adam, 1 thread): {base:9,.1f} fits/s on "
        f"{len(sub):,} rows (every {baseline_every}th) in {base_seconds:.1f} s -> {B / base:,.0f} s "
        f"for all {B:,} (scaled); converged {conv_b.double().mean():.2%}; steps mean "
        f"{steps_b.double().mean():.0f}, max {int(steps_b.max())}"
    )
    best_cli = max(B / statistics.median(w for w, _ in t) for t in cli_t.values())
    print(
        f"  ratios against the baseline: core {core / base:,.0f}x, best cli whole process "
        f"{best_cli / base:,.0f}x"
    )
    # Same minima? The baseline's minimum is off the exact one by its Gauss-Hermite rule's error
    # (largest where Q covers both modes and log p bends inside it); a loss apart by more than
    # 0.01 nats is another local minimum (a start near a basin boundary).
    both = conv_b & (result.status[sub] == int(Status.CONVERGED))
    dtheta = (result.theta[sub] - theta_b).abs().max(-1).values[both]
    signed = (result.loss[sub] - loss_b)[both]
    other = signed.abs() > 0.01
    print(
        f"  core vs baseline on {int(both.sum())} rows converged in both: |theta diff| median "
        f"{dtheta.median():.1e}, max {dtheta[~other].max():.1e} on the same minimum "
        f"({int((dtheta[~other] > 1e-3).sum())} rows > 1e-3 apart, |loss diff| <= "
        f"{signed[~other].abs().max():.1e} nats); another minimum in {int(other.sum())} rows "
        f"(core lower in {int((signed[other] < 0).sum())}, by up to {signed.abs().max():.2f} nats)"
    )


# --- b. against d --------------------------------------------------------------------------------


def section_b(args) -> None:
    section("b. fits/s against d, core, reverse KL, 1 thread")
    pool = grid_rows(grid_values(80, 25))
    pool = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))]
    points = [(name, d) for name, dims in DIMS.items() for d in dims if d <= args.max_dim]
    points.append(("1-D path", 1))
    sizes: dict[tuple[str, int], int] = {}
    for name, d in points:  # the batch size of each point: doubled until it takes a few seconds
        family = None if name == "1-D path" else name
        B = args.min_rows
        while True:
            seconds, _ = timed_fit(problem(pool[:B], d, family))
            if seconds >= args.point_seconds / 2 or B >= args.max_rows:
                break
            B = min(args.max_rows, 2 * B)
        sizes[(name, d)] = B
    times: dict[tuple[str, int], list[float]] = {p: [] for p in points}
    row_steps: dict[tuple[str, int], float] = {}
    converged: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for name, d in points:  # interleaved over the points
            family = None if name == "1-D path" else name
            seconds, result = timed_fit(problem(pool[: sizes[(name, d)]], d, family))
            times[(name, d)].append(seconds)
            row_steps[(name, d)] = float(result.steps.double().sum())
            converged[(name, d)] = float((result.status == int(Status.CONVERGED)).double().mean())
    print(
        f"  {'family':8s} {'d':>3s} {'P':>5s} {'B':>6s} {'fits/s':>10s} {'us/fit':>10s} {'steps/fit':>9s} "
        f"{'us/row-step':>11s} {'conv':>7s} {'exp/fit':>8s} {'exp/step':>8s}"
    )
    for name in [*DIMS, "1-D path"]:
        prev = None
        for d in [d for n, d in points if n == name]:
            B = sizes[(name, d)]
            t = statistics.median(times[(name, d)])
            per_fit, per_step = t / B, t / row_steps[(name, d)]
            P = 2 if name == "1-D path" else Family(name, d).n_params
            exps = ("", "")
            if prev is not None:
                d0, f0, s0 = prev
                exps = tuple(
                    f"{math.log(x / x0) / math.log(d / d0):8.2f}" for x, x0 in ((per_fit, f0), (per_step, s0))
                )
            print(
                f"  {name:8s} {d:3d} {P:5d} {B:6d} {B / t:10,.0f} {per_fit * 1e6:10.1f} "
                f"{row_steps[(name, d)] / B:9.1f} {per_step * 1e6:11.2f} {converged[(name, d)]:7.1%} "
                f"{exps[0]:>8s} {exps[1]:>8s}"
            )
            prev = (d, per_fit, per_step)
    print(f"  (median of {args.repeats}; exp: growth exponent of the cost from the d above)")


def per_call(fn, seconds: float) -> float:
    """Seconds per call of ``fn()``: one call to warm up, then as many as fill ``seconds``."""
    fn()
    n, tic = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - tic
        if elapsed >= seconds:
            return elapsed / n


#: First-order steps a row when b2 times the kernel's step.
KERNEL_STEPS = 50


def section_b2(args) -> None:
    rows = {name: args.step_rows_full if name == "full" else args.step_rows for name in DIMS}
    section(
        f"b2. one step's pieces against d, per row, at a fixed batch ({rows['full']} rows for full, "
        f"{rows['diag']} for diag and iso), reverse KL, 1 thread"
    )
    pool = grid_rows(grid_values(80, 25))
    pool = pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(0))]
    points = [(name, d) for name, dims in DIMS.items() for d in dims if d <= args.max_dim]
    calls = {}
    for name, d in points:
        prob = problem(pool[: rows[name]], d, name)
        obj = ReducedObjective.build(SETTINGS.divergence, SETTINGS.estimator, prob.target, prob.family)
        theta = prob.family.initial(prob.init_mu.unsqueeze(-1) * prob.target.u, prob.init_sigma2)
        noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=f64)
        theta = theta + 0.1 * noise  # off the start: every entry of L in play
        _, g, H = obj.derivatives(theta, True)
        # The kernel's first-order step: KERNEL_STEPS Adam steps a row, no polish, tol 0.
        steps_only = replace(
            prob,
            max_steps=torch.full_like(prob.max_steps, KERNEL_STEPS),
            tol=torch.zeros_like(prob.tol),
        )
        calls[(name, d)] = {
            "kernel step": lambda q=steps_only: fit(q, replace(SETTINGS, polish=False)),
            "gradient": lambda o=obj, t=theta: o.derivatives(t, False),
            "Hessian": lambda o=obj, t=theta: o.derivatives(t, True),
            "Newton solve": lambda g=g, H=H: newton(g, H),
        }
    pieces = ["kernel step", "gradient", "Hessian", "Newton solve"]
    times = {(p, piece): [] for p in points for piece in pieces}
    for _ in range(args.repeats):
        for p in points:  # interleaved over the points
            for piece in pieces:
                per_row = rows[p[0]] * (KERNEL_STEPS if piece == "kernel step" else 1)
                times[(p, piece)].append(per_call(calls[p][piece], args.call_seconds) / per_row)
    print(
        f"  {'family':6s} {'d':>3s} {'P':>5s}"
        + "".join(f" {piece + ' us':>15s} {'exp':>5s}" for piece in pieces)
    )
    for name in DIMS:
        prev = None
        for d in [d for n, d in points if n == name]:
            now = {piece: statistics.median(times[((name, d), piece)]) for piece in pieces}
            line = f"  {name:6s} {d:3d} {Family(name, d).n_params:5d}"
            for piece in pieces:
                exp = (
                    ""
                    if prev is None
                    else f"{math.log(now[piece] / prev[1][piece]) / math.log(d / prev[0]):5.2f}"
                )
                line += f" {now[piece] * 1e6:15.2f} {exp:>5s}"
            print(line)
            prev = (d, now)
    print(
        f"  (microseconds a row, median of {args.repeats}; exp: growth exponent from the d above. kernel "
        f"step: one first-order step of the native kernel's whole fit (Adam, {KERNEL_STEPS} a row, no "
        "polish); the other three are the torch loop's. A first-order step costs one gradient; every "
        "5th adds a Hessian and a solve, a Newton step both)"
    )


def profile(spec: str, rows: int) -> None:
    name, d = spec.split(":")
    section(f"profile: {name} Q, d = {d}, {rows} rows, reverse KL, 1 thread")
    prob = problem(grid_rows(grid_values(80, 25))[torch.randperm(10000)[:rows]], int(d), name)
    profiler = cProfile.Profile()
    profiler.enable()
    fit(prob, SETTINGS)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])


# --- c. the 1-D study before and after -----------------------------------------------------------


def section_c(args, tmp: Path) -> None:
    section(f"c. the 1-D study: commit {BEFORE} (before d dimensions) against this tree")
    before = Path(tempfile.mkdtemp(prefix="wt-before-", dir="/tmp"))
    before.rmdir()
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(before), BEFORE], cwd=ROOT, check=True, capture_output=True
    )
    try:
        trees = {"before": (before, child_env(before)), "after": (ROOT, child_env(ROOT))}
        for name, (cwd, env) in trees.items():  # which code each run imports; the kernel compiled
            where = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import kl_sweep, hydra_plugins.kl_sweep_sweeper as s; from kl_sweep.core import native; "
                    "native.available(); print(kl_sweep.__file__, s.__file__)",
                ],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            assert all(Path(p).is_relative_to(cwd) for p in where), where
            head = subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=cwd, capture_output=True, text=True
            ).stdout.strip()
            imports = ", ".join(str(Path(p).relative_to(cwd)) for p in where)
            print(f"  {name}: {cwd} at {head} (imports {imports})")
        cases = {"10,000 grid, kl_sweep sweeper": GRID_10K}
        shards = ["hydra/launcher=joblib", f"hydra.sweeper.shards={available_cores()}"]
        if not args.quick:
            cases[f"study mix 10^5, {available_cores()} joblib shards"] = [*grid_mix(0.1), *shards]
        walls = {(c, t): [] for c in cases for t in trees}
        phases = {(c, t): [] for c in cases for t in trees}
        for r in range(args.repeats):
            for i, (case, overrides) in enumerate(cases.items()):
                order = list(trees) if r % 2 == 0 else list(reversed(trees))  # alternate who goes first
                for tree in order:
                    cwd, env = trees[tree]
                    wall, phase = cli_run(overrides, tmp / f"c-{r}-{tree}-{i}", cwd, env)
                    walls[(case, tree)].append(wall)
                    phases[(case, tree)].append(phase)
            print(f"  repeat {r + 1} done [{load()}]", flush=True)
        for i, case in enumerate(cases):
            wb, wa = (statistics.median(walls[(case, t)]) for t in trees)
            pb, pa = (statistics.median(phases[(case, t)]) for t in trees)
            print(
                f"  {case}: before {wb:.1f} s wall ({pb:.1f} s fit phase), after {wa:.1f} s "
                f"({pa:.1f} s); after/before {wa / wb:.3f} wall, {pa / pb:.3f} fit phase; walls before "
                f"{[round(w, 1) for w in walls[(case, 'before')]]}, after "
                f"{[round(w, 1) for w in walls[(case, 'after')]]}"
            )
            cols = ["config_hash", "mu", "sigma2", "loss", "steps", "status", "weight", "init_mu", "center"]
            b, a = (
                pd.read_parquet(tmp / f"c-0-{t}-{i}" / "results.parquet", columns=cols)
                .sort_values("config_hash")
                .reset_index(drop=True)
                for t in trees
            )
            hashes = len(b) == len(a) and bool((b.config_hash == a.config_hash).all())
            # Another minimum: a start exactly on the saddle of a symmetric P (weight 0.5, init_mu
            # at the centre) goes to either mirror-image mode as rounding falls.
            moved = (b.mu - a.mu).abs() > 1e-6
            saddle = (b.weight == 0.5) & ((b.init_mu - b.center).abs() < 1e-9)
            same = (b[["mu", "sigma2", "loss"]] - a[["mu", "sigma2", "loss"]])[~moved].abs().max().max()
            print(
                f"    rows before {len(b):,}, after {len(a):,}; same hashes {hashes}; another minimum in "
                f"{int(moved.sum())} rows, {int((moved & ~saddle).sum())} of them not an exact-saddle start; "
                f"the rest: max |diff| of mu, sigma2, loss {same:.1e}; steps equal "
                f"{bool((b.steps == a.steps).all())}"
            )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute in all")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each case (3; quick 1)")
    parser.add_argument("--skip", default="", help="sections to leave out, e.g. a,b2,c")
    parser.add_argument("--nodes", type=int, default=40, help="baseline: Gauss-Hermite nodes per axis")
    parser.add_argument("--profile", default=None, help="family:d to profile with cProfile, e.g. full:20")
    args = parser.parse_args()
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.grid = (10, 5) if quick else (80, 25)  # separations x init_mu (x 5 weights)
    args.baseline_rows = 10 if quick else 1000
    args.point_seconds = 0.2 if quick else 4.0
    args.min_rows, args.max_rows = (32, 128) if quick else (64, 8192)
    args.max_dim = 5 if quick else 50
    args.step_rows, args.step_rows_full = (64, 64) if quick else (1024, 256)
    args.call_seconds = 0.02 if quick else 0.5
    torch.set_num_threads(1)
    print(f"dims_throughput: python {sys.version.split()[0]}, torch {torch.__version__}, {load()}")
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if "a" not in skip:
            section_a(args, Path(tmp))
        if "b" not in skip:
            section_b(args)
        if "b2" not in skip:
            section_b2(args)
        if args.profile:
            profile(args.profile, 256 if quick else 1000)
        if "c" not in skip:
            section_c(args, Path(tmp))
    print(f"\ndone [{load()}]")


if __name__ == "__main__":
    main()
