"""The sweep itself: parse, compose once per group, validate all, fit in chunks, assemble.

Heavy imports (torch, pandas) live here and load only when a sweep runs, not when Hydra scans
plugins.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException, HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kl_sweep.collect import (
    DAMAGED,
    PARTS,
    RESULTS,
    SUPERSEDED,
    DamagedFileError,
    assemble,
    check_results_file,
    first_line,
    read_results_batches,
    result_files,
)
from kl_sweep.config import ROW_KEYS, config_values, split_values
from kl_sweep.io import ParquetStream, read_metadata, writable_dir_problem, write_batches, write_text
from kl_sweep.lock import STALE_AFTER, LockedError, SweepLock
from kl_sweep.rows import HEX16, config_hash_values, hash_values, hashed_settings, rows_frame
from kl_sweep.sweep import Grid, shard_spec
from kl_sweep.threads import thread_budget, threads_per_shard
from kl_sweep.validate import ConfigError, validate
from kl_sweep.version import COLUMN as VERSION_COLUMN
from kl_sweep.version import UNKNOWN as UNKNOWN_VERSION
from kl_sweep.version import numerics_version

log = logging.getLogger("kl_sweep.sweeper")
SHARDS = ".shards"
#: Bytes a result row takes on disk, with room for the part file and the assembled table.
BYTES_PER_ROW = 600


#: What ``hydra.sweeper.on_version_change`` may be.
ON_VERSION_CHANGE = ("stop", "refit", "keep")


class SweepError(CompactHydraException):
    """A sweep that cannot start; Hydra prints the one-line message without a traceback."""

    exit_code = 2


class SweepFailed(SweepError):
    """A sweep that started but could not finish (a failed shard, a full disk): exit status 1."""

    exit_code = 1


#: Configurations generated at a time when a sweep is planned, checked for resume and dealt to
#: shards: every step streams, so memory does not grow with the sweep.
BLOCK_ROWS = 1 << 17


@dataclass
class Plan:
    """Every configuration of the sweep, enumerated a block at a time, and the settings each group
    of rows shares. A group is one combination of the non-row keys' values (divergence, estimator,
    dim, ...); ``defaults`` holds each group's values of the row keys not swept."""

    grid: Grid
    group_keys: list[str]
    groups: list[dict[str, Any]]
    defaults: list[dict[str, Any]]
    repeated: np.ndarray  # per group: True when an earlier group has the same settings and rows
    sweep_id: str

    def __len__(self) -> int:
        per_group = len(self.grid) // max(len(self.groups), 1)
        return per_group * int((~self.repeated).sum())

    def blocks(self, size: int | None = None) -> Iterator[pd.DataFrame]:
        """The configurations in job order, ``size`` positions of the product at a time: the typed
        row keys (:func:`kl_sweep.rows.rows_frame`), ``group``, ``job_num`` and ``hash`` (the
        config hash as a uint64); ``size`` defaults to :data:`BLOCK_ROWS`."""
        size = size or BLOCK_ROWS
        for start in range(0, len(self.grid), size):
            block = self._block(start, start + size)
            if len(block):
                yield block

    @property
    def rows(self) -> pd.DataFrame:
        """Every configuration in one frame: for small plans (tests)."""
        blocks = list(self.blocks())
        return pd.concat(blocks, ignore_index=True) if blocks else self._block(0, 0)

    def _block(self, start: int, stop: int) -> pd.DataFrame:
        index, job = self.grid.indices(start, stop)
        group = np.zeros(len(job), dtype=np.int64)
        for key in self.group_keys:  # mixed radix over the group keys, in the grid's order
            group = group * len(self.grid.values[key]) + index[key]
        keep = ~self.repeated[group]
        index, job, group = {k: v[keep] for k, v in index.items()}, job[keep], group[keep]
        columns = {}
        for key in ROW_KEYS:
            if key in index:
                columns[key] = self.grid.values[key][index[key]]
            elif any(key in d for d in self.defaults):
                per_group = np.empty(len(self.defaults), dtype=object)
                per_group[:] = [d.get(key) for d in self.defaults]
                columns[key] = per_group[group]
        typed = rows_frame(columns, len(job))
        typed["group"], typed["job_num"] = group, job
        hashes = np.empty(len(job), dtype=np.uint64)
        for g in np.unique(group):  # a handful of groups: one hash call each
            mask = group == g
            hashes[mask] = config_hash_values(typed[mask], self.groups[int(g)])
        typed["hash"] = hashes
        return typed


def parse_overrides(
    params: dict[str, str], arguments: Sequence[str], config_loader: Any
) -> OrderedDict[str, Override]:
    """Hydra's override grammar, config parameters first; a key on the command line wins."""
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    parser = OverridesParser.create(config_loader=config_loader)
    try:
        parsed = parser.parse_overrides(lines)
    except HydraException:
        from kl_sweep.cli import malformed

        raise SweepError(malformed(lines)) from None
    overrides: OrderedDict[str, Override] = OrderedDict()
    for override in parsed:
        overrides[override.get_key_element()] = override
    return overrides


def _value_text(override: Override) -> str:
    """What stands after ``=`` in the override, as typed (sweeps cannot be turned back into text)."""
    line = override.input_line or ""
    return line.split("=", 1)[1] if "=" in line else line


def _count(key: str, override: Override) -> int | None:
    """How many values a range() stands for, without enumerating it (None for other overrides)."""
    value = override.value()
    if not isinstance(value, RangeSweep) or value.start is None or value.stop is None:
        return None
    start, stop, step = (Decimal(str(v)) for v in (value.start, value.stop, value.step))
    if step == 0:
        raise ConfigError(
            key, _value_text(override), "a range with a non-zero step", f"override {override.input_line}"
        )
    return max(0, math.ceil((stop - start) / step))


def _values(key: str, override: Override) -> list[Any]:
    """The list of values one override stands for: typed for row keys, strings for the rest."""
    line = override.input_line
    if override.is_sweep_override():
        if not override.is_discrete_sweep():
            raise ConfigError(
                key,
                _value_text(override),
                "a list, range(), choice() or glob(); interval() needs a sampling sweeper such as optuna",
                f"override {line}",
            )
        values = (
            list(override.sweep_iterator()) if key in ROW_KEYS else list(override.sweep_string_iterator())
        )
    else:
        values = [override.value()] if key in ROW_KEYS else [override.get_value_element_as_str()]
    if not values:
        raise ConfigError(key, _value_text(override), "a sweep with at least one value", f"override {line}")
    if key in ROW_KEYS:
        values = [_typed(key, v, line) for v in values]
    return values


def _typed(key: str, value: Any, line: str) -> Any:
    kind = ROW_KEYS[key]
    allowed = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, allowed, f"override {line}")
    if kind is int and float(value) != int(value):
        raise ConfigError(key, value, allowed, f"override {line}")
    return kind(value)


def make_plan(
    config_loader: Any,
    config: DictConfig,
    overrides: OrderedDict[str, Override],
    max_configurations: int = 100_000_000,
) -> Plan:
    """Expand the product, compose once per group of non-row values, validate every row.

    Raises before anything is written: one bad value anywhere stops the sweep with its override,
    and a product larger than ``max_configurations`` is refused before it is enumerated.
    """
    counts = [_count(key, o) for key, o in overrides.items()]
    known = math.prod(c for c in counts if c is not None)
    if known > max_configurations:
        raise SweepError(
            f"kl_sweep: the sweep has at least {known:,} configurations; allowed is at most "
            f"{max_configurations:,} (hydra.sweeper.max_configurations)"
        )
    values = OrderedDict((key, _values(key, o)) for key, o in overrides.items())
    total = math.prod(len(v) for v in values.values())
    if total > max_configurations:
        raise SweepError(
            f"kl_sweep: the sweep has {total:,} configurations; allowed is at most "
            f"{max_configurations:,} (hydra.sweeper.max_configurations)"
        )
    grid = Grid(values)
    if len(grid) == 0:
        raise SweepError("kl_sweep: the sweep is empty")
    group_keys = [k for k in values if k not in ROW_KEYS]
    groups: list[dict[str, Any]] = []
    defaults: list[dict[str, Any]] = []
    seen: set[str] = set()
    repeated = []
    # One composition per group, not per row: every combination of the group keys' values.
    for combo in itertools.product(*(grid.values[k] for k in group_keys)):
        cfg = _compose(config_loader, config, [f"{k}={v}" for k, v in zip(group_keys, combo)])
        row_defaults, shared = split_values(config_values(cfg))
        columns = {
            k: grid.values[k] if k in grid.values else row_defaults[k]
            for k in ROW_KEYS
            if k in grid.values or k in row_defaults
        }

        def context(key: str, value: Any) -> str:
            return f"override {overrides[key].input_line}" if key in overrides else "from the config"

        validate({**shared, **columns}, context)  # each row key's values: the checks are per key
        row_defaults = {k: v for k, v in row_defaults.items() if k in ROW_KEYS and k not in grid.values}
        # Two groups with the same settings and rows (dim=1,1.0) are one: keep the first's jobs.
        same = json.dumps([hashed_settings(shared), row_defaults], sort_keys=True, default=str)
        repeated.append(same in seen)
        seen.add(same)
        groups.append(shared)
        defaults.append(row_defaults)
    lines = [o.input_line for o in overrides.values()]
    sweep_id = hashlib.sha1(json.dumps(lines).encode()).hexdigest()[:12]
    return Plan(grid, group_keys, groups, defaults, np.array(repeated, dtype=bool), sweep_id)


def _compose(config_loader: Any, config: DictConfig, overrides: list[str]) -> DictConfig:
    try:
        return config_loader.load_sweep_config(config, overrides)
    except HydraException as ex:
        from kl_sweep.cli import unknown_key_message

        unknown = unknown_key_message(ex)
        if unknown:
            raise SweepError(unknown) from None
        options = getattr(ex, "options", None)
        missing = getattr(ex, "missing_cfg_file", None)
        if options and missing and "/" in missing:
            group, name = missing.rsplit("/", 1)
            raise ConfigError(group, name, "one of " + ", ".join(options)) from None
        cause = ex.__cause__
        detail = f": {str(cause).strip().splitlines()[0]}" if cause is not None else ""
        raise SweepError(f"kl_sweep: {str(ex).strip().splitlines()[0]}{detail}") from None
    except OmegaConfBaseException as ex:
        raise SweepError(f"kl_sweep: {str(ex).strip().splitlines()[0]}") from None


def _check_options(
    chunk_size: int,
    shards: int,
    shard_size: int | None,
    on_version_change: str = "stop",
    stale_lock_seconds: float = STALE_AFTER,
) -> None:
    if on_version_change not in ON_VERSION_CHANGE:
        raise ConfigError(
            "hydra.sweeper.on_version_change", on_version_change, "one of " + ", ".join(ON_VERSION_CHANGE)
        )
    if not stale_lock_seconds > 0:
        raise ConfigError("hydra.sweeper.stale_lock_seconds", stale_lock_seconds, "a number of seconds > 0")
    if chunk_size < 1:
        raise ConfigError("hydra.sweeper.chunk_size", chunk_size, "an integer >= 1")
    if shards < 1:
        raise ConfigError("hydra.sweeper.shards", shards, "an integer >= 1")
    if shard_size is not None and shard_size < 1:
        raise ConfigError("hydra.sweeper.shard_size", shard_size, "an integer >= 1 or null")


def _check_writable(sweep_dir: Path, rows: int) -> None:
    """Fail before fitting when the sweep directory cannot take the results."""
    problem = writable_dir_problem(sweep_dir)
    if problem:
        raise SweepError(f"kl_sweep: cannot write the sweep to {sweep_dir}: {problem}")
    existing = sweep_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    need = rows * BYTES_PER_ROW + (1 << 20)
    if free < need:
        raise SweepError(
            f"kl_sweep: not enough free space for the sweep in {existing}: "
            f"{free} bytes free, about {need} needed"
        )


#: Rows dealt to a shard at a time. The cost of a fit varies along the grid (with the divergence,
#: the separation, the start), and a contiguous split of the 163,200-configuration benchmark left
#: one of two shards 23% more optimiser steps than the other: the sweep then waits for it. Blocks
#: of 1,024 dealt in turn then put 2/3 of the reverse fits in one shard of two (the grid ran 340
#: starts of each divergence in turn): dealing in turn aliases with the grid's periods. So each
#: run of n blocks (n shards) goes one block to a shard, in an order drawn at random (the same
#: for every run of the sweep): a shard gets its share of every stretch of n blocks. Each block is
#: a contiguous job_num range.
DEAL_BLOCK = 16


def _dealing(
    rows: int, shards: int, shard_size: int | None
) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """How ``rows`` rows are dealt: the number of shards, and the shard of each row position
    (0..rows-1): equal blocks of at most :data:`DEAL_BLOCK` rows, one of every n in turn to each
    of the n shards (in shuffled turns), the same number to each shard. A sweep of at most that
    many rows a shard is cut into contiguous ranges, in order."""
    n = max(1, math.ceil(rows / shard_size) if shard_size else min(shards, rows))
    per_shard = math.ceil(rows / (n * DEAL_BLOCK))  # blocks a shard gets: equal counts
    block = max(1, math.ceil(rows / (n * max(per_shard, 1))))
    if per_shard <= 1:
        return n, lambda position: position // block
    turns = np.argsort(np.random.default_rng(0).random((per_shard, n)), axis=1).ravel()
    return n, lambda position: turns[position // block]


def _split(rows: pd.DataFrame, shards: int, shard_size: int | None) -> list[pd.DataFrame]:
    """The rows of each shard (:func:`_dealing`), for a frame in memory."""
    n, owner_of = _dealing(len(rows), shards, shard_size)
    owner = owner_of(np.arange(len(rows)))
    return [rows[owner == i] for i in range(n) if (owner == i).any()]


@dataclass
class Shard:
    """A shard file written by the sweeper, and what the failure line says of it."""

    path: Path
    rows: int = 0
    first: int = -1  # its smallest and largest job_num
    last: int = -1
    runs: int = 0  # contiguous job_num ranges

    def add(self, jobs: np.ndarray) -> None:
        """Count rows with these job numbers (ascending, after any added before)."""
        if not len(jobs):
            return
        joined = self.last >= 0 and int(jobs[0]) == self.last + 1
        self.runs += 1 + int((np.diff(jobs) != 1).sum()) - int(joined)
        self.first = int(jobs[0]) if self.first < 0 else self.first
        self.last, self.rows = int(jobs[-1]), self.rows + len(jobs)

    def span(self) -> str:
        """``job_num a-b``, and how many blocks when its rows are not one contiguous range."""
        span = f"job_num {self.first}-{self.last}"
        return span if self.runs == 1 else f"{span} in {self.runs} blocks"

    def missing(self, done: np.ndarray) -> int:
        """How many of its rows have no result among the sorted ``done`` hashes."""
        batches = pq.ParquetFile(self.path).iter_batches(batch_size=BLOCK_ROWS, columns=["hash"])
        return sum(int((~_among(b.column(0).to_numpy(), done)).sum()) for b in batches)


def _job_span(piece: pd.DataFrame) -> str:
    """``job_num a-b``, and how many blocks when the shard's rows are not one contiguous range."""
    shard = Shard(Path())
    shard.add(piece["job_num"].to_numpy())
    return shard.span()


def _among(hashes: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Which of ``hashes`` are in the sorted array ``done`` (a binary search each: no copies of
    ``done``, which may hold every hash of a 10^8-row sweep)."""
    if not len(done):
        return np.zeros(len(hashes), dtype=bool)
    at = np.minimum(np.searchsorted(done, hashes), len(done) - 1)
    return done[at] == hashes


#: Shard files open at once while a sweep deals its rows; more shards are written in rounds.
OPEN_SHARDS = 256


def _write_shards(
    plan: Plan,
    done: np.ndarray,
    todo: int,
    shard_dir: Path,
    spec: dict[str, str],
    shards: int,
    shard_size: int | None,
) -> list[Shard]:
    """Deal the ``todo`` rows not among ``done`` to shard files, a block of the plan at a time
    (:func:`_dealing`); returns the shards that got rows, in order."""
    n, owner_of = _dealing(todo, shards, shard_size)
    written: dict[int, Shard] = {}
    for first in range(0, n, OPEN_SHARDS):  # one pass over the plan per round of open files
        streams: dict[int, ParquetStream] = {}
        try:
            position = 0
            for block in plan.blocks():
                block = block[~_among(block["hash"].to_numpy(), done)]
                owner = owner_of(np.arange(position, position + len(block)))
                position += len(block)
                table = pa.Table.from_pandas(block, preserve_index=False)
                jobs = block["job_num"].to_numpy()
                for i in np.unique(owner[(owner >= first) & (owner < first + OPEN_SHARDS)]).tolist():
                    mask = owner == i
                    if i not in streams:
                        path = shard_dir / f"shard-{i:05d}.parquet"
                        streams[i], written[i] = ParquetStream(path, table.schema, spec), Shard(path)
                    streams[i].write(table.filter(mask))
                    written[i].add(jobs[mask])
            for stream in streams.values():
                stream.close()
        except BaseException:
            for stream in streams.values():
                stream.abort()
            raise
    return [written[i] for i in sorted(written)]


def shard_threads(config: DictConfig, n_shards: int) -> int | None:
    """Torch threads for each shard: the core budget shared among the shards that run at once.

    Hydra's basic launcher runs shards one after another in this process: each gets the whole
    budget (:func:`kl_sweep.threads.thread_budget`). joblib runs ``n_jobs`` of them side by side
    and submitit's local executor all of them: each gets ``budget // concurrent``. Launchers that
    place jobs on other machines (SLURM, ray) get None: each job then uses the cores it is given
    there (its affinity mask or ``OMP_NUM_THREADS``, which SLURM sets from ``cpus_per_task``).
    """
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    budget = thread_budget()
    if target.endswith("BasicLauncher"):
        concurrent = 1
    elif "joblib" in target:
        from joblib import effective_n_jobs

        n_jobs = OmegaConf.select(config, "hydra.launcher.n_jobs", default=-1)
        concurrent = min(n_shards, effective_n_jobs(-1 if n_jobs is None else int(n_jobs)))
    elif "submitit" in target and "Local" in target:
        concurrent = n_shards
    else:
        return None
    return threads_per_shard(budget, concurrent)


def _link_latest(latest_link: str | None, sweep_dir: Path, cwd: str) -> None:
    if not latest_link:
        return
    link = Path(latest_link)
    if not link.is_absolute():
        link = Path(cwd) / link
    if link.resolve() == sweep_dir.resolve():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(sweep_dir.resolve(), link.parent.resolve()), target_is_directory=True)
    os.replace(tmp, link)


def run_sweep(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    config: DictConfig,
    arguments: list[str],
    params: dict[str, str],
    chunk_size: int,
    shards: int,
    shard_size: int | None,
    latest_link: str | None,
    max_configurations: int = 100_000_000,
    on_version_change: str = "stop",
    stale_lock_seconds: float = STALE_AFTER,
) -> Any:
    """Plan and validate, hold the sweep directory, fit what is missing, assemble the table.

    Raises :class:`SweepError` (exit 2) before anything is written when the sweep cannot start,
    and :class:`SweepFailed` (exit 1) when it started but could not finish; both carry one line.
    """
    tic = time.perf_counter()
    _check_options(chunk_size, shards, shard_size, on_version_change, stale_lock_seconds)
    overrides = parse_overrides(params, arguments, hydra_context.config_loader)
    plan = make_plan(hydra_context.config_loader, config, overrides, max_configurations)
    sweep_dir = Path(config.hydra.sweep.dir).absolute()
    _check_writable(sweep_dir, len(plan))
    # A full disk must not turn every later log line into a "--- Logging error ---" traceback.
    logging.raiseExceptions = False
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        with SweepLock(sweep_dir, stale_lock_seconds):
            returns = _run_locked(
                hydra_context,
                task_function,
                config,
                plan,
                sweep_dir,
                chunk_size,
                shards,
                shard_size,
                on_version_change,
            )
    except LockedError as ex:
        raise SweepError(str(ex)) from None
    except (DamagedFileError, MemoryError) as ex:  # while the table was assembled
        raise SweepFailed(
            f"kl_sweep: the sweep in {sweep_dir} could not assemble its table: {first_line(ex)}; its rows "
            f"are kept in {sweep_dir / PARTS}: rerun the same command to assemble them"
        ) from None
    except OSError as ex:
        where = f" ({ex.filename})" if ex.filename else ""
        raise SweepFailed(
            f"kl_sweep: the sweep in {sweep_dir} stopped: {ex.strerror or first_line(ex)}{where}; "
            f"every file written is whole: fix that (free space) and rerun the same command to fit "
            f"only what is missing"
        ) from None
    _link_latest(latest_link, sweep_dir, config.hydra.runtime.cwd)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    log.info(
        f"kl_sweep: {len(plan)} rows -> {sweep_dir / RESULTS} ({time.perf_counter() - tic:.1f} s, "
        f"peak memory {peak:.2f} GiB)"
    )
    return returns


def _run_locked(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    config: DictConfig,
    plan: Plan,
    sweep_dir: Path,
    chunk_size: int,
    shards: int,
    shard_size: int | None,
    on_version_change: str,
) -> list[Any]:
    """The sweep proper, while this process holds the sweep directory's lock."""
    found = _survey(sweep_dir)
    done = _versions(sweep_dir, found, on_version_change)
    del found
    write_text(OmegaConf.to_yaml(config), sweep_dir / "multirun.yaml")
    total = len(plan)
    if len(done):  # one pass: how many of the plan's rows are done
        todo = sum(int((~_among(b["hash"].to_numpy(), done)).sum()) for b in plan.blocks())
    else:
        todo = total
    log.info(
        f"kl_sweep: {total} configurations in {int((~plan.repeated).sum())} group(s); "
        f"{total - todo} already done, {todo} to fit -> {sweep_dir}"
    )
    returns = []
    if todo:
        shard_dir = sweep_dir / SHARDS
        _clear_shards(sweep_dir, shard_dir)
        n_shards, _ = _dealing(todo, shards, shard_size)
        threads = shard_threads(config, n_shards)
        spec = shard_spec(plan.groups, plan.sweep_id, sweep_dir, chunk_size, threads)
        pieces = _write_shards(plan, done, todo, shard_dir, spec, shards, shard_size)
        del done  # the fits need the memory more
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        pa.default_memory_pool().release_unused()  # Arrow's freed blocks, before DuckDB takes its own
        results, failures = _launch(launcher, pieces, sweep_dir)
        _release_workers()
        returns.append(results)
        if failures:
            line = _failure_line(sweep_dir, pieces, failures)
            shutil.rmtree(shard_dir, ignore_errors=True)
            raise SweepFailed(line)
        shutil.rmtree(shard_dir, ignore_errors=True)
    if total > ASSEMBLE_APART:
        _assemble_apart(sweep_dir)
    else:
        assemble(sweep_dir)
    return returns


#: Sweeps larger than this assemble their table in a process of its own: DuckDB's memory then
#: never adds to what planning and dealing left in the sweeper's heap (at 10^7 rows, 2.16 GiB in
#: one process against about 1.1 GiB apart). Smaller ones save the process's start.
ASSEMBLE_APART = 1_000_000


def _assemble_apart(sweep_dir: Path) -> None:
    """:func:`kl_sweep.collect.assemble` in a fresh process (``python -m kl_sweep.collect``)."""
    done = subprocess.run(
        [sys.executable, "-m", "kl_sweep.collect", str(sweep_dir)], capture_output=True, text=True
    )
    said = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode:
        why = said[-1].removeprefix("kl_sweep: ") if said else f"exit status {done.returncode}"
        raise SweepFailed(
            f"kl_sweep: the sweep in {sweep_dir} could not assemble its table: {why}; its rows are kept "
            f"in {sweep_dir / PARTS}: rerun the same command to assemble them"
        )
    log.info(f"kl_sweep: assembled in a process of its own: {said[-1] if said else ''}")


def _release_workers() -> None:
    """Stop joblib's worker processes once the shards are done. Left idle, they are shut down at
    exit, and the exit waits for them: 0.7-1.5 s of every joblib sweep's wall time."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


def _move_aside(sweep_dir: Path, path: Path, folder: str) -> Path:
    """Move ``path`` into ``sweep_dir/folder/`` under a name no other file there has; never delete."""
    target_dir = sweep_dir / folder
    target_dir.mkdir(exist_ok=True)
    name = "__".join(path.relative_to(sweep_dir).parts)
    target = target_dir / name
    n = 1
    while target.exists():
        n += 1
        target = target_dir / f"{Path(name).stem}.{n}{Path(name).suffix}"
    os.rename(path, target)
    return target


@dataclass
class Found:
    """A results file's rows as the resume check needs them: each row's config hash (uint64) and
    numerics version (an index into ``versions``)."""

    hashes: np.ndarray
    version: np.ndarray
    versions: list[str]

    def stale(self, current: str) -> np.ndarray:
        """Which rows another numerics version fitted."""
        return np.array([v != current for v in self.versions] + [False], dtype=bool)[self.version]


def _survey(sweep_dir: Path) -> dict[Path, Found]:
    """Every results file's hashes and versions, read a batch at a time (every column decoded);
    damaged or foreign files are moved aside."""
    found: dict[Path, Found] = {}
    for path, _ in result_files(sweep_dir):
        try:
            found[path] = _read_found(path)
        except DamagedFileError as ex:
            target = _move_aside(sweep_dir, path, DAMAGED)
            log.warning(
                f"kl_sweep: damaged results file {path}: {ex.problem}; moved to {target}, "
                f"its configurations will be fitted again"
            )
    return found


def _read_found(path: Path) -> Found:
    """The config hashes and numerics versions of one results file (8 + 4 bytes a row)."""
    has_version = VERSION_COLUMN in check_results_file(path).names
    columns = ["config_hash", VERSION_COLUMN] if has_version else ["config_hash"]
    hashes, version, versions = [], [], {}
    for batch in read_results_batches(path, columns):
        texts = batch.column(0).cast(pa.large_string())
        valid = pc.fill_null(pc.match_substring_regex(texts, HEX16), False)  # those hash_values keeps
        hashes.append(hash_values(texts))
        names = batch.column(1).filter(valid) if has_version else pa.nulls(len(hashes[-1]))
        codes = pc.dictionary_encode(pc.fill_null(names.cast(pa.large_string()), UNKNOWN_VERSION))
        local = [versions.setdefault(v, len(versions)) for v in codes.dictionary.to_pylist()]
        version.append(np.asarray(local, dtype=np.int32)[codes.indices.to_numpy(zero_copy_only=False)])
    return Found(
        np.concatenate(hashes) if hashes else np.empty(0, np.uint64),
        np.concatenate(version) if version else np.empty(0, np.int32),
        list(versions),
    )


def _sorted(arrays: list[np.ndarray]) -> np.ndarray:
    """The hashes of ``arrays`` in one sorted array (sorted in place: no second copy)."""
    done = np.concatenate(arrays) if arrays else np.empty(0, np.uint64)
    done.sort()
    return done


def _versions(sweep_dir: Path, found: dict[Path, Found], policy: str) -> np.ndarray:
    """Apply ``on_version_change`` to rows of other numerics versions; the hashes (uint64, sorted)
    that count as done."""
    if not found:  # a fresh sweep: no versions to compare (and no torch to load for the current one)
        return np.empty(0, np.uint64)
    current = numerics_version()
    stale = {path: f.stale(current) for path, f in found.items()}
    old = [path for path, mask in stale.items() if mask.any()]
    if not old:
        return _sorted([f.hashes for f in found.values()])
    names = sorted({v for path in old for v in found[path].versions if v != current})
    count = len(np.unique(np.concatenate([found[path].hashes[stale[path]] for path in old])))
    said = (
        f"{count} rows in {sweep_dir} were fitted by numerics version {', '.join(names)} (this is {current})"
    )
    if policy == "stop":
        raise SweepError(
            f"kl_sweep: {said}: rerun with hydra.sweeper.on_version_change=refit to fit them again "
            f"(their files move to {sweep_dir / SUPERSEDED}) or =keep to keep them beside new rows"
        )
    if policy == "keep":
        log.warning(f"kl_sweep: {said}; keeping them (on_version_change=keep, see numerics_version)")
        return _sorted([f.hashes for f in found.values()])
    for path in old:  # refit: keep this version's rows of the file, move the file aside
        if (~stale[path]).any():
            tag = hashlib.sha1(str(path.relative_to(sweep_dir)).encode()).hexdigest()[:12]
            schema = check_results_file(path)
            kept = (
                batch.filter(pc.fill_null(pc.equal(batch.column(VERSION_COLUMN), current), False))
                for batch in read_results_batches(path, schema.names)
            )
            write_batches(kept, schema, sweep_dir / PARTS / f"kept-{tag}.parquet")
        _move_aside(sweep_dir, path, SUPERSEDED)
    log.warning(f"kl_sweep: {said}; fitting them again, their files moved to {sweep_dir / SUPERSEDED}")
    return _sorted([f.hashes[~stale[path]] for path, f in found.items()])


def _clear_shards(sweep_dir: Path, shard_dir: Path) -> None:
    """Shard files left by an earlier run are stale: remove ours, move anything else aside."""
    if not shard_dir.is_dir():
        return
    for path in sorted(shard_dir.iterdir()):
        if not path.is_file():
            continue
        try:
            ours = "shard" in read_metadata(path)
            pq.read_table(path)
        except (pa.ArrowException, OSError, ValueError) as ex:
            ours, problem = False, f"not a readable Parquet file ({first_line(ex)})"
        else:
            problem = "not a kl_sweep shard file"
        if ours:
            path.unlink()
        else:
            target = _move_aside(sweep_dir, path, DAMAGED)
            log.warning(f"kl_sweep: damaged shard file {path}: {problem}; moved to {target}")


def _hashes_in_parts(sweep_dir: Path) -> np.ndarray:
    """The config hashes (uint64, sorted) of every readable part file: 8 bytes a row."""
    chunks: list[np.ndarray] = []
    for path in sorted((sweep_dir / PARTS).glob("*.parquet")):
        try:
            column = pq.read_table(path, columns=["config_hash"]).column(0)
        except (pa.ArrowException, OSError):
            continue
        chunks.append(hash_values(column))
    return _sorted(chunks)


def _launch(launcher: Any, shards: list[Shard], sweep_dir: Path) -> tuple[Any, dict[int, str]]:
    """Run every shard; returns the launcher's results and ``{shard: why it failed}``.

    A shard that fails leaves the others alone: when the launcher itself breaks (a worker killed
    takes a joblib pool down, submitit raises for a lost job), the shards that did not finish are
    run again one at a time, so one bad shard cannot stop the rest.
    """
    failures: dict[int, str] = {}
    try:
        results = launcher.launch([[f"shard='{s.path}'"] for s in shards], initial_job_idx=0)
    except Exception as ex:  # the launcher broke: which shards finished is read from parts/
        log.warning(f"kl_sweep: the launcher failed ({_reason(ex)}); running unfinished shards one by one")
        results = []
        done = _hashes_in_parts(sweep_dir)
        for i, shard in enumerate(shards):
            if not shard.missing(done):
                continue
            try:
                (one,) = launcher.launch([[f"shard='{shard.path}'"]], initial_job_idx=i)
            except Exception as again:
                failures[i] = _reason(again)
                continue
            results.append(one)
            if one.status == JobStatus.FAILED:
                failures[i] = _reason(one._return_value)
    else:
        for i, one in enumerate(results):
            if one.status == JobStatus.FAILED:
                failures[i] = _reason(one._return_value)
    done = _hashes_in_parts(sweep_dir)
    for i, shard in enumerate(shards):  # whatever the launcher said, a shard is done when its rows are
        if i not in failures and shard.missing(done):
            failures[i] = "its job ended without writing all its rows"
    return results, failures


DISK_FULL = "the disk is full"
#: What a process pool raises when a worker dies under it (loky and concurrent.futures).
WORKER_DIED = ("TerminatedWorkerError", "BrokenProcessPool")


def _reason(ex: BaseException) -> str:
    """Why a shard failed, in a few words."""
    if isinstance(ex, OSError) and ex.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{DISK_FULL} ({ex.strerror})"
    if type(ex).__name__ in WORKER_DIED:
        return "its worker process died (killed, out of memory or crashed)"
    return first_line(ex)


def _failure_line(sweep_dir: Path, shards: list[Shard], failures: dict[int, str]) -> str:
    done = _hashes_in_parts(sweep_dir)
    missing = sum(shards[i].missing(done) for i in failures)
    shown = [f"shard {i} ({shards[i].span()}): {why}" for i, why in sorted(failures.items())[:3]]
    more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
    fix = "free space, then rerun" if any(why.startswith(DISK_FULL) for why in failures.values()) else "rerun"
    return (
        f"kl_sweep: {len(failures)} of {len(shards)} shard(s) failed, {missing} configuration(s) not fitted: "
        f"{'; '.join(shown)}{more}; the rows fitted are kept in {sweep_dir / PARTS}: "
        f"{fix} the same command to fit only the missing ones"
    )
