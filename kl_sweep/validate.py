"""Every allowed range, in one place, checked on whole columns at once.

A single run checks its one value per key; a sweep checks each key's full column before any fit
starts, so one bad value among thousands stops everything with a message naming it. Some checks
span keys (``divergence.alpha`` against the divergence, ``correlation`` against ``dim``); a target
file's contents are checked by :func:`kl_sweep.target.load_target`, called from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from hydra.errors import CompactHydraException

from kl_sweep.config import (
    ALPHA_DIVERGENCES,
    DIM_MAX,
    DIRECTIONS,
    DIVERGENCE_NAMES,
    ESTIMATOR_NAMES,
    FULL_DIM_MAX,
    GRADIENTS,
    NEW_KEY_DEFAULTS,
    OPTIMIZER_NAMES,
    OPTIONAL_ROW_KEYS,
    Q_FAMILIES,
    ROW_KEYS,
    SCHEDULES,
    STOCHASTIC_DEFAULTS,
)


class ConfigError(CompactHydraException, ValueError):
    """A value outside what kl-sweep allows. Hydra prints its one-line message, no traceback."""

    def __init__(self, key: str, value: Any, allowed: str, context: str = ""):
        self.key, self.value, self.allowed, self.context = key, value, allowed, context
        where = f" ({context})" if context else ""
        super().__init__(f"kl_sweep: invalid {key}={_show(value)}{where}: allowed is {allowed}")


class UnknownKeyError(ConfigError):
    def __init__(self, key: str, value: Any):
        self.key, self.value, self.allowed, self.context = key, value, ", ".join(KNOWN_KEYS), ""
        CompactHydraException.__init__(
            self, f"kl_sweep: unknown key {key} (set to {_show(value)}): allowed keys are {self.allowed}"
        )


def _show(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, (np.generic,)):
        return repr(value.item())
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Rule:
    allowed: str
    ok: Callable[[np.ndarray], np.ndarray]


def _numeric(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, dtype=np.float64)


def _finite(
    lo: float = -np.inf, hi: float = np.inf, lo_open: bool = False, hi_open: bool = False
) -> Callable:
    def ok(v: np.ndarray) -> np.ndarray:
        x = _numeric(v)
        above = x > lo if lo_open else x >= lo
        below = x < hi if hi_open else x <= hi
        return np.isfinite(x) & above & below

    return ok


def _integer(lo: int, hi: int) -> Callable:
    """Whole numbers in [lo, hi], compared exactly: float64 cannot tell 2**63 from 2**63 - 1."""

    def ok(v: np.ndarray) -> np.ndarray:
        column = np.asarray(v, dtype=object)
        x = _numeric(column)
        whole = np.isfinite(x) & (x == np.round(x))
        try:
            exact = column.astype(np.int64)
        except (OverflowError, ValueError, TypeError):  # beyond int64: judge value by value
            return np.array([bool(w) and lo <= int(c) <= hi for w, c in zip(whole, column)], dtype=bool)
        with np.errstate(invalid="ignore"):
            in_range = (exact >= lo) & (exact <= hi) & ~(np.abs(x) > 2.0**63)
        return whole & in_range

    return ok


def _choice(options: tuple[str, ...]) -> Rule:
    return Rule("one of " + ", ".join(options), lambda v: np.isin(np.asarray(v, dtype=object), options))


def _path_or_null(v: np.ndarray) -> np.ndarray:
    """null, or text that is not blank (whether a file is there is :func:`_check_target`'s)."""
    return np.array([x is None or (isinstance(x, str) and bool(x.strip())) for x in v], dtype=bool)


RULES: dict[str, Rule] = {
    "separation": Rule("a finite number >= 0", _finite(0.0)),
    "weight": Rule("a number strictly between 0 and 1", _finite(0.0, 1.0, lo_open=True, hi_open=True)),
    "center": Rule("a finite number", _finite()),
    "component_var": Rule("a finite number > 0", _finite(0.0, lo_open=True)),
    "init_mu": Rule("a finite number", _finite()),
    "init_sigma2": Rule("a finite number > 0", _finite(0.0, lo_open=True)),
    "dim": Rule(f"an integer from 1 to {DIM_MAX}", _integer(1, DIM_MAX)),
    # correlation: its range depends on dim (_check_correlation)
    "direction": _choice(DIRECTIONS),
    "q_family": _choice(Q_FAMILIES),
    "target.file": Rule("null or the path of a YAML target file", _path_or_null),
    "divergence.name": _choice(DIVERGENCE_NAMES),
    "estimator.name": _choice(ESTIMATOR_NAMES),
    "estimator.nodes_per_panel": Rule("an integer from 2 to 64", _integer(2, 64)),
    "estimator.num_points": Rule("an integer from 3 to 1000000", _integer(3, 1_000_000)),
    "estimator.num_samples": Rule("an integer from 1 to 10000000", _integer(1, 10_000_000)),
    "estimator.seed": Rule("an integer from 0 to 2**63 - 1", _integer(0, 2**63 - 1)),
    "estimator.resample": Rule("true or false", lambda v: np.array([x is True or x is False for x in v])),
    "estimator.gradient": _choice(GRADIENTS),
    "seed": Rule("an integer from 0 to 2**63 - 1", _integer(0, 2**63 - 1)),
    "optimizer.schedule": _choice(SCHEDULES),
    "optimizer.decay": Rule("a number in (0.5, 1] (Robbins-Monro)", _finite(0.5, 1.0, lo_open=True)),
    "optimizer.decay_steps": Rule("a finite number > 0 (steps)", _finite(0.0, lo_open=True)),
    "optimizer.average": Rule("a fraction of the steps in (0, 1]", _finite(0.0, 1.0, lo_open=True)),
    "optimizer.name": _choice(OPTIMIZER_NAMES),
    "optimizer.lr": Rule("a finite number > 0", _finite(0.0, lo_open=True)),
    "optimizer.max_steps": Rule("an integer from 1 to 10000000", _integer(1, 10_000_000)),
    "optimizer.tol": Rule("a finite number > 0", _finite(0.0, lo_open=True)),
    "optimizer.beta1": Rule("a number in [0, 1)", _finite(0.0, 1.0, hi_open=True)),
    "optimizer.beta2": Rule("a number in [0, 1)", _finite(0.0, 1.0, hi_open=True)),
    "optimizer.eps": Rule("a finite number > 0", _finite(0.0, lo_open=True)),
    "optimizer.momentum": Rule("a number in [0, 1)", _finite(0.0, 1.0, hi_open=True)),
}


#: The keys every configuration needs (``~separation`` would delete one).
REQUIRED_KEYS = (
    *(k for k in ROW_KEYS if k not in OPTIONAL_ROW_KEYS),
    "divergence.alpha",
    "polish",
    "divergence.name",
    "estimator.name",
    "optimizer.name",
    *NEW_KEY_DEFAULTS,
)
#: Every key a configuration may have (flattened); anything else, such as ``+colour=red``, is refused.
KNOWN_KEYS = tuple(sorted({*RULES, "polish", "divergence.alpha", "correlation"}))
assert set(STOCHASTIC_DEFAULTS) <= set(RULES)
#: ``divergence.alpha`` per divergence that takes one (checked in :func:`_check_alpha`).
ALPHA_RULES: dict[str, Rule] = {
    "alpha": Rule("a finite number (any real order; 0 and 1 are the KL limits)", _finite()),
    "renyi": Rule("a finite number > 0 (1 is the KL(Q||P) limit)", _finite(0.0, lo_open=True)),
}
assert set(ALPHA_RULES) == set(ALPHA_DIVERGENCES)


def validate(values: Mapping[str, Any], context: Callable[[str, Any], str] | None = None) -> None:
    """Check every key of ``values`` that has a rule; each value may be a scalar or a column.

    Raises :class:`ConfigError` for the first bad value, naming the key, the value and the range;
    ``context(key, value)`` may add where the value came from (the override, in a sweep).
    """
    for key in REQUIRED_KEYS:
        if key not in values:
            raise ConfigError(key, "<deleted>", "a value: this key cannot be removed")
    for key, value in values.items():
        if key not in KNOWN_KEYS:
            shown = np.atleast_1d(np.asarray(value, dtype=object))[0]
            raise UnknownKeyError(key, shown)
    for key, rule in RULES.items():
        if key not in values:
            continue
        column = np.atleast_1d(np.asarray(values[key], dtype=object))
        try:
            good = np.asarray(rule.ok(column), dtype=bool)
        except (TypeError, ValueError):
            good = np.array([_scalar_ok(rule, v) for v in column], dtype=bool)
        if not good.all():
            bad = column[int(np.argmin(good))]
            raise ConfigError(key, bad, rule.allowed, context(key, bad) if context else "")
    _check_alpha(values, context)
    _check_correlation(values, context)
    _check_full_dim(values, context)
    _check_target(values, context)
    _check_stochastic(values, context)


def _check_stochastic(values: Mapping[str, Any], context: Callable[[str, Any], str] | None) -> None:
    """The keys of a stochastic fit need one (``estimator=mc estimator.resample=true``), in d = 1."""
    resample = values.get("estimator.resample", False) is True
    if resample:
        dims = np.atleast_1d(np.asarray(values.get("dim", 1), dtype=object))
        if (_numeric(dims) != 1).any():
            value = dims[int(np.argmax(_numeric(dims) != 1))]
            allowed = "1 with estimator.resample=true (stochastic fits run on the line)"
            raise ConfigError("dim", value, allowed, context("dim", value) if context else "")
        names = np.atleast_1d(np.asarray(values.get("divergence.name"), dtype=object))
        if values.get("estimator.gradient") == "stl" and (names != "reverse").any():
            allowed = (
                "reparam with this divergence: stl (its score term has mean zero) is for divergence=reverse"
            )
            value = f"stl with divergence={names[int(np.argmax(names != 'reverse'))]}"
            raise ConfigError(
                "estimator.gradient", value, allowed, context("estimator.gradient", "stl") if context else ""
            )
        return
    needs = "applies to stochastic fits only: set estimator=mc estimator.resample=true"
    seeds = np.atleast_1d(np.asarray(values.get("seed", 0), dtype=object))
    if (seeds != 0).any():
        bad = seeds[int(np.argmax(seeds != 0))]
        raise ConfigError("seed", bad, f"0: a replica seed {needs}", context("seed", bad) if context else "")
    for key in ("estimator.gradient", "optimizer.schedule", "optimizer.average"):
        value = values.get(key, STOCHASTIC_DEFAULTS[key])
        if value != STOCHASTIC_DEFAULTS[key]:
            allowed = f"{STOCHASTIC_DEFAULTS[key]!r} (the default): {key} {needs}"
            raise ConfigError(key, value, allowed, context(key, value) if context else "")


def _check_alpha(values: Mapping[str, Any], context: Callable[[str, Any], str] | None) -> None:
    """``divergence.alpha``: required by the divergences that take one, refused by every other."""
    names = np.atleast_1d(np.asarray(values.get("divergence.name"), dtype=object))
    column = np.atleast_1d(np.asarray(values.get("divergence.alpha"), dtype=object))
    for name in dict.fromkeys(names.tolist()):  # the few divergence names, not the rows
        rows = column if len(names) == 1 else column[names == name]
        if name in ALPHA_RULES:
            rule = ALPHA_RULES[name]
            good = np.array([v is not None and _scalar_ok(rule, v) for v in rows], dtype=bool)
            allowed = f"{rule.allowed} for divergence={name}"
        else:
            good = np.array([v is None for v in rows], dtype=bool)
            allowed = (
                f"no value: divergence={name} has no alpha (only {' and '.join(ALPHA_DIVERGENCES)} take one)"
            )
        if not good.all():
            bad = rows[int(np.argmin(good))]
            raise ConfigError(
                "divergence.alpha", bad, allowed, context("divergence.alpha", bad) if context else ""
            )


def _check_correlation(values: Mapping[str, Any], context: Callable[[str, Any], str] | None) -> None:
    """``correlation`` rho against ``dim`` d (already checked): R = (1 - rho) I + rho 1 1^T is positive
    definite, its eigenvalues 1 - rho and 1 + (d - 1) rho both > 0, for -1/(d - 1) < rho < 1."""
    if "correlation" not in values:
        return
    rho = np.atleast_1d(np.asarray(values["correlation"], dtype=object))
    dims = np.atleast_1d(np.asarray(values.get("dim", 1), dtype=object))
    rho, dims = np.broadcast_arrays(rho, dims)  # shared keys: one value each, or columns of a batch
    try:
        x, d = _numeric(rho), _numeric(dims)
    except (TypeError, ValueError):  # text where a number belongs: judge value by value
        x = np.array([_float_or_nan(v) for v in rho])
        d = _numeric(dims)
    lower = np.where(d > 1, -1.0 / np.maximum(d - 1.0, 1.0), -np.inf)
    good = np.isfinite(x) & (x < 1.0) & (x > lower)
    if not good.all():
        i = int(np.argmin(good))
        bad, dim = rho[i], int(dims[i])
        lowest = "-1" if dim == 2 else f"-1/{dim - 1}"
        interval = "a finite number < 1" if dim == 1 else f"a number in the open interval ({lowest}, 1)"
        allowed = f"{interval} for dim={dim} (R = (1 - rho) I + rho 1 1^T must be positive definite)"
        raise ConfigError("correlation", bad, allowed, context("correlation", bad) if context else "")


def _check_full_dim(values: Mapping[str, Any], context: Callable[[str, Any], str] | None) -> None:
    """``dim`` at most :data:`~kl_sweep.config.FULL_DIM_MAX` with ``q_family=full``."""
    dims = np.atleast_1d(np.asarray(values.get("dim", 1), dtype=object))
    families = np.atleast_1d(np.asarray(values.get("q_family", "full"), dtype=object))
    dims, families = np.broadcast_arrays(dims, families)
    bad = (families == "full") & (_numeric(dims) > FULL_DIM_MAX)
    if bad.any():
        value = dims[int(np.argmax(bad))]
        allowed = f"an integer from 1 to {FULL_DIM_MAX} with q_family=full (diag and iso go to {DIM_MAX})"
        raise ConfigError("dim", value, allowed, context("dim", value) if context else "")


def _check_target(values: Mapping[str, Any], context: Callable[[str, Any], str] | None) -> None:
    """Read and check every target file named (once per file and dim; a sweep's groups share one)."""
    from kl_sweep.target import load_target  # here: kl_sweep.target raises this module's ConfigError

    files = np.atleast_1d(np.asarray(values.get("target.file"), dtype=object))
    dims = np.atleast_1d(np.asarray(values.get("dim", 1), dtype=object))
    files, dims = np.broadcast_arrays(files, dims)
    for file, dim in dict.fromkeys(zip(files.tolist(), dims.tolist())):
        if file is None:
            continue
        try:
            load_target(file, int(dim))
        except ConfigError as ex:
            if not context:
                raise
            where = "; ".join(c for c in (ex.context, context("target.file", file)) if c)
            raise ConfigError(ex.key, ex.value, ex.allowed, where) from None


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _scalar_ok(rule: Rule, value: Any) -> bool:
    try:
        return bool(rule.ok(np.array([value]))[0])
    except (TypeError, ValueError):
        return False
