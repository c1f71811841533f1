"""Small pages: a sweep's planning and assembly at a million configurations, with and without
:func:`kl_sweep.allocator.small_pages`, each in a fresh process.

The parent writes, untimed, a sweep directory of part files: 1,020,000 rows of the study grid
(``benchmarks/cores.py``'s) in the chunks of 8,192 rows that two shards write. Each child times,
in a fresh process,

- **plan**: the grid's product, its typed rows and their config hashes, as the sweeper plans
  (:func:`kl_sweep.sweep.product`, :func:`kl_sweep.rows.rows_frame`,
  :func:`kl_sweep.rows.config_hash_values`);
- **assemble**: the table read from the parts (:func:`kl_sweep.collect.read_sweep`) and written
  as one Parquet file, as the sweeper assembles;

after calling ``small_pages()`` or not. The two modes are interleaved ``--repeats`` times; medians,
system time and the ratio default / small are printed. Where the kernel compacts memory for huge
pages on their first touch (``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``), the
default mode spends seconds of system time in it.

    python benchmarks/pages.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 8192


def grid() -> dict[str, list]:
    """The study grid of benchmarks/cores.py: 80 separations, 3 weights, 2 divergences, 2,125 starts."""
    return {
        "separation": [round(0.1 * i, 10) for i in range(80)],
        "weight": [0.5, 0.75, 0.9],
        "divergence": ["forward", "reverse"],
        "init_mu": [round(-4.25 + 0.004 * i, 10) for i in range(2125)],
    }


def plan():
    """The typed rows and config hashes of the grid, one group per divergence, as the sweeper plans."""
    import numpy as np
    import pandas as pd

    from kl_sweep.rows import config_hash_values, rows_frame
    from kl_sweep.sweep import product

    frame = product(grid())
    frame["job_num"] = np.arange(len(frame))
    parts = []
    for name, rows in frame.groupby("divergence", sort=True):
        columns = {k: rows[k].to_numpy() for k in ("separation", "weight", "init_mu")}
        defaults = {"center": 0.0, "component_var": 1.0, "init_sigma2": 1.0, "optimizer.lr": 0.05}
        typed = rows_frame({**columns, **defaults, "optimizer.max_steps": 20000, "optimizer.tol": 1e-8})
        typed["job_num"] = rows["job_num"].to_numpy()
        typed["hash"] = config_hash_values(typed, {"divergence.name": name})
        parts.append(typed)
    table = pd.concat(parts, ignore_index=True).sort_values("job_num", kind="stable")
    return table[~table["hash"].duplicated()].reset_index(drop=True)


def write_parts(sweep_dir: Path) -> int:
    """Part files of result rows for the plan, dealt to two shards in blocks of 16 (untimed)."""
    import numpy as np

    from kl_sweep.io import write_parquet
    from kl_sweep.rows import hash_text

    rows = plan()
    n = len(rows)
    results = rows.rename(columns={"divergence.alpha": "alpha", "optimizer.lr": "lr"})
    results = results.assign(
        divergence=np.where(np.arange(n) % 2, "reverse", "forward"),
        estimator="quadrature",
        optimizer="adam",
        mu=rows["init_mu"] / 2,
        sigma2=1.5,
        loss=0.25,
        kl_forward=0.25,
        kl_reverse=0.5,
        grad_norm=1e-9,
        steps=300,
        converged=True,
        on_boundary=False,
        status="converged",
        config_hash=hash_text(rows["hash"].to_numpy()),
        numerics_version="benchmark",
        fit_seconds=1e-5,
        sweep_id="benchmark",
    ).drop(columns=["hash", "group"], errors="ignore")
    owner = np.random.default_rng(0).integers(0, 2, (n + 15) // 16).repeat(16)[:n]
    for shard in (0, 1):
        mine = results[owner == shard]
        for start in range(0, len(mine), CHUNK):
            chunk = mine.iloc[start : start + CHUNK]
            first, last = chunk["job_num"].iloc[0], chunk["job_num"].iloc[-1]
            write_parquet(chunk, sweep_dir / "parts" / f"part-{first:012d}-{last:012d}-{len(chunk)}.parquet")
    return n


def child(mode: str, sweep_dir: Path) -> None:
    if mode == "small":
        from kl_sweep.allocator import small_pages

        small_pages()
    from kl_sweep.collect import read_sweep
    from kl_sweep.io import write_parquet

    out = {}
    for phase, work in [
        ("plan", plan),
        ("assemble", lambda: write_parquet(read_sweep(sweep_dir), sweep_dir / "out" / "results.parquet")),
    ]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        tic = time.perf_counter()
        work()
        after = resource.getrusage(resource.RUSAGE_SELF)
        out[phase] = (time.perf_counter() - tic, after.ru_stime - before.ru_stime)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=["default", "small"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.dir)
    with tempfile.TemporaryDirectory() as tmp:
        n = write_parts(Path(tmp))
        times: dict[str, dict[str, list]] = {m: {"plan": [], "assemble": []} for m in ("default", "small")}
        for _ in range(args.repeats):
            for mode in times:  # interleaved
                cmd = [sys.executable, __file__, "--child", mode, "--dir", tmp]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                for phase, value in json.loads(done.stdout).items():
                    times[mode][phase].append(value)
    print(f"{n:,} configurations: planning and assembly in fresh processes, median of {args.repeats}")
    header = ["default (s)", "system", "small_pages (s)", "system", "ratio"]
    print(f"{'':10s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header, (12, 7, 16, 7, 6))))
    for phase in ("plan", "assemble"):
        (d, ds), (s, ss) = (tuple(statistics.median(x) for x in zip(*times[m][phase])) for m in times)
        print(f"{phase:10s} {d:12.2f} {ds:7.2f} {s:16.2f} {ss:7.2f} {d / s:5.2f}x")
    try:
        defrag = Path("/sys/kernel/mm/transparent_hugepage/defrag").read_text().strip()
    except OSError:
        defrag = "(not Linux)"
    print(f"transparent_hugepage/defrag: {defrag}")


if __name__ == "__main__":
    main()
