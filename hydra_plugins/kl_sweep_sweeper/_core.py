"""The sweep itself: parse, compose once per group, validate all, fit in chunks, assemble.

Heavy imports (torch, pandas) live here and load only when a sweep runs, not when Hydra scans
plugins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.errors import CompactHydraException, HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kl_sweep.collect import assemble
from kl_sweep.config import ROW_KEYS, config_values, split_values
from kl_sweep.io import writable_dir_problem
from kl_sweep.sweep import finished_hashes, product, write_shard
from kl_sweep.table import config_hashes, rows_frame
from kl_sweep.validate import ConfigError, validate

log = logging.getLogger("kl_sweep.sweeper")
SHARDS = ".shards"
#: Bytes a result row takes on disk, with room for the part file and the assembled table.
BYTES_PER_ROW = 600


class SweepError(CompactHydraException):
    """A sweep that cannot start; Hydra prints the one-line message without a traceback."""


@dataclass
class Plan:
    """Every configuration of the sweep, and the settings each group of rows shares."""

    rows: pd.DataFrame  # ROW_KEYS columns + group, job_num, config_hash
    groups: list[dict[str, Any]]
    sweep_id: str


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
    frame = product(values)
    if frame.empty:
        raise SweepError("kl_sweep: the sweep is empty")
    frame["job_num"] = np.arange(len(frame), dtype=np.int64)
    group_keys = [k for k in values if k not in ROW_KEYS]
    if group_keys:
        frame["group"] = frame.groupby(group_keys, sort=False).ngroup().astype(np.int64)
    else:
        frame["group"] = np.int64(0)
    groups: list[dict[str, Any]] = []
    parts = []
    for group, rows in frame.groupby("group", sort=True):  # one composition per group, not per row
        first = rows.iloc[0]
        group_overrides = [f"{k}={first[k]}" for k in group_keys]
        cfg = _compose(config_loader, config, group_overrides)
        row_defaults, shared = split_values(config_values(cfg))
        columns = {
            k: rows[k].to_numpy() if k in rows else row_defaults[k]
            for k in ROW_KEYS
            if k in rows or k in row_defaults
        }

        def context(key: str, value: Any) -> str:
            return f"override {overrides[key].input_line}" if key in overrides else "from the config"

        validate({**shared, **columns}, context)
        typed = rows_frame(columns, len(rows))
        typed["group"] = np.int64(group)
        typed["job_num"] = rows["job_num"].to_numpy()
        typed["config_hash"] = config_hashes(typed, shared)
        groups.append(shared)
        parts.append(typed)
    table = pd.concat(parts, ignore_index=True).sort_values("job_num", kind="stable")
    # A configuration listed twice (separation=1,1) is one configuration: keep its first job.
    table = table.drop_duplicates("config_hash", keep="first").reset_index(drop=True)
    lines = [o.input_line for o in overrides.values()]
    sweep_id = hashlib.sha1(json.dumps(lines).encode()).hexdigest()[:12]
    return Plan(table, groups, sweep_id)


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


def _check_options(chunk_size: int, shards: int, shard_size: int | None) -> None:
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


def _split(rows: pd.DataFrame, shards: int, shard_size: int | None) -> list[pd.DataFrame]:
    n = math.ceil(len(rows) / shard_size) if shard_size else min(shards, len(rows))
    bounds = np.linspace(0, len(rows), n + 1).round().astype(int)
    return [rows.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


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
) -> Any:
    tic = time.perf_counter()
    _check_options(chunk_size, shards, shard_size)
    overrides = parse_overrides(params, arguments, hydra_context.config_loader)
    plan = make_plan(hydra_context.config_loader, config, overrides, max_configurations)
    sweep_dir = Path(config.hydra.sweep.dir).absolute()
    _check_writable(sweep_dir, len(plan.rows))

    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    done = finished_hashes(sweep_dir)
    todo = plan.rows[~plan.rows["config_hash"].isin(done)]
    log.info(
        f"kl_sweep: {len(plan.rows)} configurations in {len(plan.groups)} group(s); "
        f"{len(plan.rows) - len(todo)} already done, {len(todo)} to fit -> {sweep_dir}"
    )
    returns = []
    if len(todo):
        shard_dir = sweep_dir / SHARDS
        specs = [
            write_shard(
                shard_dir / f"shard-{i:05d}.parquet", part, plan.groups, plan.sweep_id, sweep_dir, chunk_size
            )
            for i, part in enumerate(_split(todo, shards, shard_size))
        ]
        launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )
        results = launcher.launch([[f"shard='{spec}'"] for spec in specs], initial_job_idx=0)
        for r in results:
            _ = r.return_value  # raises if the job failed
        returns.append(results)
        shutil.rmtree(shard_dir, ignore_errors=True)
    path = assemble(sweep_dir)
    _link_latest(latest_link, sweep_dir, config.hydra.runtime.cwd)
    log.info(f"kl_sweep: {len(plan.rows)} rows -> {path} ({time.perf_counter() - tic:.1f} s)")
    return returns
