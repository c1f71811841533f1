"""The Hydra-free half of a sweep: products of values, shard files, chunked fits, progress.

The sweeper plugin (``hydra_plugins/kl_sweep_sweeper``) parses overrides and composes configs;
everything here works on plain frames and dicts so it can be tested without Hydra.
"""

from __future__ import annotations

import json
import logging
import math
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


def product(values: Mapping[str, Sequence[Any]]) -> pd.DataFrame:
    """Cartesian product, first key slowest and last key fastest (Hydra's basic sweeper's order).

    Built from index arithmetic on whole arrays, so a million rows cost no Python loop.
    """
    sizes = [len(v) for v in values.values()]
    total = math.prod(sizes)
    position = np.arange(total, dtype=np.int64)
    columns = {}
    for i, (key, options) in enumerate(values.items()):
        stride = math.prod(sizes[i + 1 :])  # how many rows each value of this key spans
        index = (position // max(stride, 1)) % max(sizes[i], 1)
        columns[key] = np.asarray(options, dtype=object)[index] if total else np.empty(0, dtype=object)
    return pd.DataFrame(columns, index=pd.RangeIndex(total))


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
    return write_parquet(rows, path, metadata={"shard": json.dumps(spec, default=str)})


def run_shard(path: str | Path) -> int:
    """Fit every row of a shard file in chunks; each chunk lands atomically in ``parts/``.

    Returns the number of rows fitted. Chunks are fitted group by group (rows of one group share
    a divergence, estimator and optimiser) as one stream (:func:`kl_sweep.table.run_chunks`): a
    chunk's last slow rows share their steps with the next chunk's rows. At most about 1.5
    ``chunk_size`` rows are at work at once, so memory stays flat however large the shard.
    """
    from kl_sweep.io import read_metadata

    logging.raiseExceptions = False  # a full disk: one failed write, not a traceback per log line
    import torch  # here, not at the top: the sweeper's own process plans and assembles without it

    from kl_sweep.table import run_chunks

    spec = json.loads(read_metadata(path)["shard"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rows = pd.read_parquet(path)
    parts = Path(spec["sweep_dir"]) / PARTS
    chunk_size = int(spec["chunk_size"])
    progress = Progress(len(rows))
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
    return len(rows)


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
        log.info(
            f"fitted {self.done} configurations in {seconds:.1f} s: "
            f"{self.done / max(seconds, 1e-9):.0f} configurations/s on {torch.get_num_threads()} thread(s)"
        )
