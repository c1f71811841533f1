"""Fit speed of every member of the registry against the reverse KL's, in the same run.

1. core: the batched fit (``kl_sweep.core.fit.fit``, one thread) on the grid of 32 separations x
   3 weights x 17 starts = 1,632 configurations, per member; fits/s and the ratio to the reverse
   KL's. With ``--check`` also the torch loop (``Settings.fused=False``) on the same rows: rows
   whose minimum differs between the kernel and the loop are counted (expected: only starts on an
   exact saddle, weight 0.5 and init_mu 0, which rounding sends to either mirror-image mode).
2. cli: the same grid through ``python -m kl_sweep -m``, a fresh process each run; the figure is
   the sweep's own "fitted N configurations in T s" (the fit phase). Each member runs in
   ``--repeats`` pairs (3) with the reverse KL, in turn, and the ratio is the median of the pairs'
   (the reverse KL's fit phase, 0.06-0.09 s, is mostly fixed costs and moves by a third from run
   to run). Target: every member at no less than 1/3 of the reverse KL's configurations per second.
3. preset: ``experiment=alpha`` (6,138 configurations), its fit phase, against the reverse KL on
   as many configurations. Targets: at most 5 s, and at least 1/3 of the reverse KL's rate.
4. shared: the reverse KL and alpha = 0.5 on the grid, and the preset, alone and with one core kept
   busy by another process (a spinning Python), at the default thread count and with
   ``OMP_NUM_THREADS=1``. Target: at most 2.5x the time alone.

    python benchmarks/registry_throughput.py [--skip-cli] [--skip-shared] [--repeats N] [--check]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.fit import Problem, Settings, Status, fit
from kl_sweep.core.mixture import Mixture
from kl_sweep.core.optim import Adam

ROOT = Path(__file__).resolve().parent.parent
GRID = ["separation=range(0,8,0.25)", "weight=0.5,0.75,0.9", "init_mu=range(-4,4.5,0.5)"]
#: (divergence, alpha) of the issue's list; the reverse KL first: every ratio is against it.
MEMBERS = [("reverse", None)]
MEMBERS += [("alpha", a) for a in (-3.0, -1.0, -0.5, 0.25, 0.5, 0.75, 1.5, 2.0, 4.0)]
MEMBERS += [("hellinger", None), ("chi2", None), ("renyi", 0.25), ("renyi", 0.5), ("renyi", 2.0)]
MEMBERS += [("jensen_shannon", None), ("forward", None)]
#: The reverse KL on as many configurations as the alpha preset (33 x 3 x 62 = 6,138).
PRESET_SIZED_REVERSE = [
    "separation=range(0,8.1,0.25)",
    "weight=0.5,0.75,0.9",
    "init_mu=range(-3.05,3.15,0.1)",
    "divergence=reverse",
]
#: The sweep's line; its rate has more digits than its seconds (printed to 0.1 s).
FITTED = re.compile(r"fitted (\d+) configurations in [0-9.]+ s: (\d+) configurations/s")


def label(name: str, alpha: float | None) -> str:
    return name if alpha is None else f"{name} {alpha:g}"


def grid_problem(alpha: float | None) -> Problem:
    seps = torch.arange(0, 8, 0.25, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.75, 0.9], dtype=torch.float64)
    starts = torch.arange(-4, 4.5, 0.5, dtype=torch.float64)
    s, w, m = (x.flatten() for x in torch.meshgrid(seps, weights, starts, indexing="ij"))
    one = torch.ones_like(s)
    a = None if alpha is None else alpha * one
    steps = torch.full(s.shape, 5000, dtype=torch.long)
    return Problem(Mixture.two_component(s, w, 0 * one, one), m, one, 0.05 * one, steps, 1e-8 * one, a)


def core(check: bool) -> None:
    torch.set_num_threads(1)
    print("1. core: 1,632 configurations a member, one thread")
    base = None
    for name, alpha in MEMBERS:
        problem = grid_problem(alpha if DIVERGENCES[name].parameter else None)
        settings = Settings(DIVERGENCES[name], Quadrature(), Adam())
        fit(grid_problem(None) if name == "forward" else problem, settings)  # warm-up (and compile)
        tic = time.perf_counter()
        res = fit(problem, settings)
        rate = len(res.mu) / (time.perf_counter() - tic)
        base = base or rate
        line = f"   {label(name, alpha):16s} {rate:9,.0f} fits/s  {rate / base:5.2f}x reverse"
        line += f"  steps mean {res.steps.double().mean():6.1f}  converged {(res.status == 1).sum()}"
        if check:
            loop = fit(problem, replace(settings, fused=False))
            both = (res.status == Status.CONVERGED) & (loop.status == Status.CONVERGED)
            apart = both & ((res.mu - loop.mu).abs().gt(1e-6) | (res.sigma2 / loop.sigma2 - 1).abs().gt(1e-6))
            d_mu = (res.mu - loop.mu).abs()[both & ~apart].max().item()
            line += f"  | loop: other minimum {int(apart.sum())} rows, else max |d mu| {d_mu:.1e}"
        print(line, flush=True)


def cli_fit_seconds(args: list[str], env: dict[str, str] | None = None) -> float:
    """The fit phase (s) a sweep logs, from a fresh ``python -m kl_sweep -m ARGS`` process."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "kl_sweep", "-m", *args, f"hydra.sweep.dir={tmp}/s"]
        cmd.append("hydra.sweeper.latest_link=null")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    found = FITTED.findall(proc.stdout + proc.stderr)
    if proc.returncode or not found:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return sum(int(n) / int(rate) for n, rate in found)


def member_args(name: str, alpha: float | None) -> list[str]:
    return [*GRID, f"divergence={name}"] + ([] if alpha is None else [f"divergence.alpha={alpha}"])


def cli(repeats: int) -> None:
    print(f"2. cli: the fit phase of the same grid, python -m kl_sweep -m, a fresh process each; "
          f"{repeats} pairs (reverse KL, member) a member, run in turn, and their medians")  # fmt: skip
    reverse_args = member_args("reverse", None)
    for name, alpha in MEMBERS[1:]:
        args = member_args(name, alpha)
        pairs = [(cli_fit_seconds(reverse_args), cli_fit_seconds(args)) for _ in range(repeats)]
        ratios = sorted(r / m for r, m in pairs)
        ratio = statistics.median(ratios)
        seconds = statistics.median(m for _, m in pairs)
        verdict = "ok" if ratio >= 1 / 3 else "SLOWER than 1/3"
        print(f"   {label(name, alpha):16s} {seconds:6.2f} s  {1632 / seconds:7,.0f}/s  reverse "
              f"{statistics.median(r for r, _ in pairs):.2f} s  {ratio:5.2f}x reverse "
              f"({ratios[0]:.2f}-{ratios[-1]:.2f})  {verdict}", flush=True)  # fmt: skip
    pairs = [(cli_fit_seconds(["experiment=alpha"]), cli_fit_seconds(PRESET_SIZED_REVERSE)) for _ in range(5)]
    seconds, reverse = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    ratio = statistics.median(r / s for s, r in pairs)
    print(f"3. preset: experiment=alpha, 6,138 configurations, fit phase {seconds:.2f} s (target <= 5 s);")
    print(f"   the reverse KL on as many {reverse:.2f} s: the preset at {ratio:.2f}x reverse "
          f"(medians of 5 pairs run in turn; ratios {min(r / s for s, r in pairs):.2f}-"
          f"{max(r / s for s, r in pairs):.2f})")  # fmt: skip


def shared() -> None:
    print("4. shared: alone, then with one core kept busy by another process")
    cases = [("reverse", member_args("reverse", None)), ("alpha 0.5", member_args("alpha", 0.5))]
    cases.append(("experiment=alpha", ["experiment=alpha"]))
    for threads in (None, "1"):
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = threads
        for what, args in cases:
            alone = min(cli_fit_seconds(args, env) for _ in range(2))
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                busy = min(cli_fit_seconds(args, env) for _ in range(2))
            finally:
                spinner.kill()
            verdict = "ok" if busy <= 2.5 * alone else "over 2.5x"
            print(f"   OMP_NUM_THREADS={threads or 'unset':5s} {what:17s} alone {alone:6.2f} s  "
                  f"busy {busy:6.2f} s  {busy / alone:4.2f}x  {verdict}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--skip-shared", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="CLI pairs a member (their median)")
    parser.add_argument("--check", action="store_true", help="compare each row with the torch loop's")
    args = parser.parse_args()
    core(args.check)
    if not args.skip_cli:
        cli(args.repeats)
    if not args.skip_shared:
        shared()


if __name__ == "__main__":
    main()
