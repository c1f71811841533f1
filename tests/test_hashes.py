"""Config hashes as numbers and as text; the table keeps the first row of each configuration, in job order."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from kl_sweep.collect import read_sweep
from kl_sweep.config import ROW_KEYS
from kl_sweep.io import write_parquet
from kl_sweep.rows import config_hash_values, config_hashes, hash_text, hash_values, rows_frame


def random_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    columns = {k: rng.integers(1, 100, n) if t is int else rng.normal(size=n) for k, t in ROW_KEYS.items()}
    columns["divergence.alpha"] = np.where(rng.random(n) < 0.5, np.nan, columns["divergence.alpha"])
    return rows_frame(columns, n)


SHARED = {"divergence.name": "reverse", "estimator.name": "quadrature", "optimizer.betas": [0.9, 0.999]}


def test_config_hashes_are_pandas_hashes_of_the_rows_and_one_settings_string():
    """The definition, written out with a plain string column: the hashes resumed sweeps match on.
    A stochastic fit's ``seed`` goes into the settings string, and only where it is not 0."""
    rows = random_rows(500)
    rows.loc[::3, "seed"] = 0
    reference = rows.drop(columns="seed")
    reference["__shared__"] = [
        json.dumps({**SHARED, **({"seed": int(s)} if s else {})}, sort_keys=True, default=str)
        for s in rows.seed
    ]
    expected = pd.util.hash_pandas_object(reference, index=False).to_numpy()
    values = config_hash_values(rows, SHARED)
    assert values.dtype == np.uint64 and (values == expected).all()
    assert config_hashes(rows, SHARED).tolist() == [f"{int(v):016x}" for v in expected]
    other = config_hash_values(rows, {**SHARED, "divergence.name": "forward"})
    assert (other != values).all()


def test_hash_values_undo_hash_text_and_leave_out_foreign_texts():
    values = np.array([0, 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF], np.uint64)
    text = hash_text(values)
    assert text.tolist() == ["0" * 16, "0" * 15 + "1", "8" + "0" * 15, "f" * 16, "0123456789abcdef"]
    assert (hash_values(pa.array(text)) == values).all()
    # Chunked, offset and large_string arrays; texts kl_sweep never writes are left out.
    foreign = ["0123456789ABCDEF", "123", "0123456789abcdeg", "00000000000000000"]
    large = pa.large_string()
    mixed = pa.chunked_array([pa.array(["x", *text[:2]], large)[1:], pa.array([*foreign, *text[2:]], large)])
    assert (hash_values(mixed) == values).all()
    assert hash_values(pa.array([], pa.string())).size == 0


def results(jobs, hashes, mu):
    n = len(jobs)
    return pd.DataFrame(
        {
            "config_hash": hashes,
            "divergence": ["reverse"] * n,
            "mu": mu,
            "sigma2": np.ones(n),
            "loss": np.zeros(n),
            "job_num": pd.array(jobs, dtype="Int64"),
        }
    )


@pytest.mark.parametrize("foreign", [False, True])
def test_the_table_keeps_the_first_row_of_each_config_in_job_order(tmp_path, foreign):
    """Against pandas' own drop_duplicates and stable sort of the same rows read in the same order."""
    h = hash_text(np.arange(1, 7, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    if foreign:
        h[5] = "not-a-kl_sweep-hash"
    files = {
        "results.parquet": results([4, 2, None], [h[4], h[2], h[5]], [4.0, 2.0, 5.0]),
        "parts/part-a.parquet": results([2, 0, 3], [h[2], h[0], h[3]], [20.0, 0.0, 3.0]),
        "parts/part-b.parquet": results([1, 3, None, 6], [h[1], h[3], h[5], h[0]], [1.0, 30.0, 50.0, 60.0]),
    }
    for name, frame in files.items():
        write_parquet(frame, tmp_path / name)
    got = read_sweep(tmp_path)
    every = pd.concat(files.values(), ignore_index=True)
    expected = every.drop_duplicates("config_hash").sort_values("job_num", kind="stable", na_position="last")
    assert got["mu"].tolist() == expected["mu"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert got["config_hash"].tolist() == expected["config_hash"].tolist()
