"""Issue 24: planning, dealing and assembling a sweep stream, a block at a time, in bounded memory.

Memory itself is measured by ``benchmarks/out_of_core.py``; these tests check that the streamed
steps give what the whole-table steps give: every configuration once, with its hash and job
number, whatever the block size; every row dealt to one shard, as the in-memory dealing deals
it; and an assembled table equal to the one pandas builds from the same files.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kl_sweep import collect
from kl_sweep.config import ROW_KEYS
from kl_sweep.io import write_parquet
from kl_sweep.rows import config_hash_values, rows_frame
from kl_sweep.sweep import Grid
from tests.test_dims_config import plan

SWEEP = (
    "separation=range(0,3,0.5)",
    "weight=0.5,0.8,0.5",  # 0.5 twice: one configuration, its first job kept
    "init_mu=-1,0,1",
    "divergence=forward,reverse,forward",
    "estimator=quadrature,grid",
)


def test_a_grid_enumerates_its_product_in_blocks_with_each_value_once():
    """Against itertools.product of the lists as written: the same rows in the same order, a value
    listed twice kept at its first place, and job_num the row's place in the product as written."""
    values = OrderedDict(a=[1.0, 2.0, 1.0, 3.0], b=["x", "y", "x"], c=[0.5, 0.25])
    grid = Grid(values)
    written = list(itertools.product(*values.values()))
    first = {}
    for job, row in enumerate(written):
        first.setdefault(row, job)
    expected = sorted(first.items(), key=lambda item: item[1])
    for size in (1, 5, 7, len(grid)):
        rows, jobs = [], []
        for start in range(0, len(grid), size):
            rows += [tuple(r) for r in grid.frame(start, start + size).itertuples(index=False)]
            jobs += grid.indices(start, start + size)[1].tolist()
        assert rows == [row for row, _ in expected] and jobs == [job for _, job in expected], size


@pytest.fixture(scope="module")
def sweep_plan():
    return plan(*SWEEP)


def test_the_plan_streams_the_same_configurations_whatever_its_block_size(sweep_plan):
    """Blocks of 1, 7 and all rows give one table: each configuration once, in job order, with
    the hash computed from its own row keys and its group's settings."""
    whole = pd.concat(list(sweep_plan.blocks(10**9)), ignore_index=True)
    assert len(whole) == len(sweep_plan) == 6 * 2 * 3 * 2 * 2
    assert whole["hash"].is_unique and whole["job_num"].is_monotonic_increasing
    for size in (1, 7):
        pd.testing.assert_frame_equal(pd.concat(list(sweep_plan.blocks(size)), ignore_index=True), whole)
    for group, rows in whole.groupby("group"):  # the hash of each row, recomputed row by row
        typed = rows_frame({k: rows[k] for k in ROW_KEYS}, len(rows))
        expected = config_hash_values(typed, sweep_plan.groups[int(group)])
        assert np.array_equal(rows["hash"].to_numpy(), expected)
    # the repeated weight 0.5 and divergence forward: rows of their first places only
    assert sorted(whole["weight"].unique()) == [0.5, 0.8]
    shared = [sweep_plan.groups[g]["divergence.name"] for g in whole["group"]]
    assert sorted(set(shared)) == ["forward", "reverse"]


@pytest.mark.parametrize("shards, shard_size, open_shards", [(3, None, 256), (1, 5, 2), (2, None, 1)])
def test_shards_are_written_a_block_at_a_time_as_they_are_dealt_in_memory(
    sweep_plan, tmp_path, monkeypatch, shards, shard_size, open_shards
):
    """_write_shards (blocks of 7 rows, shard files written in rounds of ``open_shards``) puts
    each row not done into exactly the shard that _split gives it, and no done row anywhere."""
    from hydra_plugins.kl_sweep_sweeper import _core

    monkeypatch.setattr(_core, "BLOCK_ROWS", 7)
    monkeypatch.setattr(_core, "OPEN_SHARDS", open_shards)
    whole = sweep_plan.rows
    done = np.sort(whole["hash"].to_numpy()[::5])  # every fifth row fitted already
    todo = whole[~whole["hash"].isin(done)].reset_index(drop=True)
    expected = _core._split(todo, shards, shard_size)
    spec = _core.shard_spec(sweep_plan.groups, sweep_plan.sweep_id, tmp_path, 16)
    written = _core._write_shards(sweep_plan, done, len(todo), tmp_path, spec, shards, shard_size)
    assert len(written) == len(expected)
    for shard, piece in zip(written, expected):
        got = pd.read_parquet(shard.path)
        pd.testing.assert_frame_equal(got, piece.reset_index(drop=True), check_dtype=False)
        assert shard.rows == len(piece) and shard.span() == _core._job_span(piece)
        assert shard.missing(done) == len(piece) and shard.missing(np.sort(whole["hash"].to_numpy())) == 0


def _result_rows(n: int, offset: int = 0) -> pd.DataFrame:
    """A results-like table of n rows with job numbers offset.. and hashes from them."""
    job = np.arange(offset, offset + n, dtype=np.int64)
    return pd.DataFrame(
        {
            "divergence": np.where(job % 2, "forward", "reverse"),
            "mu": np.sin(job.astype(float)),
            "sigma2": 1.0 + job / 7.0,
            "loss": np.cos(job.astype(float)),
            "mean": [np.array([x]) for x in np.sin(job.astype(float))],
            "config_hash": [f"{int(j) * 2654435761 % 2**64:016x}" for j in job],
            "job_num": job,
        }
    )


def _pandas_assembly(files: list[Path]) -> pd.DataFrame:
    """The table as pandas builds it: the files concatenated in order, each hash's first row,
    sorted by job_num (stable)."""
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    frame = frame.drop_duplicates("config_hash", keep="first").sort_values("job_num", kind="stable")
    return frame.reset_index(drop=True)


@pytest.mark.parametrize("window", [1 << 20, 37])
@pytest.mark.parametrize("duplicated", ["none", "same job", "other job"])
def test_assembly_streams_the_table_pandas_builds(tmp_path, monkeypatch, duplicated, window):
    """Parts out of job order, some rows in two parts (a shard that ran twice; or rows of another
    sweep, at other job numbers) or none, sorted in windows of ``window`` job numbers: the
    assembled file equals pandas' concatenation, first occurrence per hash, sorted by job_num."""
    monkeypatch.setattr(collect, "WINDOW_JOBS", window)
    sweep = tmp_path / "sweep"
    rows = _result_rows(300)
    pieces = [rows.iloc[200:], rows.iloc[:120], rows.iloc[120:200]]
    if duplicated == "same job":
        pieces.append(rows.iloc[100:140].assign(mu=-1.0))  # a second run of the same rows: the first wins
    elif duplicated == "other job":
        pieces.insert(0, rows.iloc[250:290].assign(mu=-2.0, job_num=lambda f: f.job_num - 240))
    files = []
    for i, piece in enumerate(pieces):
        files.append(write_parquet(piece, sweep / "parts" / f"part-{i}.parquet"))
    expected = _pandas_assembly(files)
    scan = collect.Scan.of(sweep)
    assert scan.unique() is (duplicated == "none")
    assert scan._duplicates_share_jobs() is (duplicated != "other job")
    path = collect.assemble(sweep)
    got = pd.read_parquet(path)
    assert not (sweep / "parts").exists() and not (sweep / collect.SPILL).exists()
    pd.testing.assert_frame_equal(got.drop(columns=["sweep_id", "mean"]), expected.drop(columns=["mean"]))
    assert all(np.array_equal(a, b) for a, b in zip(got["mean"], expected["mean"]))
    assert (got["sweep_id"] == "sweep").all()  # filled in for files without it
    assert pq.ParquetFile(path).metadata.num_rows == 300


def test_assembly_writes_a_batch_at_a_time(tmp_path, monkeypatch):
    """With batches of 64 rows, the file has row groups of at most 64 rows and the same table."""
    monkeypatch.setattr(collect, "BATCH_ROWS", 64)
    sweep = tmp_path / "sweep"
    rows = _result_rows(1000)
    files = [write_parquet(rows.iloc[i::3], sweep / "parts" / f"part-{i}.parquet") for i in range(3)]
    expected = _pandas_assembly(files)
    path = collect.assemble(sweep)
    meta = pq.ParquetFile(path).metadata
    assert (
        meta.num_row_groups >= 1000 // 64
        and max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 64
    )
    got = pd.read_parquet(path)
    pd.testing.assert_frame_equal(got.drop(columns=["sweep_id", "mean"]), expected.drop(columns=["mean"]))


def test_a_failed_assembly_leaves_the_parts_and_no_table(tmp_path, monkeypatch):
    """A full disk after the first batch of the table: no results.parquet (not even part of one),
    no temporary file, and every part still there for the rerun."""
    from kl_sweep import io

    monkeypatch.setattr(collect, "BATCH_ROWS", 40)
    sweep = tmp_path / "sweep"
    for i in range(3):
        write_parquet(_result_rows(50, 50 * i), sweep / "parts" / f"part-{i}.parquet")
    write = io.ParquetStream.write

    def fills_the_disk(self, batch):
        if self.rows:
            raise OSError(28, "No space left on device")
        write(self, batch)

    monkeypatch.setattr(io.ParquetStream, "write", fills_the_disk)
    with pytest.raises(OSError, match="No space"):
        collect.assemble(sweep)
    assert sorted(p.name for p in sweep.iterdir()) == ["parts"]
    assert len(list((sweep / "parts").iterdir())) == 3


def test_a_large_sweep_assembles_in_a_process_of_its_own(tmp_path):
    """_assemble_apart (python -m kl_sweep.collect in a fresh process) writes the table pandas
    builds; a damaged part fails it with one line that keeps the parts for the rerun."""
    from hydra_plugins.kl_sweep_sweeper import _core

    sweep = tmp_path / "sweep"
    rows = _result_rows(200)
    files = [write_parquet(rows.iloc[i::2], sweep / "parts" / f"part-{i}.parquet") for i in range(2)]
    expected = _pandas_assembly(files)
    _core._assemble_apart(sweep)
    got = pd.read_parquet(sweep / "results.parquet")
    pd.testing.assert_frame_equal(got.drop(columns=["sweep_id", "mean"]), expected.drop(columns=["mean"]))

    broken = tmp_path / "broken"
    write_parquet(rows, broken / "parts" / "part-0.parquet")
    (broken / "parts" / "part-1.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(_core.SweepFailed) as failed:
        _core._assemble_apart(broken)
    line = str(failed.value)
    assert "\n" not in line and "part-1.parquet" in line and "rerun the same command" in line
    assert len(list((broken / "parts").iterdir())) == 2
