"""Memory and time of a sweep and of its analysis as the table grows: out of core (issue 24).

Each command runs in a fresh process; its peak RSS is that of the largest process it ran (the
sweeper, a joblib shard, or the analysis: the kernel's rusage of the children waited for), and
its wall time includes start-up. Figures are printed against the 10^6 run of the same call.

1. The sweep, ``python -m kl_sweep -m`` the study mix (both divergences, separation 0-10,
   weight 0.5-0.95, init_mu -5..5) at 10^4 (the default launcher: start-up), 10^6 and 10^7
   configurations (``hydra/launcher=joblib``, one single-threaded shard per core).
   Targets: peak RSS <= 2 GiB, flat within 0.3 GiB from 10^6 to 10^7; wall time linear.
2. ``python -m analysis`` on the 10^6 table, and on 10^7 and 10^8 rows made from it by
   replication: copy k of every row is the same fit translated by k * 100 (``center``,
   ``init_mu``, ``mu`` and ``mean`` shifted alike; the problem is translation invariant, so each
   copy is the exact fit of its own configuration) under a new config_hash and job_num. Targets:
   peak RSS <= 2 GiB at every size; wall time linear in the rows.
3. The README's DuckDB summary query on each 10^7-row table: wall time.

    python benchmarks/out_of_core.py [--sweeps 4 6 7] [--analyses 6 7 8] [--keep DIR]

(``--sweeps``/``--analyses``: powers of ten; the analyses need the 10^6 sweep.)
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

#: The README's summary query (``{table}``: the results file).
QUERY = (
    "SELECT divergence, status, count(*) AS fits, max(grad_norm) AS worst_grad "
    "FROM read_parquet('{table}') GROUP BY ALL ORDER BY ALL"
)


def grid(power: int) -> list[str]:
    """The study mix at 10^power configurations (10^4 to 10^7): separations x 10 weights x 50
    starts x 2 divergences."""
    separations = 10 ** (power - 3)
    step = f"{10 / separations:g}"
    return [
        f"separation=range(0,10,{step})",
        "weight=range(0.5,1,0.05)",
        "init_mu=range(-5,5,0.2)",
        "divergence=forward,reverse",
    ]


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) of ``cmd`` and everything it ran, in a fresh process, and
    what it printed."""
    # Run through a small wrapper so that the peak is this command's alone, not that of earlier ones.
    wrapper = (
        "import resource, subprocess, sys; "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); "
        "sys.exit(rc)"
    )
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]), proc.stdout + proc.stderr


#: The log lines that say each process's own peak memory.
PEAKS = {
    "shards": r"thread\(s\), ",
    "the sweeper's process (planning, dealing)": r"\d s, ",
    "assembling (a process of its own above 10^6 rows)": r"own: .*",
}


def sweep(power: int, sweep_dir: Path) -> tuple[float, int, int, dict[str, float]]:
    """Wall seconds, peak RSS, rows, and the peaks (GiB) that the shards, the sweeper's process and
    the assembly log."""
    cmd = [sys.executable, "-m", "kl_sweep", "-m", *grid(power)]
    if power > 4:
        cmd += ["hydra/launcher=joblib", f"hydra.sweeper.shards={available_cores()}"]
    wall, rss, said = measure([*cmd, f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.latest_link=null"])
    peaks = {
        what: max([float(x) for x in re.findall(pattern + r"peak memory ([\d.]+) GiB", said)], default=0.0)
        for what, pattern in PEAKS.items()
    }
    return wall, rss, rows_in(sweep_dir / "results.parquet"), peaks


def available_cores() -> int:
    from kl_sweep.threads import available_cores

    return available_cores()


def rows_in(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def replicate(source: Path, copies: int, target: Path) -> int:
    """``target/results.parquet``: ``copies`` translated copies of every row of ``source``."""
    from kl_sweep.collect import connect

    target.mkdir(parents=True, exist_ok=True)
    n = rows_in(source)
    shift = "(k * 100.0)"
    sql = f"""
        COPY (
            SELECT * REPLACE (
                center + {shift} AS center,
                init_mu + {shift} AS init_mu,
                mu + {shift} AS mu,
                list_transform(mean, x -> x + {shift}) AS mean,
                printf('%02x', k) || config_hash[3:] AS config_hash,
                job_num + k * {n} AS job_num
            )
            FROM read_parquet('{source}'), range({copies}) AS r(k)
        ) TO '{target / "results.parquet"}' (FORMAT parquet)
    """
    with connect(target / ".spill") as con:
        con.execute(sql)
    shutil.rmtree(target / ".spill", ignore_errors=True)
    return rows_in(target / "results.parquet")


def analysis(sweep_dir: Path) -> tuple[float, int]:
    wall, rss, _ = measure([sys.executable, "-m", "analysis", str(sweep_dir)])
    return wall, rss


def duckdb_query(table: Path) -> float:
    import duckdb

    tic = time.perf_counter()
    duckdb.sql(QUERY.format(table=table)).fetchall()
    return time.perf_counter() - tic


def say_query(table: Path) -> None:
    seconds = duckdb_query(table)
    print(f"duckdb   : the README's summary query on {rows_in(table):,} rows in {seconds:.2f} s", flush=True)


def line(what: str, rows: int, wall: float, rss: int, base: tuple[int, float, int] | None) -> str:
    text = (
        f"{what:<9}: {rows:>11,} rows  {wall:7.1f} s  {wall / rows * 1e6:6.1f} us/row  "
        f"peak RSS {rss / GiB:5.2f} GiB"
    )
    if base is not None and base[0] != rows:
        n0, wall0, rss0 = base
        text += (
            f"  | against 10^6: time/row x{(wall / rows) / (wall0 / n0):.2f}, "
            f"RSS {'+' if rss >= rss0 else '-'}{abs(rss - rss0) / GiB:.2f} GiB"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", type=int, nargs="*", default=[4, 6, 7])
    parser.add_argument("--analyses", type=int, nargs="*", default=[6, 7, 8])
    parser.add_argument("--keep", type=Path, default=None, help="keep the sweeps here (default: a temp dir)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="kl_sweep-ooc-"))
    try:
        base = None
        for power in sorted(set(args.sweeps) | ({6} if args.analyses else set())):
            wall, rss, rows, peaks = sweep(power, work / f"sweep{power}")
            base = (rows, wall, rss) if power == 6 else base
            target = "  (targets: <= 2 GiB, flat within 0.3 GiB of 10^6)" if power >= 6 else ""
            print(line("sweep", rows, wall, rss, base if power > 6 else None) + target, flush=True)
            print("           own peaks: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in peaks.items() if v))
            if power == 7:
                say_query(work / "sweep7" / "results.parquet")
        base = None
        for power in sorted(args.analyses):
            sweep_dir = work / f"sweep{power}" if power == 6 else work / f"copies{power}"
            if power > 6:
                replicate(work / "sweep6" / "results.parquet", 10 ** (power - 6), sweep_dir)
            wall, rss = analysis(sweep_dir)
            rows = rows_in(sweep_dir / "results.parquet")
            base = (rows, wall, rss) if power == 6 else base
            note = "  (replicated)" if power > 6 else ""
            print(line("analysis", rows, wall, rss, base) + note + "  (target: <= 2 GiB)", flush=True)
            if power == 7:
                seconds = duckdb_query(sweep_dir / "results.parquet")
                print(
                    f"duckdb   : the README's summary query on {rows:,} rows in {seconds:.2f} s", flush=True
                )
            if power > 7:
                shutil.rmtree(sweep_dir, ignore_errors=True)  # 3.5 GB
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.pop("HYDRA_FULL_ERROR", None)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
