"""The numerics version: which code fitted a row, so that a resumed sweep never mixes results silently.

``numerics_version()`` is ``<kl_sweep version>+<12 hex digits>``. The digits hash the syntax trees
(comments, formatting and docstrings left out) of every module under ``kl_sweep/core/`` that
computes rows (not the continuation modules of :data:`NOT_ROW_NUMERICS`) and of
``kl_sweep/table.py`` (which turns fits into rows), the C sources of the fused kernels (as bytes)
and whether those kernels are in use (:mod:`kl_sweep.core.native`: with them off, rows differ in
their last bits), together with the torch version. Any change to the code that computes a row, or
to torch, gives a new version; editing a comment in Python does not.
Every result row carries it in the column ``numerics_version``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import time
from pathlib import Path

#: The column that records the numerics version of each row.
COLUMN = "numerics_version"
#: What a row without the column (written before the column existed) counts as.
UNKNOWN = "unknown"

_PACKAGE = Path(__file__).resolve().parent


class _NoDocstrings(ast.NodeTransformer):
    """Drops docstrings: they cannot change a result."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
        return node


#: Core modules that never compute a row (the continuation behind the exact phase structure).
NOT_ROW_NUMERICS = frozenset({"landscape.py", "continuation.py", "bifurcation.py"})


def numerics_sources() -> list[Path]:
    """The source files whose code decides a row's numbers."""
    core = [p for p in sorted((_PACKAGE / "core").rglob("*.py")) if p.name not in NOT_ROW_NUMERICS]
    return core + [_PACKAGE / "table.py", _PACKAGE / "rows.py", *sorted((_PACKAGE / "core").rglob("*.c"))]


@functools.cache
def numerics_version() -> str:
    """``<kl_sweep version>+<hash of the numerics' code and the torch version>``.

    Parsing the sources takes about 0.2 s, so the hash is kept in the kernel cache
    (:func:`kl_sweep.core.native.toolchain.build_dir`) under a stamp of the sources' paths, sizes
    and modification times (as Python keeps its bytecode): a process whose sources have not been
    touched reads it back. A cache file that does not hold a hash is moved aside, never trusted.
    """
    import torch

    from kl_sweep import __version__
    from kl_sweep.core import native

    head = f"torch {torch.__version__} native {native.available()}"
    sources = numerics_sources()
    digest = _cached_digest(head, sources)
    return f"{__version__}+{digest}"


#: A cached digest: the first 12 hex digits of the sha256.
_DIGEST = re.compile(r"[0-9a-f]{12}")


def _cached_digest(head: str, sources: list[Path]) -> str:
    from kl_sweep.core.native.toolchain import build_dir

    stamp = hashlib.sha256(head.encode())
    for path in sources:
        info = path.stat()
        stamp.update(f"{path} {info.st_size} {info.st_mtime_ns} {info.st_ino}".encode())
    cached = build_dir() / f"numerics-{stamp.hexdigest()[:16]}"
    try:
        text = cached.read_text()
    except OSError:
        text = None
    if text is not None and _DIGEST.fullmatch(text):
        return text
    digest = _digest(head, sources)
    try:
        if text is not None:  # damaged: kept for a look, not overwritten
            os.replace(cached, cached.with_name(f"{cached.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, cached)  # atomic: a reader sees the whole hash or none
    except OSError:
        pass  # a cache that cannot be written costs time, not correctness
    return digest


def _digest(head: str, sources: list[Path]) -> str:
    """The hash itself: of ``head`` and the sources' syntax trees (the C sources' bytes)."""
    digest = hashlib.sha256(head.encode())
    for path in sources:
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        if path.suffix != ".py":
            digest.update(path.read_bytes())
            continue
        tree = _NoDocstrings().visit(ast.parse(path.read_bytes(), filename=str(path)))
        digest.update(ast.dump(tree, annotate_fields=False).encode())
    return digest.hexdigest()[:12]
