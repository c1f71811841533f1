"""Structured configs: the types of every key, registered in Hydra's ConfigStore.

The YAML files in ``conf/`` choose values; these dataclasses say what type each key has, so Hydra
rejects ``separation=abc`` while composing. Ranges are checked in :mod:`kl_sweep.validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

#: The repository's ``conf/``, found from this file so the app runs from any working directory.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
#: The divergences :mod:`kl_sweep.core.divergences` implements (checked there).
DIVERGENCE_NAMES = ("forward", "reverse", "hellinger", "alpha", "chi2", "renyi", "jensen_shannon")
#: The divergences that take a parameter ``divergence.alpha`` (every other one refuses it).
ALPHA_DIVERGENCES = ("alpha", "renyi")
ESTIMATOR_NAMES = ("quadrature", "grid", "mc")
OPTIMIZER_NAMES = ("adam", "sgd")
#: The largest ``dim``. The issue's benchmarks go to d = 50; at d = 64 a full-covariance Q already
#: has d + d(d+1)/2 = 2,144 parameters a row and its Newton polish a Hessian of 4.6 million entries.
DIM_MAX = 64
#: The largest ``dim`` for ``q_family=full``: its Newton polish solves a P x P system a row, P =
#: d + d(d+1)/2 (230 at d = 20), so its cost grows like d^6; d = 20 fits a few configurations a second.
FULL_DIM_MAX = 20
#: The direction u of the separation: ``axis`` is e_1, ``diagonal`` is the ones vector / sqrt(d).
DIRECTIONS = ("axis", "diagonal")
#: The families of Q. Kept equal to :data:`kl_sweep.core.gaussians.FAMILY_NAMES` by a test: the
#: config must not import the core (torch) just to list three names.
Q_FAMILIES = ("full", "diag", "iso")
#: The keys of issue 21 (d dimensions) with their defaults. A key at its default is left out of a
#: row's ``config_hash`` (:func:`kl_sweep.rows.config_hash_values`): 1-D sweeps keep their hashes.
NEW_KEY_DEFAULTS: dict[str, Any] = {
    "dim": 1,
    "correlation": 0.0,
    "direction": "axis",
    "q_family": "full",
    "target.file": None,
}
#: Issue 25's keys (stochastic VI) with their defaults. Like :data:`NEW_KEY_DEFAULTS`, a key at its
#: default is left out of a row's hash, but none is required: the ``estimator.*`` ones exist for
#: ``estimator=mc`` only.
STOCHASTIC_DEFAULTS: dict[str, Any] = {
    "estimator.resample": False,
    "estimator.gradient": "reparam",
    "optimizer.schedule": "constant",
    "optimizer.decay": 0.6,
    "optimizer.decay_steps": 100.0,
    "optimizer.average": 0.5,
}
#: Gradient estimators of a stochastic fit: the plain reparameterisation gradient, and "sticking
#: the landing" (Roeder, Wu and Duvenaud 2017: the score term of log q dropped).
GRADIENTS = ("reparam", "stl")
#: Learning-rate schedules of a stochastic fit: lr, or lr (1 + t / decay_steps)^-decay.
SCHEDULES = ("constant", "robbins_monro")


@dataclass
class DivergenceConf:
    name: str = "forward"  # forward = KL(P||Q) (mass-covering), reverse = KL(Q||P) (mode-seeking)
    alpha: float | None = None  # the order of the alpha and renyi divergences (a row key); None for others


@dataclass
class QuadratureConf:
    name: str = "quadrature"  # composite Gauss-Legendre on P's and Q's scales, refined at mode switches
    nodes_per_panel: int = 6  # Gauss-Legendre nodes on each panel (6 keeps 1e-9 nats)


@dataclass
class GridConf:
    name: str = "grid"  # trapezoid rule on an even grid over P's and Q's mass
    num_points: int = 4001  # grid points


@dataclass
class MonteCarloConf:
    name: str = "mc"  # reparameterised Monte Carlo with common random numbers
    num_samples: int = 4096  # draws per expectation (per step when resample is true)
    seed: int = 0  # seed of the fixed draws: same seed, same results
    resample: bool = False  # true: fresh draws every step (stochastic VI, as Pyro's SVI runs)
    gradient: str = "reparam"  # with resample: reparam, or stl (sticking the landing: no score term)


@dataclass
class FirstOrderConf:
    name: str = MISSING  # the update rule
    lr: float = 0.05  # learning rate
    max_steps: int = 5000  # step budget, Newton polish steps included
    tol: float = 1e-8  # converged when |grad| in (mu, log sigma) is at most this
    schedule: str = "constant"  # stochastic fits: constant, or robbins_monro lr (1 + t/decay_steps)^-decay
    decay: float = 0.6  # robbins_monro's exponent, in (0.5, 1]
    decay_steps: float = 100.0  # robbins_monro's time scale t0, in steps (> 0)
    average: float = 0.5  # stochastic fits: Polyak-Ruppert average over this last fraction of the steps


@dataclass
class AdamConf(FirstOrderConf):
    name: str = "adam"
    beta1: float = 0.9  # decay of the first-moment estimate
    beta2: float = 0.999  # decay of the second-moment estimate
    eps: float = 1e-8  # added to the root second moment


@dataclass
class SGDConf(FirstOrderConf):
    name: str = "sgd"
    lr: float = 0.01  # learning rate
    momentum: float = 0.9  # heavy-ball momentum


@dataclass
class TargetConf:
    """A general mixture P from a file. When ``file`` is set its target is P: separation, weight,
    center, component_var, correlation and direction are then ignored, and ``dim`` must be its d."""

    file: str | None = None  # YAML of weights (K), means (K x d), covs (K x d x d): conf/targets/example.yaml


@dataclass
class KLSweepConfig:
    separation: float = 3.0  # distance between P's two means (along direction u)
    weight: float = 0.75  # weight of the component at center - separation/2 (times u)
    center: float = 0.0  # midpoint of P's means (center times the ones vector)
    component_var: float = 1.0  # variance of each component of P (times R in d dimensions)
    init_mu: float = 1.0  # starting mean of Q (init_mu times u)
    init_sigma2: float = 1.0  # starting variance of Q (init_sigma2 times I)
    polish: bool = True  # Newton polish once the optimiser has chosen its basin
    seed: int = 0  # replica of a stochastic fit (estimator.resample=true): a row key, 0, 1, 2, ...
    dim: int = 1  # the dimension d of P and Q, 1 to DIM_MAX
    correlation: float = 0.0  # rho of each component's covariance component_var * ((1 - rho) I + rho 1 1^T)
    direction: str = "axis"  # u, along which the means lie: axis (e_1) or diagonal (1 / sqrt(d) each)
    q_family: str = "full"  # Q's covariance: full (L L^T), diag (mean-field) or iso (sigma^2 I)
    target: TargetConf = field(default_factory=TargetConf)  # a general mixture P from a file
    shard: str | None = None  # set by the kl_sweep sweeper: fit the rows of this shard file
    divergence: Any = MISSING
    estimator: Any = MISSING
    optimizer: Any = MISSING


#: The keys that may differ from row to row inside one batched fit, with their types. Any other
#: key (group choices, estimator and optimiser hyperparameters, the keys of
#: :data:`NEW_KEY_DEFAULTS`) is shared by a whole batch: a sweep composes once per combination.
ROW_KEYS: dict[str, type] = {
    "divergence.alpha": float,
    "separation": float,
    "weight": float,
    "center": float,
    "component_var": float,
    "init_mu": float,
    "init_sigma2": float,
    "optimizer.lr": float,
    "optimizer.max_steps": int,
    "optimizer.tol": float,
    "seed": int,
}
#: Row keys a row may lack, with the value it then has. ``seed`` is hashed with the settings, and
#: left out at 0 (:func:`kl_sweep.rows.config_hash_values`): rows from before it keep their hashes.
OPTIONAL_ROW_KEYS: dict[str, Any] = {"divergence.alpha": None, "seed": 0}


#: Keys that steer a run but cannot change a result: left out of the values (and the hash).
NON_RESULT_KEYS = frozenset({"shard"})


def config_values(cfg: DictConfig) -> dict[str, Any]:
    """Every key that affects a result, flattened to dotted names (``optimizer.lr``)."""
    # Resolve node by node, leaving out ``hydra`` (its job fields are unset while a sweep plans).
    container = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg.keys()
        if key != "hydra" and key not in NON_RESULT_KEYS
    }
    return _flatten(container)


def _flatten(node: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def split_values(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(row values, shared values): the keys that may vary inside a batch, and the rest."""
    rows = {k: v for k, v in values.items() if k in ROW_KEYS}
    shared = {k: v for k, v in values.items() if k not in ROW_KEYS}
    return rows, shared


#: The schema of each choice of each config group.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "estimator": {"quadrature": QuadratureConf, "grid": GridConf, "mc": MonteCarloConf},
    "optimizer": {"adam": AdamConf, "sgd": SGDConf},
}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="kl_sweep_schema", node=KLSweepConfig)
    cs.store(group="schema/divergence", name="divergence", node=DivergenceConf)
    for group, choices in GROUP_SCHEMAS.items():
        for name, node in choices.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


register_configs()
