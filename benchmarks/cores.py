"""Every core: one shard with one thread, one shard with all threads, and joblib shards side by side.

The same sweep (both divergences, 1,020,000 configurations by default: the scale where cores pay;
the fits are fast enough that smaller sweeps are dominated by the fixed start-up, the workers'
start and the assembly) through the command line three ways:

a. one shard, ``OMP_NUM_THREADS=1`` (the baseline: one core);
b. one shard with every core this process may use (the default);
c. ``hydra/launcher=joblib hydra.sweeper.shards=N`` with N the number of cores: the sweeper gives
   each shard its share of the cores (``kl_sweep.threads``), so the shards do not oversubscribe.

Targets on 2 cores, read at the default size: c at least 1.6x faster than a, and not slower
than b. Each mode is run
``--repeats`` times, interleaved (a, b, c, a, b, c, ...) so that drift of a shared machine hits all
three alike; medians and the ratios of medians are printed.

    python benchmarks/cores.py [--repeats 1] [--init-mu-step 0.004]

``--init-mu-step 0.01`` makes it 408,000 configurations, about where c/a reaches 1.6x;
``--init-mu-step 0.025`` makes it 163,200 (about 10 s a run): there the fixed start-up and
assembly, about 2.5-4 s in every mode (most of it ``import torch``), hold the wall ratios well
below the fit phase's (c/a near 1.4-1.5x).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kl_sweep.threads import thread_budget  # noqa: E402

#: 80 separations x 3 weights x starts x 2 divergences (2,125 starts: 1,020,000 configurations).
GRID = ["separation=range(0,8,0.1)", "weight=0.5,0.75,0.9", "divergence=forward,reverse"]


def init_mu(step: float) -> str:
    return f"init_mu=range(-4.25,4.25,{step})"


#: The fit phase's own line (kl_sweep.sweep.Progress.close), one per shard.
FITTED = re.compile(r"fitted (\d+) configurations in ([0-9.]+) s")


def run(mode: str, directory: Path, cores: int, grid: list[str]) -> tuple[float, float]:
    """(wall seconds of the whole command, configurations per second of its fit phase)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    extra: list[str] = []
    if mode == "a":
        env["OMP_NUM_THREADS"] = "1"
    elif mode == "c":
        extra = ["hydra/launcher=joblib", f"hydra.sweeper.shards={cores}"]
    # Untimed: torch's libraries back into the page cache, which a shared machine drops now and then
    # (a cold `import torch` took 10.7 s against 2.0 s warm, and put single runs off by 2x).
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    tic = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kl_sweep",
            "-m",
            *grid,
            *extra,
            f"hydra.sweep.dir={directory}",
            "hydra.sweeper.latest_link=null",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - tic
    if done.returncode:
        raise SystemExit(f"mode {mode} failed:\n{done.stderr[-2000:]}")
    fitted = [(int(n), float(t)) for n, t in FITTED.findall(done.stderr + done.stdout)]
    # Shards fit side by side: the phase lasts as long as the slowest one.
    rate = sum(n for n, _ in fitted) / max(t for _, t in fitted)
    return seconds, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--init-mu-step", type=float, default=0.004, help="spacing of the starts")
    args = parser.parse_args()
    cores = thread_budget()
    grid = [*GRID, init_mu(args.init_mu_step)]
    size = 80 * 3 * 2 * len(range(0, round(8.5 / args.init_mu_step)))
    walls: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    rates: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in walls:  # interleaved
                wall, rate = run(mode, Path(tmp) / f"{mode}{r}", cores, grid)
                walls[mode].append(round(wall, 1))
                rates[mode].append(round(rate))
    wall = {m: statistics.median(t) for m, t in walls.items()}
    rate = {m: statistics.median(t) for m, t in rates.items()}
    names = {"a": "one shard, 1 thread", "b": f"one shard, {cores} threads", "c": f"{cores} joblib shards"}
    print(f"{size:,} configurations through the CLI on {cores} core(s), median of {args.repeats}")
    print(f"{'':26s} {'wall (s)':>9s} {'fit phase (cfg/s)':>18s}")
    for m, name in names.items():
        print(f"  {m}. {name:22s} {wall[m]:9.1f} {rate[m]:18.0f}   walls {walls[m]} rates {rates[m]}")
    print(
        f"  c against a: {wall['a'] / wall['c']:.2f}x wall, {rate['c'] / rate['a']:.2f}x fit phase "
        "(target >= 1.6x)"
    )
    print(
        f"  c against b: {wall['b'] / wall['c']:.2f}x wall, {rate['c'] / rate['b']:.2f}x fit phase "
        "(target >= 1.0)"
    )


if __name__ == "__main__":
    main()
