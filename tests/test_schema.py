"""Column docs come from one place, kl_sweep/schema.py: every column has one; files and pages carry it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kl_sweep import schema, table
from kl_sweep.collect import assemble, read_sweep
from kl_sweep.config import ROW_KEYS
from kl_sweep.io import write_parquet
from kl_sweep.rows import rows_frame

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "results-table.md"
SHARED = {
    "divergence.name": "reverse",
    "estimator.name": "quadrature",
    "estimator.nodes_per_panel": 6,
    "optimizer.name": "adam",
    "optimizer.beta1": 0.9,
    "optimizer.beta2": 0.999,
    "optimizer.eps": 1e-8,
    "polish": True,
}


def test_every_column_of_the_table_has_a_unit_and_a_meaning():
    """Iterates over table.COLUMNS: a new column without an entry in schema.COLUMN_DOCS fails here."""
    missing = [c for c in table.COLUMNS if c not in schema.COLUMN_DOCS]
    assert not missing, f"columns without docs: add them to COLUMN_DOCS in kl_sweep/schema.py: {missing}"
    stale = [c for c in schema.COLUMN_DOCS if c not in (*table.COLUMNS, *schema.SWEEP_COLUMNS)]
    assert not stale, f"docs for columns the table no longer has: {stale}"
    for name, (unit, meaning) in schema.COLUMN_DOCS.items():
        assert unit.strip() and len(meaning.split()) >= 3, name
        assert "\n" not in unit + meaning and "|" not in unit + meaning, name


def test_the_results_table_page_is_generated_from_the_schema():
    """Regenerate with: python -m kl_sweep.schema --write docs/results-table.md"""
    text = PAGE.read_text()
    assert schema.page_with_table(text) == text, (
        "docs/results-table.md disagrees with kl_sweep/schema.py: "
        "run python -m kl_sweep.schema --write docs/results-table.md"
    )
    block = text.split(schema.BEGIN, 1)[1].split(schema.END, 1)[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(schema.COLUMN_DOCS)
    for column in table.COLUMNS:
        unit, meaning = schema.COLUMN_DOCS[column]
        assert f"| `{column}` | {unit} | {meaning} |" in block


def test_page_regeneration_replaces_only_the_block(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n\n{schema.BEGIN}\n| stale |\n{schema.END}\n\nafter\n")
    assert schema.write_page(page)
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{schema.END}\n\nafter\n")
    assert "| stale |" not in text and "| `kl_reverse` | nats |" in text
    assert not schema.write_page(page)  # already up to date
    page.write_text("# no block\n")
    with pytest.raises(ValueError, match="no"):
        schema.page_with_table(page.read_text())
    assert schema.main([]) == 0 and schema.main(["--nonsense"]) == 2


def one_fit() -> pd.DataFrame:
    rows = rows_frame(
        {"separation": 3.0, "weight": 0.75, "center": 0.0, "component_var": 1.0, "init_mu": 1.0}
        | {"init_sigma2": 1.0, "optimizer.lr": 0.05, "optimizer.max_steps": 5000, "optimizer.tol": 1e-8}
        | {"divergence.alpha": None},
        1,
    )
    assert set(ROW_KEYS) <= set(rows.columns)
    return table.run_rows(rows, SHARED)


def test_results_files_carry_each_columns_unit_and_meaning(tmp_path: Path):
    result = one_fit()
    assert list(result.columns) == table.COLUMNS
    path = write_parquet(result, tmp_path / "results.parquet")
    fields = pq.read_schema(path)
    for column in table.COLUMNS:
        meta = fields.field(column).metadata
        unit, meaning = schema.COLUMN_DOCS[column]
        assert meta == {b"unit": unit.encode(), b"description": meaning.encode()}, column
    assert b"kl_sweep" in fields.metadata  # the versions stay beside them
    read = pd.read_parquet(path)  # the metadata changes no value
    lists = ["mean", "cov"]
    assert read.drop(columns=lists).equals(result.drop(columns=lists))
    for column in lists:
        assert all(np.array_equal(a, list(b)) for a, b in zip(read[column], result[column]))


def test_an_assembled_sweep_documents_its_sweep_columns_too(tmp_path: Path):
    """collect.assemble writes results.parquet through write_parquet: sweep_id and job_num carry docs."""
    result = one_fit()
    parts = tmp_path / "sweep" / "parts"
    write_parquet(result, parts / "part-a.parquet")
    result2 = result.assign(config_hash="0" * 16)
    result2.to_parquet(parts / "part-b.parquet")  # a file written without the docs (another tool)
    path = assemble(tmp_path / "sweep")
    fields = pq.read_schema(path)
    assert fields.field("sweep_id").metadata[b"description"] == schema.COLUMN_DOCS["sweep_id"][1].encode()
    assert fields.field("loss").metadata[b"unit"] == schema.COLUMN_DOCS["loss"][0].encode()
    assert len(read_sweep(tmp_path / "sweep")) == 2
