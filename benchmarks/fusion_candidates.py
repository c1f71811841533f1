"""Seconds per derivative step of the alpha family's fit, for each way of fusing its hot path.

``Objective._pointwise_derivatives(theta, hessian=True)`` (loss, gradient and Hessian in theta =
(mu, log sigma)) on B rows of the alpha family (orders a = 0.5, -1, 2; Quadrature estimator;
two-component P with separation 0-8, weight 0.5-0.9; mu in -4..4, log sigma in -0.5..0.5;
seeded). The candidates, all on the same rows:

- eager: the torch path (``Objective._native_pointwise`` patched to False); median of --steps calls.
- native: the fused C kernel ``kl_sweep.core.native.pointwise`` (the path taken by default).
- compile: ``torch.compile`` of the torch path, each order in two fresh subprocesses sharing a new
  TORCHINDUCTOR_CACHE_DIR: cold (empty cache), then warm (the cache on disk). Compile time = the
  first three calls minus three steady calls; then a call at B // 2 and at B // 4 (rows leave a
  real fit) is timed and its new graphs counted (``torch._dynamo.utils.counters``).
- numba: an ``@njit`` loop of the per-node terms (``core.alpha.alpha_fit_terms``) and the seven
  node sums, against the same torch part, on the nodes of the torch path; its JIT time is the
  first call minus a steady one. numba is not a dependency: it is imported from the environment
  or from --numba-path (``pip install --target /tmp/numba_pkg numba``); absent, it is skipped.

The projection for a 10,000-configuration sweep per order assumes 60 steps per row, every step a
call at batch B (10,000 * 60 / B calls: rows leaving is ignored), plus the candidate's one-off
cost; for numba, the eager step with its per-node part replaced by numba's.

    python benchmarks/fusion_candidates.py [--batch 1632] [--steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from kl_sweep.core.divergences import DIVERGENCES
from kl_sweep.core.estimators import Quadrature
from kl_sweep.core.mixture import LOG_2PI, Mixture
from kl_sweep.core.objective import Objective

ORDERS = (0.5, -1.0, 2.0)
CONFIGS, STEPS_PER_ROW = 10_000, 60
NATIVE = Objective._native_pointwise
EAGER = lambda self: False  # noqa: E731 (the patch that forces the torch path)
HEADER = ("one-off s", "ms/call", "x eager", "x native", "sweep s", "rel err")


def make(a: float, batch: int, seed: int) -> tuple[Objective, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(batch, generator=g, dtype=torch.float64)
    sep, weight, mu, log_sigma = u(0.0, 8.0), u(0.5, 0.9), u(-4.0, 4.0), u(-0.5, 0.5)
    mix = Mixture.two_component(sep, weight, 0 * sep, torch.ones_like(sep))
    theta = torch.stack([mu, log_sigma], -1)
    alpha = torch.full((batch,), a, dtype=torch.float64)
    return Objective.build(DIVERGENCES["alpha"], Quadrature(), mix, theta, alpha=alpha), theta


def medians(fns: dict, steps: int, warm: int = 2) -> dict:
    """Median seconds a call of each of ``fns``, called in turn (so they share the machine's noise)."""
    times = {k: [] for k in fns}
    for i in range(warm + steps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if i >= warm:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def on(path, fn):
    """``fn`` on the torch path (EAGER) or the kernel's (NATIVE)."""
    return lambda: (setattr(Objective, "_native_pointwise", path), fn())[1]


def timed(fn, *args) -> tuple:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def paths(obj: Objective, theta: torch.Tensor) -> dict:
    step = lambda: obj.derivatives(theta, hessian=True)
    return {"eager": on(EAGER, step), "native": on(NATIVE, step)}


def rel_err(out, ref) -> float:
    ok = torch.isfinite(ref[0])
    return max(((o - r)[ok].abs() / (1 + r[ok].abs())).max().item() for o, r in zip(out, ref))


def compile_worker(args) -> dict:
    """One order under torch.compile, in this (fresh) process; returns what it measured."""
    from torch._dynamo.utils import counters

    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    warnings.filterwarnings("ignore")
    Objective._native_pointwise = EAGER
    obj, theta = make(args.worker, args.batch, args.seed)
    step = torch.compile(lambda o, th: o._pointwise_derivatives(th, True), mode=args.mode)
    graphs = lambda: counters["stats"]["unique_graphs"]
    try:
        (out, first), *later = [timed(step, obj, theta) for _ in range(3)]
        m = medians({"steady": on(EAGER, lambda: step(obj, theta)), **paths(obj, theta)}, args.steps, 0)
        Objective._native_pointwise = EAGER
        n_graphs, breaks = graphs(), {k.splitlines()[0]: v for k, v in counters["graph_break"].items()}
        resized = []
        for n in (args.batch // 2, args.batch // 4):
            before = graphs()
            resized.append((n, timed(step, obj.subset(torch.arange(n)), theta[:n])[1], graphs() - before))
    except Exception as e:  # report, do not hide, a failure to compile
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"}
    err = rel_err(out, obj._pointwise_derivatives(theta, True))
    done = dict(first=first, compile=first + sum(s for _, s in later) - 3 * m["steady"], graphs=n_graphs, **m)
    return done | dict(breaks=breaks, resized=resized, err=err)


def run_worker(args, a: float, cache: str) -> dict:
    opts = {"worker": a, "mode": args.mode, "batch": args.batch, "steps": args.steps}
    opts |= {"threads": args.threads, "seed": args.seed}
    cmd = [sys.executable, os.path.abspath(__file__), *(f"--{k}={v}" for k, v in opts.items())]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker exited {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def load_numba(path: str):
    sys.path.append(path)  # after the environment's own site-packages
    try:
        import numba
    except ImportError:
        return None
    return numba


def numba_sums(numba):
    """The per-node alpha terms (core.alpha.alpha_fit_terms) and the node sums, row by row."""

    jit = numba.njit(cache=False, parallel=False, error_model="numpy")

    @jit
    def rel_expm1(y):
        return 1.0 if y == 0.0 else math.expm1(y) / y

    @jit
    def mirrored(p, delta, tilted, a):  # (p - T)/(1 - a), for a > 1/2
        y = -(1.0 - a) * delta
        return p * delta * rel_expm1(y) if abs(y) < 0.5 else (p - tilted) / (1.0 - a)

    @jit
    def sums(z, rule, log_p, log_q, a, out):
        for r in range(z.shape[0]):
            acc = out[r]
            acc[:] = 0.0
            for i in range(z.shape[1]):
                lp, lq, zi, w = log_p[r, i], log_q[r, i], z[r, i], rule[r, i]
                delta, q, p = lp - lq, math.exp(lq), math.exp(lp)
                y = a * delta
                tilted = math.exp(lq + y)
                t1 = -q * delta * rel_expm1(y) if abs(y) < 0.5 else (q - tilted) / a
                t2 = tilted + t1
                t0 = (p - q + t1) / (1.0 - a) if a <= 0.5 else (q - p + mirrored(p, delta, tilted, a)) / a
                zz, zz1 = zi * zi, zi * zi - 1.0
                if w > 0.0:  # zero-width panels left out, as core.alpha.integral_over_nodes
                    acc[0] += w * t0
                acc[1] += w * t1
                acc[2] += w * t1 * zi
                acc[3] += w * t1 * zz
                acc[4] += w * t2 * zz
                acc[5] += w * t2 * zi * zz1
                acc[6] += w * t2 * zz1 * zz1

    return sums


def nodes(obj: Objective, theta: torch.Tensor):
    """(z, rule, log p, log q, a [B, 1]) as the torch path builds them."""
    div, mu, log_sigma = obj.divergence, theta[:, 0], theta[:, 1]
    a = div.orders(obj.alpha, theta.shape[0])
    extra = div.panel_points(obj.mixture, mu, log_sigma, a)
    z, rule = obj.estimator.standard_rule(obj.mixture, mu, log_sigma, div.nodes_cover, extra)
    log_q = (-0.5 * LOG_2PI - log_sigma).unsqueeze(-1) - 0.5 * z * z
    return z, rule, obj.mixture.log_prob_standard(z, mu, torch.exp(log_sigma)), log_q, a.unsqueeze(-1)


def torch_sums(z, rule, log_p, log_q, ak):
    t0, t1, t2 = DIVERGENCES["alpha"].fit_terms(log_p, log_q, ak)
    zz = z * z
    zz1 = zz - 1.0
    a_, b = rule * t1, rule * t2
    loss = torch.where(rule > 0, rule * t0, 0.0).sum(-1)
    parts = [a_, a_ * z, a_ * zz, b * zz, b * z * zz1, b * zz1 * zz1]
    return torch.stack([loss, *(p.sum(-1) for p in parts)], -1)


def numba_candidate(numba, obj: Objective, theta: torch.Tensor) -> tuple:
    """(numba's call, torch's call of the same part, numba's first call in s, rel err)."""
    z, rule, log_p, log_q, ak = nodes(obj, theta)
    arrays = [t.contiguous().numpy() for t in (z, rule, log_p, log_q)]
    out = torch.empty(theta.shape[0], 7, dtype=torch.float64)
    kernel, a = numba_sums(numba), float(ak[0])
    run = lambda: kernel(*arrays, a, out.numpy())
    first = timed(run)[1]
    err = rel_err(out.T, torch_sums(z, rule, log_p, log_q, ak).T)  # rows of finite loss
    return run, lambda: torch_sums(z, rule, log_p, log_q, ak), first, err


def measure_order(args, a: float, numba, calls: float) -> None:
    obj, theta = make(a, args.batch, args.seed)
    fns = paths(obj, theta)
    ref, n_nodes = fns["eager"](), nodes(obj, theta)[0].shape[1]
    err_native = rel_err(fns["native"](), ref)
    if numba is not None:
        run, torch_part, first, err_nb = numba_candidate(numba, obj, theta)
        fns |= {"numba": run, "part": torch_part}
    t = medians(fns, args.steps)
    finite = int(torch.isfinite(ref[0]).sum())
    print(f"\n== a = {a:g}: {n_nodes} nodes a row, {finite}/{args.batch} rows finite")
    rows = [("eager torch", 0.0, t["eager"], 0.0, t), ("native C kernel", 0.0, t["native"], err_native, t)]
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        results = {"cold": run_worker(args, a, cache), "warm": run_worker(args, a, cache)}
    for name, r in results.items():
        if "error" in r:
            print(f"  torch.compile ({name} cache): FAILED: {r['error']}")
            continue
        resized = ", ".join(f"at B={n}: {s:.2f} s, {g} new graphs" for n, s, g in r["resized"])
        print(f"  torch.compile ({name} cache): first call {r['first']:.1f} s, compile {r['compile']:.1f} s")
        print(f"    {r['graphs']} graphs at B; then {resized}")
        rows.append((f"torch.compile {name}", r["compile"] + r["resized"][0][1], r["steady"], r["err"], r))
        if name == "cold":
            print(f"    {sum(r['breaks'].values())} graph breaks at B:")
            print("".join(f"      {n}x {k}\n" for k, n in r["breaks"].items()), end="")
    if numba is None:
        print(f"  numba: not importable (not installed, nor in {args.numba_path}): skipped")
    else:
        nb, part, jit = t["numba"], t["part"], first - t["numba"]
        speed = f"{nb * 1e3:.2f} ms, torch's {part * 1e3:.2f} ms ({part / nb:.1f}x)"
        print(f"  numba {numba.__version__}: terms + sums {speed}; JIT {jit:.2f} s")
        rows.append(("numba (terms+sums)", jit, max(t["eager"] - part, 0.0) + nb, err_nb, t))
    print(f"  {'candidate':<20}" + "".join(f"{h:>10}" for h in HEADER))
    for name, once, s, err, ref in rows:
        cells = (once, s * 1e3, ref["eager"] / s, ref["native"] / s, once + calls * s)
        print(f"  {name:<20}" + "".join(f"{c:>10.2f}" for c in cells) + f"{err:>10.0e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1632)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--numba-path", default="/tmp/numba_pkg")
    parser.add_argument("--worker", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        print(json.dumps(compile_worker(args)))
        return
    numba = load_numba(args.numba_path)
    calls = CONFIGS * STEPS_PER_ROW / args.batch
    print(
        f"B = {args.batch}, {args.threads} thread(s), median of {args.steps} calls, torch {torch.__version__}"
    )
    print(f"compile mode {args.mode!r}; a sweep: {CONFIGS} x {STEPS_PER_ROW} / B = {calls:.0f} calls")
    for a in ORDERS:
        measure_order(args, a, numba, calls)
    Objective._native_pointwise = NATIVE
    print("\none-off: compile time (torch.compile: plus its recompile at B // 2, which a fit meets as rows")
    print("leave; numba: JIT); x eager / x native: speed per call relative to them (> 1: faster), timed")
    print("in turn with them in the same process (torch.compile: in its worker);")
    print("sweep s: one-off + calls * ms/call; rel err: max |d|/(1+|ref|) against eager on finite rows")
    print("(numba: against the same torch part, terms + sums).")


if __name__ == "__main__":
    main()
