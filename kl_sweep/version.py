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
    """``<kl_sweep version>+<hash of the numerics' code and the torch version>``."""
    import torch

    from kl_sweep import __version__
    from kl_sweep.core import native

    digest = hashlib.sha256(f"torch {torch.__version__} native {native.available()}".encode())
    for path in numerics_sources():
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        if path.suffix != ".py":
            digest.update(path.read_bytes())
            continue
        tree = _NoDocstrings().visit(ast.parse(path.read_bytes(), filename=str(path)))
        digest.update(ast.dump(tree, annotate_fields=False).encode())
    return f"{__version__}+{digest.hexdigest()[:12]}"
