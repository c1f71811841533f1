"""A sweep's configurations as typed frames, and the hash that names each one.

Plain pandas, no torch: the process that plans a sweep and assembles its table (the sweeper's, when
the shards run in workers or on other machines) does not load torch at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kl_sweep.config import NEW_KEY_DEFAULTS, OPTIONAL_ROW_KEYS, ROW_KEYS, STOCHASTIC_DEFAULTS

_DTYPES = {float: "float64", int: "int64"}


def rows_frame(columns: Mapping[str, Any], length: int | None = None) -> pd.DataFrame:
    """A batch frame with every row key, cast to its schema type (``separation=3`` is 3.0)."""
    columns = {**OPTIONAL_ROW_KEYS, **columns}  # alpha: only the alpha family has one; seed: 0
    data = {k: columns[k].to_numpy() if isinstance(columns[k], pd.Series) else columns[k] for k in ROW_KEYS}
    frame = pd.DataFrame(data, index=None if length is None else range(length))
    return frame.astype({k: _DTYPES[t] for k, t in ROW_KEYS.items()})


def config_hash_values(rows: pd.DataFrame, shared: Mapping[str, Any]) -> np.ndarray:
    """A stable 64-bit hash (uint64) per row of every key that affects its result.

    The row keys are hashed as typed columns and the shared settings as one canonical JSON string,
    with pandas' fixed-key hashing: the same configuration gets the same hash in any run, batch
    or process, which is what resuming a sweep matches on. :func:`config_hashes` writes it as text.
    The settings are those of :func:`hashed_settings`: a sweep from before ``dim`` existed keeps
    its hashes, and so resumes.
    """
    frame = rows_frame(rows, len(rows)).reset_index(drop=True)
    settings = hashed_settings(shared)
    # ``seed`` (a stochastic fit's replica) is hashed with the settings, and left out at 0: a
    # table from before it existed keeps its hashes.
    seeds, codes = np.unique(frame.pop("seed").to_numpy(), return_inverse=True)
    texts = [
        json.dumps({**settings, **({"seed": int(s)} if s else {})}, sort_keys=True, default=str)
        for s in seeds  # over the distinct seeds, a handful
    ]
    # The rows share a few settings strings: as a categorical, each string is hashed once and its
    # hash taken by code (pandas hashes a categorical as its values, so the hashes are those of a
    # plain string column; a million copies of the string cost 0.3 s).
    frame["__shared__"] = pd.Categorical.from_codes(codes.reshape(-1).astype(np.int64), texts)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def hashed_settings(shared: Mapping[str, Any]) -> dict[str, Any]:
    """The shared settings a hash covers: each key of :data:`~kl_sweep.config.NEW_KEY_DEFAULTS` is
    left out at its default (today's configurations, hashed before those keys existed, keep their
    hashes bit for bit) and kept otherwise.

    A target file stands in as the SHA-256 of its numbers (:attr:`kl_sweep.target.Target.digest`),
    not its path: the result depends on what the file says, so an edited file is fitted again on
    resume, and the same file named from another directory is the same configuration.
    """
    settings = {k: v for k, v in shared.items() if not _at_default(k, v)}
    if settings.get("target.file") is not None:
        from kl_sweep.target import load_target

        settings["target.file"] = "sha256:" + load_target(settings["target.file"]).digest
    return settings


_DEFAULTS = {**NEW_KEY_DEFAULTS, **STOCHASTIC_DEFAULTS}


def _at_default(key: str, value: Any) -> bool:
    if key not in _DEFAULTS:
        return False
    default = _DEFAULTS[key]
    if default is None or value is None or isinstance(default, bool) or isinstance(value, bool):
        return value is default
    return value == default


def config_hashes(rows: pd.DataFrame, shared: Mapping[str, Any]) -> np.ndarray:
    """The results table's ``config_hash`` of each row: its 64-bit hash as 16 hex digits."""
    return hash_text(config_hash_values(rows, shared))


def hash_text(values: np.ndarray) -> np.ndarray:
    """``"%016x"`` of each 64-bit hash, as one hex string of the big-endian bytes cut into 16-digit
    pieces (np.char.mod formats one number at a time: 1 s for a million rows, against 0.13 s)."""
    hexed = np.asarray(values, dtype=np.uint64).astype(">u8").tobytes().hex().encode()
    return np.frombuffer(hexed, dtype="S16").astype("U16")


#: What :func:`hash_text` writes.
HEX16 = "^[0-9a-f]{16}$"


def hash_values(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The 64-bit hashes (uint64) that ``config_hash`` texts stand for: :func:`hash_text` undone.

    Texts that :func:`hash_text` cannot have written (a foreign table's) are left out: no
    configuration has them. Reads the Arrow buffers directly: a million hashes take 0.1 s, where
    they take seconds as Python strings.
    """
    strings = texts.cast(pa.large_string())
    strings = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    strings = strings.filter(pc.fill_null(pc.match_substring_regex(strings, HEX16), False))
    if not len(strings):
        return np.empty(0, np.uint64)
    start = strings.offset
    offsets = np.frombuffer(strings.buffers()[1], np.int64)[start : start + len(strings) + 1]
    data = np.frombuffer(strings.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return np.frombuffer(bytes.fromhex(data.tobytes().decode("ascii")), ">u8").astype(np.uint64)
