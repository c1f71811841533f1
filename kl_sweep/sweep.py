"""The Hydra-free half of a sweep: products of values, shard files, chunked fits, progress.

The sweeper plugin (``hydra_plugins/kl_sweep_sweeper``) parses overrides and composes configs;
everything here works on plain frames and dicts so it can be tested without Hydra.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kl_sweep.collect import PARTS
from kl_sweep.io import write_parquet

log = logging.getLogger("kl_sweep.sweep")


class Grid:
    """The Cartesian product of each key's values, first key slowest and last key fastest (Hydra's
    basic sweeper's order), enumerated a block of positions at a time by index arithmetic: any
    number of rows in bounded memory, and no Python loop over them.

    With ``distinct``, a value listed twice (``separation=1,1``) is one value: its first place is
    kept, and each row's ``job_num`` stays its position in the product as written.
    """

    def __init__(self, values: Mapping[str, Sequence[Any]], distinct: bool = True):
        self.keys = list(values)
        self.values: dict[str, np.ndarray] = {}
        self.origin: dict[str, np.ndarray] = {}  # each kept value's place in the list as written
        for key, options in values.items():
            options = list(options)
            places = list({_value_key(v): i for i, v in reversed(list(enumerate(options)))}.values())
            keep = sorted(places) if distinct else list(range(len(options)))
            column = np.empty(len(keep), dtype=object)
            column[:] = [options[i] for i in keep]
            self.values[key], self.origin[key] = column, np.asarray(keep, dtype=np.int64)
        self.sizes = [len(self.values[k]) for k in self.keys]
        written = [len(values[k]) for k in self.keys]
        self._strides = [math.prod(self.sizes[i + 1 :]) for i in range(len(self.keys))]
        self._job_strides = [math.prod(written[i + 1 :]) for i in range(len(self.keys))]

    def __len__(self) -> int:
        return math.prod(self.sizes)

    def indices(self, start: int, stop: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """For positions start..stop-1: each key's value index, and each row's ``job_num``."""
        position = np.arange(start, min(stop, len(self)), dtype=np.int64)
        index, job = {}, np.zeros(len(position), dtype=np.int64)
        for key, size, stride, job_stride in zip(self.keys, self.sizes, self._strides, self._job_strides):
            index[key] = (position // max(stride, 1)) % max(size, 1)
            job += self.origin[key][index[key]] * job_stride if size else 0
        return index, job

    def frame(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Positions start..stop-1 as a frame of values (default: the whole product)."""
        stop = len(self) if stop is None else stop
        index, _ = self.indices(start, stop)
        columns = {k: self.values[k][index[k]] for k in self.keys}
        return pd.DataFrame(columns, index=pd.RangeIndex(len(index[self.keys[0]]) if self.keys else 0))


def _value_key(value: Any) -> tuple[type, Any]:
    """What makes two listed values one: equal values of one kind (1.0 and 1 typed alike already)."""
    return (type(value), value)


def product(values: Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    """Cartesian product, first key slowest and last key fastest (Hydra's basic sweeper's order)."""
    return Grid(values, distinct=False).frame()


def shard_spec(
    groups: list[dict[str, Any]], sweep_id: str, sweep_dir: Path, chunk_size: int, threads: int | None = None
) -> dict[str, str]:
    """A shard file's metadata: the settings its rows' groups share and where its results go.

    ``threads``: the torch threads the job fits with (its share of the cores when shards run side
    by side); None lets the job use every core it may run on (:func:`kl_sweep.threads.thread_budget`).
    """
    spec = {
        "groups": groups,
        "sweep_id": sweep_id,
        "sweep_dir": str(sweep_dir),
        "chunk_size": chunk_size,
        "threads": threads,
    }
    return {"shard": json.dumps(spec, default=str)}


def write_shard(
    path: Path,
    rows: pd.DataFrame,
    groups: list[dict[str, Any]],
    sweep_id: str,
    sweep_dir: Path,
    chunk_size: int,
    threads: int | None = None,
) -> Path:
    """A shard file: the rows one job fits, and (in its metadata) the settings they share.
    A sweep writes its shards a block of rows at a time (:class:`kl_sweep.io.ParquetStream` with
    :func:`shard_spec`); this writes one whole."""
    return write_parquet(rows, path, metadata=shard_spec(groups, sweep_id, sweep_dir, chunk_size, threads))


#: Chunks of a shard read into memory at a time: a batch of the shard file is cut into chunks of
#: each group, fitted as one stream per group (:func:`kl_sweep.table.run_chunks`).
CHUNKS_PER_BATCH = 32


def run_shard(path: str | Path) -> int:
    """Fit every row of a shard file in chunks; each chunk lands atomically in ``parts/``.

    Returns the number of rows fitted. The shard file is read a batch of
    :data:`CHUNKS_PER_BATCH` chunks at a time; in each batch, chunks are fitted group by group
    (rows of one group share a divergence, estimator and optimiser) as one stream
    (:func:`kl_sweep.table.run_chunks`): a chunk's last slow rows share their steps with the next
    chunk's rows. At most about 1.5 ``chunk_size`` rows are at work at once and one batch is read,
    so memory stays flat however large the shard.
    """
    import pyarrow.parquet as pq

    from kl_sweep.io import read_metadata

    logging.raiseExceptions = False  # a full disk: one failed write, not a traceback per log line
    import torch  # here, not at the top: the sweeper's own process plans and assembles without it

    from kl_sweep.table import run_chunks
    from kl_sweep.version import numerics_version

    spec = json.loads(read_metadata(path)["shard"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    numerics_version()  # once a process (it loads the native kernel), before the fit phase's clock
    handle = pq.ParquetFile(path)
    parts = Path(spec["sweep_dir"]) / PARTS
    chunk_size = int(spec["chunk_size"])
    progress = Progress(handle.metadata.num_rows)
    for batch in handle.iter_batches(batch_size=chunk_size * CHUNKS_PER_BATCH):
        rows = batch.to_pandas()
        for group, frame in rows.groupby("group", sort=True):
            shared = spec["groups"][int(group)]
            chunks = [frame.iloc[start : start + chunk_size] for start in range(0, len(frame), chunk_size)]
            for chunk, result in zip(chunks, run_chunks(chunks, shared, chunk_size)):
                result.insert(len(result.columns), "sweep_id", spec["sweep_id"])
                result.insert(len(result.columns), "job_num", chunk["job_num"].to_numpy())
                first, last = int(chunk["job_num"].iloc[0]), int(chunk["job_num"].iloc[-1])
                write_parquet(result, parts / f"part-{first:012d}-{last:012d}-{len(chunk)}.parquet")
                progress.update(len(chunk))
    progress.close()
    return progress.done


class Progress:
    """A tqdm bar on a terminal; plain log lines (done of total, rate, time left) otherwise."""

    def __init__(self, total: int, every: float = 5.0):
        self.total, self.done, self.every = total, 0, every
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cfg", desc="kl_sweep", smoothing=0.1)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info(f"{self.done}/{self.total} configurations, {rate:.0f}/s, {left:.0f} s left")

    def close(self) -> None:
        """End the bar and say the fit phase's throughput (configurations per second)."""
        import torch  # loaded already: the fit ran in this process

        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        log.info(
            f"fitted {self.done} configurations in {seconds:.1f} s: "
            f"{self.done / max(seconds, 1e-9):.0f} configurations/s on {torch.get_num_threads()} thread(s), "
            f"peak memory {peak:.2f} GiB"
        )
