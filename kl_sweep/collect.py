"""Assemble any sweep layout into one results table.

Layouts, all under one SWEEP_DIR:

- ``results.parquet``: the table the kl_sweep sweeper writes at the end of a sweep;
- ``parts/*.parquet``: the chunks it writes while running (all that is left of a killed sweep);
- ``<job>/results.parquet``: one row per job folder, from Hydra's basic sweeper or optuna.

``python -m kl_sweep.collect SWEEP_DIR`` writes the assembled ``SWEEP_DIR/results.parquet``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kl_sweep.io import write_parquet

RESULTS = "results.parquet"
PARTS = "parts"


class NoResultsError(ValueError):
    pass


def result_files(sweep_dir: Path) -> list[tuple[Path, int | None]]:
    """Every file holding results in ``sweep_dir``, with the job number its folder gives (if any)."""
    files: list[tuple[Path, int | None]] = []
    if (sweep_dir / RESULTS).is_file():
        files.append((sweep_dir / RESULTS, None))
    files += [(p, None) for p in sorted((sweep_dir / PARTS).glob("*.parquet"))]
    for p in sorted(sweep_dir.glob(f"*/{RESULTS}")):
        job = p.parent.name
        files.append((p, int(job) if job.isdigit() else None))
    return files


def read_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep's table: one row per configuration (first occurrence of each ``config_hash``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"kl_sweep: no sweep directory at {sweep_dir}")
    files = result_files(sweep_dir)
    if not files:
        raise NoResultsError(
            f"kl_sweep: no results in {sweep_dir}: expected {RESULTS}, {PARTS}/*.parquet or */{RESULTS}"
        )
    tables = []
    for path, job in files:
        table = pq.read_table(path)
        if job is not None and "job_num" not in table.column_names:
            table = table.append_column("job_num", pa.array([job] * table.num_rows, pa.int64()))
        if "sweep_id" not in table.column_names:
            table = table.append_column("sweep_id", pa.array([sweep_dir.name] * table.num_rows, pa.string()))
        tables.append(table)
    frame = pa.concat_tables(tables, promote_options="default").to_pandas()
    frame = frame.drop_duplicates("config_hash", keep="first")
    if "job_num" in frame.columns:
        frame = frame.sort_values("job_num", kind="stable")
    return frame.reset_index(drop=True)


def assemble(sweep_dir: str | Path) -> Path:
    """Write the assembled table to ``SWEEP_DIR/results.parquet``, then drop the part files.

    The table is written (atomically) before any part is removed, so a kill in between leaves
    rows in both places and the next assembly deduplicates them.
    """
    sweep_dir = Path(sweep_dir)
    path = write_parquet(read_sweep(sweep_dir), sweep_dir / RESULTS)
    parts = sweep_dir / PARTS
    for part in parts.glob("*.parquet"):
        part.unlink(missing_ok=True)
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kl_sweep.collect", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        path = assemble(args.sweep_dir)
    except (FileNotFoundError, NoResultsError) as ex:
        print(ex, file=sys.stderr)
        return 2
    print(f"{len(pd.read_parquet(path, columns=['config_hash']))} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
