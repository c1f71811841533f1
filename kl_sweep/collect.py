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

from kl_sweep.io import arrow_lists, write_parquet
from kl_sweep.version import COLUMN as VERSION_COLUMN
from kl_sweep.version import UNKNOWN as UNKNOWN_VERSION

RESULTS = "results.parquet"
PARTS = "parts"


#: Columns every results file has; a Parquet file without them is not a kl_sweep results table.
REQUIRED_COLUMNS = ("config_hash", "divergence", "mu", "sigma2", "loss")
#: Where the sweeper moves damaged or foreign files (never deletes them).
DAMAGED = "damaged"
#: Where the sweeper moves files of rows fitted by another numerics version it fits again.
SUPERSEDED = "superseded"


class NoResultsError(ValueError):
    pass


class DamagedFileError(ValueError):
    """A file where results belong that is not a readable kl_sweep results table."""

    def __init__(self, path: Path, problem: str, hint: str = "") -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"kl_sweep: damaged results file {path}: {problem}" + (f"; {hint}" if hint else ""))


def first_line(ex: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(ex).strip()
    return text.splitlines()[0] if text else type(ex).__name__


def read_results_file(path: Path) -> pa.Table:
    """The whole table in ``path``; raises :class:`DamagedFileError` when it is damaged or foreign.

    Reading every column (not only the footer) catches truncated copies and broken pages. A file
    that vanishes meanwhile raises ``FileNotFoundError`` as usual.
    """
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as ex:
        raise DamagedFileError(path, f"not a readable Parquet file ({first_line(ex)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DamagedFileError(path, f"not a kl_sweep results table (no column {', '.join(missing)})")
    schema = table.schema
    wrong = [
        f"{name} is {schema.field(name).type}"
        for name, ok in _COLUMN_TYPES.items()
        if name in schema.names and not ok(schema.field(name).type)
    ]
    if wrong and table.num_rows:  # an empty table's column types carry nothing
        raise DamagedFileError(path, f"not a kl_sweep results table ({', '.join(wrong)})")
    if table.column("config_hash").null_count:
        raise DamagedFileError(path, "rows without a config_hash")
    return table


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


#: The Arrow types the required columns must have.
_COLUMN_TYPES = {
    "config_hash": _is_text,
    "divergence": _is_text,
    "mu": pa.types.is_floating,
    "sigma2": pa.types.is_floating,
    "loss": pa.types.is_floating,
}


def result_files(sweep_dir: Path) -> list[tuple[Path, int | None]]:
    """Every file holding results in ``sweep_dir``, with the job number its folder gives (if any)."""
    files: list[tuple[Path, int | None]] = []
    if (sweep_dir / RESULTS).is_file():
        files.append((sweep_dir / RESULTS, None))
    files += [(p, None) for p in sorted((sweep_dir / PARTS).glob("*.parquet")) if p.is_file()]
    for p in sorted(sweep_dir.glob(f"*/{RESULTS}")):
        job = p.parent.name
        if p.is_file() and job not in (DAMAGED, SUPERSEDED):
            files.append((p, int(job) if job.isdigit() else None))
    return files


def read_sweep(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep's table: one row per configuration (first occurrence of each ``config_hash``).

    Raises :class:`DamagedFileError` (one line: the file, what is wrong, what to do) when any
    results file is damaged or foreign: a table without that file's rows would look complete.
    List columns (``mean``, ``cov``) hold an array per row, as ``pandas.read_parquet`` gives them;
    the assembly itself keeps them in Arrow.
    """
    frame = _read_sweep(Path(sweep_dir))[0]
    for name, dtype in frame.dtypes.items():
        if isinstance(dtype, pd.ArrowDtype):
            arrays = frame[name].array.__arrow_array__().to_numpy(zero_copy_only=False)
            frame[name] = pd.Series(arrays, dtype=object, index=frame.index)
    return frame


def _read_sweep(sweep_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """The sweep's table and the files it was read from."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"kl_sweep: no sweep directory at {sweep_dir}")
    files = result_files(sweep_dir)
    if not files:
        raise NoResultsError(
            f"kl_sweep: no results in {sweep_dir}: expected {RESULTS}, {PARTS}/*.parquet or */{RESULTS}"
        )
    tables = []
    for path, job in files:
        try:
            table = read_results_file(path)
        except DamagedFileError as ex:
            hint = (
                f"move it out of {sweep_dir} (rerunning the kl_sweep sweep moves it to "
                f"{sweep_dir / DAMAGED} and fits its configurations again)"
            )
            raise DamagedFileError(ex.path, ex.problem, hint) from None
        if job is not None and "job_num" not in table.column_names:
            table = table.append_column("job_num", pa.array([job] * table.num_rows, pa.int64()))
        if "sweep_id" not in table.column_names:
            table = table.append_column("sweep_id", pa.array([sweep_dir.name] * table.num_rows, pa.string()))
        tables.append(table)
    frame = pa.concat_tables(tables, promote_options="default").to_pandas(types_mapper=arrow_lists)
    frame = frame.drop_duplicates("config_hash", keep="first")
    if VERSION_COLUMN in frame.columns:  # rows from before the column existed
        frame[VERSION_COLUMN] = frame[VERSION_COLUMN].fillna(UNKNOWN_VERSION)
    if "job_num" in frame.columns:
        frame = frame.sort_values("job_num", kind="stable")
    return frame.reset_index(drop=True), [path for path, _ in files]


def assemble(sweep_dir: str | Path) -> Path:
    """Write the assembled table to ``SWEEP_DIR/results.parquet``, then drop the part files.

    The table is written (atomically) before any part is removed, so a kill in between leaves
    rows in both places and the next assembly deduplicates them.
    """
    sweep_dir = Path(sweep_dir)
    frame, read = _read_sweep(sweep_dir)
    path = write_parquet(frame, sweep_dir / RESULTS)
    parts = sweep_dir / PARTS
    for part in read:  # only the parts read: one written meanwhile is not in the table yet
        if part.parent == parts:
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
    except (FileNotFoundError, NoResultsError, DamagedFileError) as ex:
        print(ex, file=sys.stderr)
        return 2
    print(f"{len(pd.read_parquet(path, columns=['config_hash']))} rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
