"""A general mixture target P read from a YAML file (``target.file=PATH``).

The file holds ``weights`` (K numbers), ``means`` (K lists of d numbers) and ``covs`` (K d x d
matrices); ``conf/targets/example.yaml`` is a documented example. :func:`load_target` checks all of
it before any fit starts, so every defect is one :class:`~kl_sweep.validate.ConfigError` naming
``target.file``, the path, what is wrong and what is allowed (exit status 2, nothing written).

Plain numpy and PyYAML, no torch: the sweeper's own process validates and hashes targets too.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from kl_sweep.validate import ConfigError

KEY = "target.file"
FILE_KEYS = ("weights", "means", "covs")
#: How far a covariance may be from symmetric, relative to its largest entry (rounding in a file).
SYMMETRY_RTOL = 1e-12
#: How far the weights' sum may be from 1.
WEIGHT_SUM_TOL = 1e-12
#: Where a relative path is looked for when the working directory does not have it: the repository
#: (the parent of ``conf/``), so the shipped ``conf/targets/example.yaml`` works from any directory.
REPO_DIR = Path(__file__).resolve().parent.parent

#: A number written as text: PyYAML (YAML 1.1) reads ``1e-3`` (no dot) as a string, not a float.
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_FORMAT = "a YAML mapping with exactly the keys weights (K numbers), means (K x d) and covs (K x d x d)"
_FILE = (
    "null or the path of a readable YAML target file "
    "(a relative path is read from the working directory, else from the repository)"
)


@dataclass(frozen=True, eq=False)
class Target:
    """P = sum_k weights[k] N(means[k], covs[k]): float64 arrays, read-only, already checked."""

    weights: np.ndarray  # [K], each > 0, summing to 1 within 1e-12
    means: np.ndarray  # [K, d]
    covs: np.ndarray  # [K, d, d], each symmetric positive definite

    @property
    def dim(self) -> int:
        """d, the dimension of the target's space."""
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        """K, the number of components."""
        return int(self.weights.shape[0])

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the numbers (shapes and float64 bytes), not of the file's text: the same
        target hashes the same under any path, layout or comments, and an edited one differently."""
        h = hashlib.sha256()
        for array in (self.weights, self.means, self.covs):
            h.update(repr(array.shape).encode())
            h.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return h.hexdigest()


def resolve(path: str) -> Path:
    """The file ``path`` names. A relative path is read from Hydra's original working directory
    (where the command ran, whatever ``hydra.job.chdir`` says) or, outside Hydra, the current
    one; when nothing is there, from the repository, so ``conf/targets/...`` works anywhere."""
    from hydra.utils import to_absolute_path

    given = Path(os.path.expanduser(path))
    if given.is_absolute():
        return given
    here = Path(to_absolute_path(str(given)))
    if here.exists():
        return here
    in_repo = REPO_DIR / given
    return in_repo if in_repo.exists() else here


def load_target(path: str, dim: int | None = None) -> Target:
    """Read and check the target file at ``path``; with ``dim``, its d must equal ``dim``.

    Raises :class:`~kl_sweep.validate.ConfigError` (key ``target.file``, the path as given) for a
    missing or unreadable file, malformed YAML, missing or unknown keys, entries that are not finite
    numbers, shapes that disagree with each other or with ``dim``, weights not all > 0 or not
    summing to 1 within 1e-12, and covariances not symmetric (1e-12 relative) positive definite.
    A file unchanged since it was last read is not read again.
    """
    if not isinstance(path, str) or not path.strip():
        _fail(path, _FILE, "not a path")
    file = resolve(path)
    try:
        stat = file.stat()
    except OSError as ex:
        _fail(path, _FILE, f"no file {file}" if isinstance(ex, FileNotFoundError) else _os_problem(file, ex))
    if not file.is_file():
        _fail(path, _FILE, f"{file} is not a file")
    target = _load(path, str(file), stat.st_mtime_ns, stat.st_size)
    if dim is not None and target.dim != dim:
        _fail(
            path,
            f"a target with d = dim: set dim={target.dim} for this file",
            f"its target is {target.dim}-D, dim is {dim}",
        )
    return target


@functools.lru_cache(maxsize=64)
def _load(path: str, file: str, mtime_ns: int, size: int) -> Target:
    """The checked target of ``file`` as it was at (mtime_ns, size): sweeps read it once a group."""
    import yaml

    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as ex:
        _fail(path, _FORMAT, f"{file} is not UTF-8 text (byte {ex.start})")
    except OSError as ex:
        _fail(path, _FILE, _os_problem(Path(file), ex))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as ex:
        _fail(path, _FORMAT, f"not valid YAML: {_yaml_problem(ex)}")
    if not isinstance(data, dict):
        _fail(path, _FORMAT, f"the file holds {_kind(data)}, not a mapping")
    unknown = [str(k) for k in data if k not in FILE_KEYS]
    if unknown:
        _fail(path, _FORMAT, f"unknown key {unknown[0]!r}")
    for key in FILE_KEYS:
        if key not in data:
            _fail(path, _FORMAT, f"no key {key}")
    weights = _numbers(path, "weights", data["weights"], depth=1)
    means = _numbers(path, "means", data["means"], depth=2)
    covs = _numbers(path, "covs", data["covs"], depth=3)
    _check_shapes(path, weights, means, covs)
    _check_weights(path, weights)
    for k, cov in enumerate(covs):
        _check_cov(path, k, cov)
    for array in (weights, means, covs):
        array.setflags(write=False)
    return Target(weights=weights, means=means, covs=covs)


def _numbers(path: str, name: str, node: Any, depth: int) -> np.ndarray:
    """``node`` as a float64 array of ``depth`` nested lists of equal lengths and finite numbers."""
    shape_words = {1: "a list of K numbers", 2: "K lists of d numbers", 3: "K lists of d lists of d numbers"}
    allowed = f"{name} as {shape_words[depth]} (finite numbers, equal lengths)"
    shape: list[int | None] = [None] * depth
    numbers: list[float] = []

    def walk(item: Any, level: int, where: str) -> None:
        if level == depth:
            value = _number(item)
            if value is None:
                _fail(path, allowed, f"{where} is {_kind(item)}, not a number")
            if not math.isfinite(value):
                _fail(path, allowed, f"{where} is {value}, not a finite number")
            numbers.append(value)
            return
        if not isinstance(item, list):
            _fail(path, allowed, f"{where} is {_kind(item)}, not a list")
        if not item:
            _fail(path, allowed, f"{where} is an empty list")
        if shape[level] is None:
            shape[level] = len(item)
        elif len(item) != shape[level]:
            entries = f"{len(item)} entr{'y' if len(item) == 1 else 'ies'}"
            _fail(path, allowed, f"{where} has {entries} where the first has {shape[level]}")
        for i, sub in enumerate(item):
            walk(sub, level + 1, f"{where}[{i}]")

    walk(node, 0, name)
    return np.array(numbers, dtype=np.float64).reshape([int(n) for n in shape])


def _number(item: Any) -> float | None:
    """``item`` as a float: YAML numbers, and text such as ``1e-3`` that YAML 1.1 leaves a string;
    None for anything else (booleans too). Integers beyond float64 become inf (then refused)."""
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        try:
            return float(item)
        except OverflowError:
            return math.inf
    if isinstance(item, float):
        return item
    if isinstance(item, str) and _NUMBER_TEXT.fullmatch(item.strip()):
        return float(item)
    return None


def _check_shapes(path: str, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> None:
    k, d = means.shape
    if len(weights) != k or len(covs) != k:
        _fail(
            path,
            "one weight, mean and covariance per component (K of each)",
            f"{len(weights)} weights, {k} means and {len(covs)} covs",
        )
    if covs.shape[1:] != (d, d):
        _fail(
            path,
            f"each covs[k] a d x d matrix, d = {d} the length of each mean",
            f"the means are {d}-D and the covs {covs.shape[1]} x {covs.shape[2]}",
        )


def _check_weights(path: str, weights: np.ndarray) -> None:
    allowed = f"weights all > 0 summing to 1 (within {WEIGHT_SUM_TOL:g})"
    if not (weights > 0).all():
        k = int(np.argmin(weights > 0))
        _fail(path, allowed, f"weights[{k}] is {float(weights[k])!r}")
    total = math.fsum(weights.tolist())
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        _fail(path, allowed, f"the weights sum to {total!r}")


def _check_cov(path: str, k: int, cov: np.ndarray) -> None:
    """Symmetric within :data:`SYMMETRY_RTOL` of its largest entry, and positive definite: every
    eigenvalue above numpy's rank tolerance (d * eps * the largest), so a singular matrix that
    rounding leaves a hair above 0 is refused too, and the Cholesky factorisation succeeds."""
    allowed = f"each covs[k] symmetric (within {SYMMETRY_RTOL:g} relative) and positive definite"
    scale = float(np.abs(cov).max())
    gap = np.abs(cov - cov.T)
    if gap.max() > SYMMETRY_RTOL * scale:
        i, j = np.unravel_index(int(np.argmax(gap)), gap.shape)
        upper, lower = cov[i, j].item(), cov[j, i].item()
        _fail(path, allowed, f"covs[{k}] is not symmetric: [{i}][{j}] is {upper!r}, [{j}][{i}] {lower!r}")
    eig = np.linalg.eigvalsh(0.5 * (cov + cov.T))
    floor = len(cov) * np.finfo(np.float64).eps * max(float(np.abs(eig).max()), 0.0)
    positive = eig.min() > floor
    if positive:
        try:
            np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            positive = False
    if not positive:
        smallest = f"{float(eig.min()):.6g}"
        _fail(path, allowed, f"covs[{k}] is not positive definite: its smallest eigenvalue is {smallest}")


def _kind(value: Any) -> str:
    if value is None:
        return "null (empty)"
    if isinstance(value, str):
        shown = value if len(value) <= 20 else value[:17] + "..."
        return f"the text {shown!r}"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    return {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _yaml_problem(ex: Exception) -> str:
    """One line for a YAML error: what is wrong and where (PyYAML's own message has several)."""
    problem = getattr(ex, "problem", None) or str(ex).strip().splitlines()[0]
    mark = getattr(ex, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _os_problem(file: Path, ex: OSError) -> str:
    return f"{file} cannot be read ({ex.strerror or type(ex).__name__})"


def _fail(path: Any, allowed: str, problem: str) -> NoReturn:
    raise ConfigError(KEY, path, allowed, " ".join(problem.split()))  # one line, whatever the text held
