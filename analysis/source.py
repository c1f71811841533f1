"""Reading a sweep with DuckDB: a census of its swept values, then its rows in batches of whole cells.

The analysis never holds a sweep's table whole. :class:`Sweep` opens a sweep directory (any layout
:func:`kl_sweep.collect.sweep_sql` understands) and

- :meth:`Sweep.open` counts its rows per swept value with one GROUP BY query (:class:`Census`):
  its size depends on the grid swept, not on the number of rows. The main context, the swept
  weights and separations, the exact structure's ranges and the runs the figures draw are all
  decided from it (:mod:`analysis.drawn`) before a single row is read;
- :meth:`Sweep.batches` streams the rows ordered by :data:`ORDER` (DuckDB's sort spills to disk
  beyond :data:`MEMORY_LIMITS`) and cuts the stream into prepared frames
  (:func:`analysis.data.prepare`) of about ``rows`` rows that never split a unit: the rows sharing
  :data:`UNIT_KEYS` (:func:`whole_units`). A unit holds whole cells (:data:`analysis.data.CELL_KEYS`,
  and ``alpha``) and whole d > 1 cells (``dim``, ``q_family``, ``direction``, ``correlation`` too),
  so every per-cell step sees all the runs of its cells at once.

Only the columns the analysis uses are read (:data:`LINE_COLUMNS`; :data:`HIGHER_COLUMNS` too
when the sweep has rows with ``dim`` > 1), and the list columns ``mean`` and ``cov`` stay in Arrow
until a figure needs a row's (:func:`numpy_lists`). :meth:`Census.of_frame` runs the same census on
a table in memory, whose one batch is the table itself (:func:`analysis.pipeline.analyse`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from analysis.data import OPTIONAL_DEFAULTS, REQUIRED_COLUMNS, prepare, with_defaults
from kl_sweep.collect import DamagedFileError, connect, first_line, result_files, sweep_sql
from kl_sweep.io import arrow_lists

#: Rows a batch holds (about: a batch is extended to finish its last unit). Measured on 10^7 rows:
#: 100,000 takes as long as 200,000 and peaks 70 MB lower.
BATCH_ROWS = 100_000
#: The memory DuckDB may take for the analysis's queries, by the number of rows of the sweep's
#: files (up to, then beyond): its sort and aggregates spill to disk beyond it, and it gives the
#: memory back when a query ends. The process takes about 1.3 times the limit on top of its own.
#: Measured: 10^7 rows stream with 256 MB (the stream peaking at 1.24 GB, 1.58 GB with 512 MB);
#: 10^8 rows need 512 MB (with 384 MB the sort runs out of memory while it is read out, and the
#: census with 256 MB); 128 MB is too little for the census even at 10^7 rows.
MEMORY_LIMITS = ((30_000_000, "256MB"), (None, "512MB"))
#: The columns of the line's analysis (d = 1, and the alpha family), as far as the table has them.
LINE_COLUMNS = [
    *REQUIRED_COLUMNS,
    *OPTIONAL_DEFAULTS,
    "converged",
    "status",
    "alpha",
    "on_boundary",
    "dim",
    "job_num",
]
#: The further columns the d > 1 figures and exact structure read.
HIGHER_COLUMNS = [
    "q_family",
    "direction",
    "correlation",
    "target_file",
    "var_ratio",
    "entropy_gap",
    "mean",
    "cov",
]
#: The order rows are streamed in: the unit keys, the rest of a cell's keys (alpha, the context,
#: the d > 1 keys), then job order: a cell's runs come in the table's order, which the means over
#: them follow (:func:`analysis.classify.group_means`). ``config_hash`` only breaks ties where
#: there is no ``job_num`` (as a sort key it doubles DuckDB's memory).
ORDER = [
    "divergence",
    "weight",
    "separation",
    "alpha",
    "estimator",
    "center",
    "component_var",
    "dim",
    "q_family",
    "direction",
    "correlation",
    "job_num",
    "config_hash",
]
#: A batch never splits the rows sharing these (a prefix of :data:`ORDER`): every cell of the
#: line and of d > 1 lies within one such unit.
UNIT_KEYS = ["divergence", "weight", "separation"]
#: The census's keys: per swept value (``grid``) and per start of a run (``starts``).
GRID_KEYS = ["divergence", "dim", "estimator", "center", "component_var", "weight", "separation"]
START_KEYS = ["divergence", "dim", "estimator", "center", "component_var", "weight"]
START_KEYS += ["optimizer", "lr", "init_sigma2", "init_mu"]


@dataclass
class Census:
    """How many rows a sweep has per swept value: ``grid`` per (divergence, dim, context, weight,
    separation) and ``starts`` per (divergence, dim, context, weight, optimizer, lr, init_sigma2,
    init_mu), each with its count ``n``; context columns a table lacks hold their defaults
    (:data:`analysis.data.OPTIONAL_DEFAULTS`), ``dim`` is 1 where it is missing."""

    grid: pd.DataFrame
    starts: pd.DataFrame

    @property
    def rows(self) -> int:
        return int(self.grid["n"].sum())

    @classmethod
    def of_frame(cls, table: pd.DataFrame) -> Census:
        """The census of a table in memory (by the same query as a sweep's)."""
        import duckdb

        present = [c for c in dict.fromkeys(GRID_KEYS + START_KEYS) if c in table.columns]
        with duckdb.connect() as con:
            rows = pa.Table.from_pandas(table[present], preserve_index=False)
            con.register("census_rows", rows)
            return cls.query(con, "census_rows", present)

    @classmethod
    def query(cls, con: Any, source: str, present: list[str]) -> Census:
        """Both counts in one pass over ``source`` (a table name or a parenthesised query)."""
        grid = [c for c in GRID_KEYS if c in present]
        starts = [c for c in START_KEYS if c in present]
        keys = list(dict.fromkeys(grid + starts))
        columns = ", ".join(_name(c) for c in keys)
        sql = (
            f"SELECT {columns}, grouping({_name('init_mu')}) AS by_grid, count(*) AS n FROM {source} "
            f"GROUP BY GROUPING SETS (({', '.join(map(_name, grid))}), ({', '.join(map(_name, starts))}))"
        )
        counts = con.sql(sql).df()
        by_grid = counts.pop("by_grid").to_numpy() == 1
        return cls(_counts(counts[by_grid], GRID_KEYS), _counts(counts[~by_grid], START_KEYS))


def _counts(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A census part with the defaults filled in, sorted by its keys."""
    frame = with_defaults(frame[[c for c in keys if c in frame.columns] + ["n"]])
    if "dim" not in frame.columns:
        frame = frame.assign(dim=1)
    frame["n"] = frame["n"].astype(np.int64)
    frame["divergence"] = frame["divergence"].astype(str)
    return frame[keys + ["n"]].sort_values(keys, ignore_index=True)


def _name(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


@dataclass
class Sweep:
    """A sweep directory opened for the analysis: its DuckDB connection and the columns it has."""

    path: Path
    con: Any
    columns: list[str]
    census: Census | None = None
    #: Rows with a non-null ``basin``: stochastic runs, which :mod:`analysis.stochastic` analyses
    #: apart; the census and batches leave them out.
    stochastic_rows: int = 0

    @classmethod
    def open(cls, sweep_dir: str | Path) -> Sweep:
        """Open ``sweep_dir`` and take its census; raises ``FileNotFoundError`` or ``ValueError``
        (with the path in the message) when it does not exist, holds no results or no rows, a file
        is damaged or the table lacks a column the analysis needs, as
        :func:`analysis.data.load_sweep` does. Reading its rows afterwards can still meet a file
        damaged inside its pages (:class:`kl_sweep.collect.DamagedFileError`)."""
        path = Path(sweep_dir)
        sql = sweep_sql(path)  # raises for a missing directory, no results or a damaged file
        con = connect()
        con.execute(f"SET memory_limit = '{memory_limit(path)}'")
        sweep = cls(path, con, [])
        sweep.columns = [row[0] for row in sweep._reading(lambda: con.execute(f"DESCRIBE {sql}").fetchall())]
        try:
            prepare(pd.DataFrame(columns=sweep.columns))  # the column checks, on no rows
        except ValueError as err:
            raise ValueError(f"results in {path}: {err}") from None
        if "basin" in sweep.columns:
            stochastic = f"SELECT count(*) FROM ({sweep_sql(path, ['basin'])}) WHERE basin IS NOT NULL"
            sweep.stochastic_rows = int(sweep._reading(lambda: con.execute(stochastic).fetchall()[0][0]))
        sweep.census = sweep.take_census()
        return sweep

    @property
    def kept(self) -> str | None:
        """The condition on the rows the census and batches read: not the stochastic runs."""
        return "basin IS NULL" if self.stochastic_rows else None

    def take_census(self) -> Census:
        """The census of the sweep's rows but its stochastic runs (:class:`Census`); ``ValueError``
        if it has no rows at all."""
        present = [c for c in dict.fromkeys(GRID_KEYS + START_KEYS) if c in self.columns]
        source = "(" + sweep_sql(self.path, present, [UNIT_KEYS[0]], rows=self.kept) + ")"
        census = self._reading(lambda: Census.query(self.con, source, present))
        if census.rows == 0 and not self.stochastic_rows:
            raise ValueError(f"no results in {self.path}: the results table has no rows")
        return census

    def batches(self, rows: int = BATCH_ROWS, higher: bool = True) -> Iterator[pd.DataFrame]:
        """The sweep's rows as prepared frames of whole units, in :data:`ORDER` (module docstring).

        ``higher``: read the d > 1 columns too (:data:`HIGHER_COLUMNS`; only worth it when the
        sweep has such rows).
        """
        wanted = LINE_COLUMNS + (HIGHER_COLUMNS if higher else [])
        columns = [c for c in dict.fromkeys(wanted) if c in self.columns]
        order = [c for c in ORDER if c in self.columns]
        order = [c for c in order if c != "config_hash" or "job_num" not in order]
        reader = self._reading(
            lambda: self.con.sql(sweep_sql(self.path, columns, order, rows=self.kept)).to_arrow_reader(
                max(1, min(rows, 65_536))
            )
        )
        units = [c for c in UNIT_KEYS if c in columns]
        batches = self._reading_each(reader)
        for table in whole_units(batches, units, rows):
            yield prepare(table.to_pandas(types_mapper=arrow_lists))

    def _reading(self, read):
        """``read()``, DuckDB failing to read or decode a results file raised as a damaged file."""
        import duckdb

        try:
            return read()
        except (duckdb.IOException, duckdb.InvalidInputException) as ex:
            raise DamagedFileError(
                self.path, f"a results file could not be read ({first_line(ex)})"
            ) from None

    def _reading_each(self, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        """The reader's batches; DuckDB's errors come through Arrow's reader as Arrow's own, so a
        file that fails to decode is recognised by DuckDB's words for it."""
        iterator = iter(reader)
        while True:
            try:
                batch = self._reading(lambda: next(iterator, None))
            except (OSError, pa.ArrowException) as ex:
                text = first_line(ex)
                if not any(words in text for words in ("Invalid Input Error", "IO Error")):
                    raise
                raise DamagedFileError(self.path, f"a results file could not be read ({text})") from None
            if batch is None:
                return
            yield batch


def memory_limit(sweep_dir: Path) -> str:
    """DuckDB's memory for a sweep (:data:`MEMORY_LIMITS`), by the rows its files' footers hold
    (duplicates included: a bound on the table's)."""
    rows = sum(pq.read_metadata(path).num_rows for path, _ in result_files(sweep_dir))
    return next(limit for most, limit in MEMORY_LIMITS if most is None or rows <= most)


def whole_units(batches: Iterable[pa.RecordBatch], keys: list[str], rows: int) -> Iterator[pa.Table]:
    """Tables of about ``rows`` rows of ``batches`` (sorted by ``keys`` first) that never split the
    rows sharing ``keys``: each table ends where a unit ends, and is extended until one does."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        held += batch.num_rows
        if held < rows:
            continue
        table = pa.Table.from_batches(pending)
        cut = last_unit_start(table, keys)
        if cut == 0:  # one unit so far: read on until it ends
            continue
        yield table.slice(0, cut)
        rest = table.slice(cut)
        pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def last_unit_start(table: pa.Table, keys: list[str]) -> int:
    """The first row of ``table``'s last unit (the rows whose ``keys`` equal its last row's, at
    its end, as the table is sorted by them); NULL equals NULL."""
    same = np.ones(table.num_rows, dtype=bool)
    for key in keys:
        column = table.column(key)
        last = column[-1]
        equal = column.is_null() if not last.is_valid else pc.fill_null(pc.equal(column, last), False)
        same &= equal.to_numpy(zero_copy_only=False)
    differs = np.flatnonzero(~same)
    return int(differs[-1]) + 1 if differs.size else 0


def numpy_lists(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its Arrow list columns (``mean``, ``cov``) as one numpy array a row, as
    :func:`kl_sweep.collect.read_sweep` gives them (do it only for the few rows a figure draws)."""
    frame = frame.copy()
    for name, dtype in frame.dtypes.items():
        if isinstance(dtype, pd.ArrowDtype):
            arrays = frame[name].array.__arrow_array__().to_numpy(zero_copy_only=False)
            frame[name] = pd.Series(arrays, dtype=object, index=frame.index)
    return frame
