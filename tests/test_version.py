"""The numerics version: a hash of the code that computes rows, kept in a cache keyed by the sources'
stamps; a comment does not change it, code does, and a damaged cache file is moved aside."""

from __future__ import annotations

import re

import pytest

from kl_sweep import version


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_SWEEP_CACHE", str(tmp_path / "cache"))
    version.numerics_version.cache_clear()
    yield tmp_path / "cache"
    version.numerics_version.cache_clear()


def test_the_cached_version_is_the_computed_one_and_a_damaged_cache_file_is_moved_aside(cache):
    computed = version.numerics_version()
    files = list(cache.glob("numerics-*"))
    assert len(files) == 1 and re.fullmatch(r"[0-9a-f]{12}", files[0].read_text())
    assert computed.endswith("+" + files[0].read_text())

    files[0].write_text("not a hash")
    version.numerics_version.cache_clear()
    assert version.numerics_version() == computed  # recomputed, not read
    assert files[0].read_text() == computed.split("+")[1]
    aside = list(cache.glob("numerics-*.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text() == "not a hash"


def test_a_comment_keeps_the_digest_and_code_changes_it(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(version, "_PACKAGE", tmp_path)  # sources are named relative to the package
    source = tmp_path / "numerics.py"
    source.write_text("def f(x):\n    return 2 * x\n")
    first = version._cached_digest("head", [source])

    source.write_text("def f(x):  # twice x\n    '''Doubled.'''\n    return 2 * x\n")
    assert version._cached_digest("head", [source]) == first  # a new stamp, the same syntax tree

    source.write_text("def f(x):\n    return 3 * x\n")
    changed = version._cached_digest("head", [source])
    assert changed != first
    assert version._cached_digest("other torch", [source]) != changed
    assert len(list(cache.glob("numerics-*"))) == 4  # one cache file per stamp
