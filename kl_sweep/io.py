"""Parquet files written atomically, with the versions that produced them in the metadata."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kl_sweep.schema import annotate


def versions() -> dict[str, str]:
    """The versions of kl_sweep and the libraries behind a file, for its metadata."""
    import sys
    from importlib import metadata

    from kl_sweep import __version__

    torch = sys.modules.get("torch")  # a process that plans or assembles never loads it for this
    return {
        "kl_sweep": __version__,
        "torch": torch.__version__ if torch is not None else metadata.version("torch"),
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
    }


def writable_dir_problem(path: Path) -> str | None:
    """Why files cannot be written under ``path`` (which may not exist yet), or None if they can.

    Checks the nearest existing ancestor with a real, invisible write: ``os.access`` says yes to
    root even on read-only file systems.
    """
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as ex:
        return f"{existing} is not writable ({ex.strerror})"
    return None


def write_parquet(frame: pd.DataFrame, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``frame`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A reader (or a rerun after a kill) sees either the old file or the whole new one, never a part.
    Each column of the results table carries its unit and meaning in its field metadata
    (:func:`kl_sweep.schema.annotate`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata(file_schema(table.schema, metadata).metadata)
    table = pa.Table.from_arrays(table.columns, schema=file_schema(table.schema, metadata))
    return _atomic_write(path, "wb", lambda handle: pq.write_table(table, handle))


def file_schema(schema: pa.Schema, metadata: dict[str, str] | None = None) -> pa.Schema:
    """``schema`` as kl_sweep writes it: each column's unit and meaning
    (:func:`kl_sweep.schema.annotate`), pandas' list columns as plain lists, and the versions that
    wrote the file (with ``metadata``) under the key ``kl_sweep``."""
    meta = dict(schema.metadata or {})
    if b"pandas" in meta:
        meta[b"pandas"] = _plain_lists(meta[b"pandas"])
    meta[b"kl_sweep"] = json.dumps({**versions(), **(metadata or {})}).encode()
    return annotate(schema).with_metadata(meta)


def write_batches(
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    path: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a stream of record batches of ``schema`` to ``path`` as one Parquet file, atomically
    (as :func:`write_parquet`), holding one batch at a time: a table of any size in bounded memory."""
    with ParquetStream(path, schema, metadata) as stream:
        for batch in batches:
            stream.write(batch)
    return stream.path


class ParquetStream:
    """A Parquet file written a batch at a time and renamed into place when closed whole.

    Until :meth:`close`, the rows go to a temporary file beside ``path``; an exception inside the
    ``with`` block (or :meth:`abort`) removes it, so ``path`` is either absent, the old file, or the
    whole new one. Each batch written becomes a row group.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = file_schema(schema, metadata)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.handle = os.fdopen(fd, "wb")
        self.writer = pq.ParquetWriter(self.handle, self.schema)
        self.rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.schema != self.schema:
            batch = batch.cast(self.schema)
        if isinstance(batch, pa.Table):
            self.writer.write_table(batch)
        else:
            self.writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> Path:
        """Finish the file, sync it and rename it to ``path``."""
        try:
            self.writer.close()
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            _publish(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; ``path`` is left as it was."""
        for close in (self.writer.close, self.handle.close):
            try:
                close()
            except Exception:  # noqa: BLE001 (already failing: the file is dropped either way)
                pass
        Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self) -> ParquetStream:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def _plain_lists(pandas_meta: bytes) -> bytes:
    """pandas' metadata with Arrow-backed list columns (``mean``, ``cov``) recorded as object
    columns: readers then get arrays per row, where ``list<...>[pyarrow]`` is a dtype that
    pandas cannot read back (pyarrow 2x, pandas 2.x)."""
    info = json.loads(pandas_meta)
    for column in info.get("columns", []):
        if str(column.get("numpy_type", "")).startswith("list<"):
            column["numpy_type"] = "object"
    return json.dumps(info).encode()


def arrow_lists(dtype: pa.DataType) -> pd.ArrowDtype | None:
    """``types_mapper`` for ``to_pandas``: list columns stay in Arrow (no object per row)."""
    return pd.ArrowDtype(dtype) if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) else None


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    return _atomic_write(Path(path), "w", lambda handle: handle.write(text))


def _atomic_write(path: Path, mode: str, write: Callable[[IO[Any]], object]) -> Path:
    """``write`` into a temporary file beside ``path``, sync it, rename it to ``path``.

    A reader (or a rerun after a kill) sees either the old file or the whole new one; a failed
    write (a full disk) leaves no temporary file behind.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _publish(tmp: str, path: Path) -> None:
    """Give the whole temporary file ``tmp`` ordinary permissions and rename it to ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
    os.replace(tmp, path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``kl_sweep`` metadata of a Parquet file written by :func:`write_parquet`."""
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw.get(b"kl_sweep", b"{}"))
