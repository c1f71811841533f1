"""Assemble any sweep layout into one results table.

Layouts, all under one SWEEP_DIR:

- ``results.parquet``: the table the kl_sweep sweeper writes at the end of a sweep;
- ``parts/*.parquet``: the chunks it writes while running (all that is left of a killed sweep);
- ``<job>/results.parquet``: one row per job folder, from Hydra's basic sweeper or optuna.

``python -m kl_sweep.collect SWEEP_DIR`` writes the assembled ``SWEEP_DIR/results.parquet``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kl_sweep.io import arrow_lists, write_batches
from kl_sweep.version import COLUMN as VERSION_COLUMN
from kl_sweep.version import UNKNOWN as UNKNOWN_VERSION

RESULTS = "results.parquet"
PARTS = "parts"
#: The memory DuckDB may take for one query; its sorts and windows spill to disk beyond it, so a
#: table of any size is deduplicated, ordered and written in bounded memory. Assembling 10^6 and
#: 10^7 rows peaked at 0.91 and 1.10 GB of RSS with 512 MB, at 0.99 and 1.56 GB with 1 GB.
DUCKDB_MEMORY = "512MB"
#: Rows per Arrow batch streamed out of DuckDB or a file.
BATCH_ROWS = 131_072
#: Job numbers whose rows an assembly sorts at a time (:meth:`Scan.job_ordered`).
WINDOW_JOBS = 1 << 20
#: Where DuckDB spills while it assembles a sweep's table (removed afterwards).
SPILL = ".spill"


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


def check_results_file(path: Path) -> pa.Schema:
    """The Arrow schema of the results file at ``path``, from its footer alone; raises
    :class:`DamagedFileError` when it is not a readable Parquet file (a truncated copy has no
    footer) or not a kl_sweep results table. Pages damaged inside are found when they are read
    (:func:`read_results_batches`, or the query of :func:`sweep_sql`)."""
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as ex:
        raise DamagedFileError(path, f"not a readable Parquet file ({first_line(ex)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise DamagedFileError(path, f"not a kl_sweep results table (no column {', '.join(missing)})")
    wrong = [
        f"{name} is {schema.field(name).type}"
        for name, ok in _COLUMN_TYPES.items()
        if name in schema.names and not ok(schema.field(name).type)
    ]
    if wrong and meta.num_rows:  # an empty table's column types carry nothing
        raise DamagedFileError(path, f"not a kl_sweep results table ({', '.join(wrong)})")
    return schema


def read_results_batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """``columns`` of the results file at ``path``, a batch at a time, after decoding every column
    of each row group (so a broken page anywhere is found); raises :class:`DamagedFileError`.

    Memory: a batch at a time, whatever the file's size.
    """
    check_results_file(path)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
            if batch.column("config_hash").null_count:
                raise DamagedFileError(path, "rows without a config_hash")
            yield batch.select(columns)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as ex:
        raise DamagedFileError(path, f"not a readable Parquet file ({first_line(ex)})") from None


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
    """The sweep's table in memory: one row per configuration (first occurrence of each ``config_hash``).

    For tables that fit in memory (tests, the notebook); :func:`sweep_sql` reads any size.
    Raises :class:`DamagedFileError` (one line: the file, what is wrong, what to do) when any
    results file is damaged or foreign: a table without that file's rows would look complete.
    List columns (``mean``, ``cov``) hold an array per row, as ``pandas.read_parquet`` gives them.
    """
    sweep_dir = Path(sweep_dir)
    scan = Scan.of(sweep_dir)
    with connect() as con:
        batches = [scan.cast(batch) for batch in scan.job_ordered(con)]
    table = pa.Table.from_batches(batches) if batches else scan.schema.empty_table()
    frame = table.to_pandas(types_mapper=arrow_lists)
    for name, dtype in frame.dtypes.items():
        if isinstance(dtype, pd.ArrowDtype):
            arrays = frame[name].array.__arrow_array__().to_numpy(zero_copy_only=False)
            frame[name] = pd.Series(arrays, dtype=object, index=frame.index)
    return frame


def connect(spill_dir: Path | None = None) -> Any:
    """A DuckDB connection whose queries use at most :data:`DUCKDB_MEMORY` and spill to
    ``spill_dir`` (default: the system's temporary folder) beyond it."""
    import duckdb

    if spill_dir is None:  # one folder a process: DuckDB's spill files are named per database only
        spill_dir = Path(tempfile.gettempdir()) / f"kl_sweep-duckdb-{os.getpid()}"
    spill = Path(spill_dir)
    config = {
        "memory_limit": DUCKDB_MEMORY,
        "temp_directory": str(spill),  # DuckDB removes it when the connection closes
        "preserve_insertion_order": False,
        "enable_object_cache": True,  # each window of an assembly reads the same files' footers
    }
    con = duckdb.connect(config=config)
    try:  # the sweep's own log says what is happening
        con.execute("SET enable_progress_bar = false")
    except duckdb.Error:  # in Jupyter without ipywidgets DuckDB refuses the setting: no bar there anyway
        pass
    return con


def sweep_sql(
    sweep_dir: str | Path,
    columns: list[str] | None = None,
    order_by: list[str] | None = None,
    rows: str | None = None,
) -> str:
    """A DuckDB SELECT of the sweep's table in any layout: one row per ``config_hash`` (its first
    occurrence: results.parquet first, then the parts in name order, then job folders), with
    ``sweep_id``, ``job_num`` and ``numerics_version`` filled in where a file lacks them.

    ``columns``: the columns to select (None: all); ``order_by``: the row order (None: job order,
    as :func:`assemble` writes it); ``rows``: a SQL condition on the files' columns that the rows
    kept meet (None: all rows). Run it on a :func:`connect` connection. Raises
    ``FileNotFoundError``, :class:`NoResultsError` or :class:`DamagedFileError` as
    :func:`read_sweep` does; a file damaged inside its pages fails the query itself.
    """
    return Scan.of(Path(sweep_dir)).sql(columns, order_by, rows=rows)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _name(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


@dataclass
class Scan:
    """The results files of a sweep directory, checked by their footers, and the table they make."""

    sweep_dir: Path
    files: list[tuple[Path, int | None]]
    schema: pa.Schema  # the assembled table's: every file's columns, then sweep_id and job_num
    present: frozenset[str]  # the columns at least one file has (the others are filled in)
    common: frozenset[str]  # the columns every file has
    _unique: bool | None = None

    @classmethod
    def of(cls, sweep_dir: Path) -> Scan:
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"kl_sweep: no sweep directory at {sweep_dir}")
        files = result_files(sweep_dir)
        if not files:
            raise NoResultsError(
                f"kl_sweep: no results in {sweep_dir}: expected {RESULTS}, {PARTS}/*.parquet or */{RESULTS}"
            )
        schemas = []
        for path, _ in files:
            try:
                schemas.append(check_results_file(path))
            except DamagedFileError as ex:
                hint = (
                    f"move it out of {sweep_dir} (rerunning the kl_sweep sweep moves it to "
                    f"{sweep_dir / DAMAGED} and fits its configurations again)"
                )
                raise DamagedFileError(ex.path, ex.problem, hint) from None
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        extra = [pa.field("sweep_id", pa.large_string())]
        if any(job is not None for _, job in files) or "job_num" in schema.names:
            extra.append(pa.field("job_num", pa.int64()))
        fields = [schema.field(n) for n in schema.names] + [f for f in extra if f.name not in schema.names]
        schema = pa.schema(fields, metadata=_pandas_metadata(schemas))
        present = frozenset(n for s in schemas for n in s.names)
        common = frozenset.intersection(*(frozenset(s.names) for s in schemas))
        return cls(sweep_dir, files, schema, present, common)

    def sql(
        self,
        columns: list[str] | None = None,
        order_by: list[str] | None = None,
        jobs: range | None = None,
        rows: str | None = None,
    ) -> str:
        """The deduplicated, ordered SELECT (see :func:`sweep_sql`); ``jobs``: only the rows whose
        job_num is in that range (the files' statistics skip the row groups of others); ``rows``:
        only the rows meeting that SQL condition."""
        selected = self.schema.names if columns is None else list(columns)
        unknown = [c for c in selected if c not in self.schema.names]
        if unknown:
            raise KeyError(f"kl_sweep: the results in {self.sweep_dir} have no column {', '.join(unknown)}")
        body = ", ".join(f"{self._expression(c)} AS {_name(c)}" for c in selected)
        conditions = [] if rows is None else [f"({rows})"]
        if jobs is not None:
            job = self._job()
            conditions.append(f"{job} >= {jobs.start} AND {job} < {jobs.stop}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        unique = (
            ""
            if self.unique()
            else " QUALIFY row_number() OVER (PARTITION BY config_hash ORDER BY _file, file_row_number) = 1"
        )
        if order_by is None:
            job = [self._expression("job_num")] if "job_num" in self.schema.names else []
            order = ", ".join([*job, "_file", "file_row_number"])
        else:
            order = ", ".join(self._expression(c) for c in order_by)
        return f"SELECT {body} FROM {self._source(where)}{unique} ORDER BY {order}"

    def _expression(self, column: str) -> str:
        """``column`` as the table has it: filled in where a file lacks it."""
        if column == "sweep_id":
            name = _quote(self.sweep_dir.name)
            return f"coalesce(sweep_id, {name})" if "sweep_id" in self.present else name
        if column == "job_num":
            return "coalesce(job_num, _job)" if "job_num" in self.present else "_job"
        if column == VERSION_COLUMN:
            return f"coalesce({VERSION_COLUMN}, {_quote(UNKNOWN_VERSION)})"
        return _name(column)

    def _job(self) -> str:
        """job_num to filter on: the column itself where every file has it (so the scan can skip
        row groups by their statistics), else as filled in."""
        return "job_num" if "job_num" in self.common else self._expression("job_num")

    def _source(self, where: str = "") -> str:
        """Every file's rows, with the file's place in the order (``_file``), the row's place in
        its file and the job number its folder gives (``_job``)."""
        paths = ", ".join(_quote(str(p)) for p, _ in self.files)
        known = ", ".join(
            f"({_quote(str(p))}, {i}, {'NULL' if job is None else job})"
            for i, (p, job) in enumerate(self.files)
        )
        return (
            f"(SELECT * FROM read_parquet([{paths}], filename = true, file_row_number = true, "
            f"union_by_name = true) JOIN (VALUES {known}) AS f(filename, _file, _job) USING (filename)"
            f"{where})"
        )

    def job_ordered(self, con: Any) -> Iterator[pa.RecordBatch]:
        """The whole table in job order (as :func:`assemble` writes it), a window of
        :data:`WINDOW_JOBS` job numbers at a time: each window's rows are read (the files'
        statistics skip the others), deduplicated and sorted alone, so the sort's memory does not
        grow with the table. One global query where windows cannot do it: a table without
        job_num, or a hash at two job numbers (rows of another sweep)."""
        if "job_num" not in self.schema.names or not self._duplicates_share_jobs():
            yield from _fetch(con, self.sql(), self.sweep_dir)
            return
        job = self._job()
        low, high = _query(con, f"SELECT min({job}), max({job}) FROM {self._source()}", self.sweep_dir)[0]
        for start in range(int(low), int(high) + 1, WINDOW_JOBS):
            yield from _fetch(con, self.sql(jobs=range(start, start + WINDOW_JOBS)), self.sweep_dir)

    def _duplicates_share_jobs(self) -> bool:
        """Whether every repeated config_hash repeats with one job_num (a shard run twice, a kill
        while assembling): then each window holds every copy of its hashes."""
        if self.unique():
            return True
        count = (
            f"SELECT count(*) FROM (SELECT config_hash FROM {self._source()} GROUP BY config_hash "
            f"HAVING count(DISTINCT {self._expression('job_num')}) > 1)"
        )
        return _query(None, count, self.sweep_dir)[0][0] == 0

    def unique(self) -> bool:
        """Whether every config_hash occurs once. One file is one table (an assembled
        results.parquet, or one part, holds each hash once); across files, a count of distinct
        hashes is checked first, since keeping each hash's first row costs three times the sort
        (10^7 rows: 2 s to count, 36 s more to deduplicate)."""
        if len(self.files) == 1:
            return True
        if self._unique is None:
            paths = ", ".join(_quote(str(p)) for p, _ in self.files)
            count = f"SELECT count(*) = count(DISTINCT config_hash) FROM read_parquet([{paths}])"
            self._unique = bool(_query(None, count, self.sweep_dir)[0][0])
        return self._unique

    def cast(self, table: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        """A batch from DuckDB in the table's own types (DuckDB gives plain strings and lists)."""
        schema = pa.schema([self.schema.field(n) for n in table.schema.names], metadata=self.schema.metadata)
        return table.cast(schema)


def _pandas_metadata(schemas: list[pa.Schema]) -> dict[bytes, bytes]:
    """pandas' metadata for the union of ``schemas``: each column's entry from the first file that
    has it (pandas then reads the assembled table as it reads a part)."""
    import json

    merged: dict | None = None
    seen: set[str] = set()
    for schema in schemas:
        raw = (schema.metadata or {}).get(b"pandas")
        if raw is None:
            continue
        info = json.loads(raw)
        if merged is None:
            merged = {**info, "columns": []}
        for column in info.get("columns", []):
            if column.get("name") not in seen:
                seen.add(column.get("name"))
                merged["columns"].append(column)
    return {} if merged is None else {b"pandas": json.dumps(merged).encode()}


def _query(con: Any | None, sql: str, sweep_dir: Path) -> list[tuple]:
    """The rows of a small query (on a connection of its own when ``con`` is None)."""
    import duckdb

    try:
        if con is None:
            with connect() as own:
                return own.execute(sql).fetchall()
        return con.execute(sql).fetchall()
    except duckdb.OutOfMemoryException as ex:
        raise MemoryError(f"DuckDB ran out of memory ({first_line(ex)})") from None
    except duckdb.Error as ex:
        raise DamagedFileError(sweep_dir, f"a results file could not be read ({first_line(ex)})") from None


def _fetch(con: Any, sql: str, sweep_dir: Path) -> Iterator[pa.RecordBatch]:
    """Run ``sql`` and stream its result. A file that fails inside DuckDB is a damaged file
    (:class:`DamagedFileError`); DuckDB out of its memory limit is a ``MemoryError``."""
    import duckdb

    try:
        relation = con.sql(sql)
        stream = getattr(relation, "to_arrow_reader", None) or relation.fetch_record_batch  # duckdb < 2
        yield from stream(BATCH_ROWS)
    except duckdb.OutOfMemoryException as ex:
        raise MemoryError(f"DuckDB ran out of memory ({first_line(ex)})") from None
    except duckdb.Error as ex:
        raise DamagedFileError(sweep_dir, f"a results file could not be read ({first_line(ex)})") from None


def assemble(sweep_dir: str | Path) -> Path:
    """Write the assembled table to ``SWEEP_DIR/results.parquet``, then drop the part files.

    The table streams from DuckDB (deduplicated and ordered out of core) into the file, batch by
    batch, so assembling takes bounded memory at any size. It is written (atomically) before any
    part is removed, so a kill in between leaves rows in both places and the next assembly
    deduplicates them.
    """
    sweep_dir = Path(sweep_dir)
    scan = Scan.of(sweep_dir)
    spill = sweep_dir / SPILL
    with connect(spill) as con:
        batches = (scan.cast(batch) for batch in scan.job_ordered(con))
        path = write_batches(batches, scan.schema, sweep_dir / RESULTS)
    shutil.rmtree(spill, ignore_errors=True)
    parts = sweep_dir / PARTS
    for part, _ in scan.files:  # only the parts read: one written meanwhile is not in the table yet
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
    except (MemoryError, OSError) as ex:  # DuckDB out of memory, a full disk: the parts are kept
        print(f"kl_sweep: could not assemble {args.sweep_dir}: {first_line(ex)}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{pq.ParquetFile(path).metadata.num_rows} rows -> {path} (peak memory {peak:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
