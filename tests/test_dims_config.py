"""Issue 21 (d dimensions), the configuration side: the keys dim, correlation, direction, q_family
and target.file, their validation, the target file's loader, and hashes that 1-D sweeps keep.

Bad input runs the command line as a user does, in subprocesses started two at a time by one
module-scoped fixture (as tests/test_hardening.py does); each test then checks one result. Nothing
here fits a d > 1 row: planning and validation come before any fit, and are what is tested.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from kl_sweep.config import (
    CONFIG_DIR,
    DIM_MAX,
    DIRECTIONS,
    NEW_KEY_DEFAULTS,
    Q_FAMILIES,
    ROW_KEYS,
    STOCHASTIC_DEFAULTS,
    config_values,
    split_values,
)
from kl_sweep.rows import config_hash_values, config_hashes, hash_text, hashed_settings, rows_frame
from kl_sweep.target import load_target
from kl_sweep.validate import KNOWN_KEYS, ConfigError, validate

EXAMPLE = "conf/targets/example.yaml"
HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
JOBS = 2  # subprocesses at a time: the machine has two cores


# ----------------------------------------------------------------------------------------------
# Helpers: the same as tests/test_hardening.py's, written out so this module does not import the
# fit (kl_sweep.table) just to run the command line.
# ----------------------------------------------------------------------------------------------


def env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}}


def kl_sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "kl_sweep", *map(str, args)]


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)


def run_all(commands: dict[str, tuple[list[str], Path]]) -> dict[str, subprocess.CompletedProcess]:
    """Run ``{name: (cmd, cwd)}``, ``JOBS`` at a time."""
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {name: pool.submit(run, cmd, cwd) for name, (cmd, cwd) in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and line.strip() != HINT]


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def values_of(*overrides: str) -> dict:
    """The flattened values of the config with ``overrides`` (a fresh dict: callers change it)."""
    return dict(_values(overrides))


@functools.cache
def _values(overrides: tuple[str, ...]) -> dict:
    return config_values(composed(*overrides))


def plan(*args: str):
    """The kl_sweep sweeper's plan of ``python -m kl_sweep -m ARGS``, made in this process."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    from kl_sweep.cli import ensure_plugin_discoverable

    ensure_plugin_discoverable()
    from hydra_plugins.kl_sweep_sweeper._core import make_plan, parse_overrides

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONFIG_DIR))
    config = loader.load_configuration("config", overrides=list(args), run_mode=RunMode.MULTIRUN)
    return make_plan(loader, config, parse_overrides({}, list(args), loader))


# ----------------------------------------------------------------------------------------------
# Target files with one defect each (a 2-D target unless said otherwise).
# ----------------------------------------------------------------------------------------------

TWO_ROUND = "covs: [[[1, 0], [0, 1]], [[1, 0], [0, 1]]]\n"
GOOD_2D = "weights: [0.25, 0.75]\nmeans: [[0, 0], [1, 2]]\ncovs: [[[1, 0.5], [0.5, 2]], [[1, 0], [0, 1]]]\n"
ONE_ROUND = "weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1, 0], [0, 1]]]\n"
TARGET_FILES = {
    "good.yaml": GOOD_2D,
    "malformed.yaml": "weights: [0.5, 0.5\nmeans: [[0, 0]]\n",
    "list.yaml": "- 1\n- 2\n",
    "empty.yaml": "",
    "no_covs.yaml": "weights: [1]\nmeans: [[0, 0]]\n",
    "unknown_key.yaml": ONE_ROUND + "colour: red\n",
    "text.yaml": "weights: [1]\nmeans: [[0, abc]]\ncovs: [[[1, 0], [0, 1]]]\n",
    "boolean.yaml": "weights: [true]\nmeans: [[0, 0]]\ncovs: [[[1, 0], [0, 1]]]\n",
    "nan.yaml": "weights: [1]\nmeans: [[.nan, 0]]\ncovs: [[[1, 0], [0, 1]]]\n",
    "huge.yaml": "weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1e400, 0], [0, 1]]]\n",
    "empty_weights.yaml": "weights: []\nmeans: [[0, 0]]\ncovs: [[[1, 0], [0, 1]]]\n",
    "ragged.yaml": "weights: [0.5, 0.5]\nmeans: [[0, 0], [1]]\ncovs: [[[1, 0], [0, 1]], [[1, 0], [0, 1]]]\n",
    "k_mismatch.yaml": "weights: [0.5, 0.5]\nmeans: [[0, 0]]\ncovs: [[[1, 0], [0, 1]]]\n",
    "d_mismatch.yaml": "weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]\n",
    "asymmetric.yaml": "weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1, 0.5], [0.4, 1]]]\n",
    "not_pd.yaml": "weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1, 2], [2, 1]]]\n",
    "singular.yaml": "weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1, 1], [1, 1]]]\n",
    "zero_weight.yaml": "weights: [0, 1]\nmeans: [[0, 0], [1, 1]]\n" + TWO_ROUND,
    "sum.yaml": "weights: [0.5, 0.500000001]\nmeans: [[0, 0], [1, 1]]\n" + TWO_ROUND,
}


def write_targets(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in TARGET_FILES.items():
        (folder / name).write_text(text)
    (folder / "latin1.yaml").write_bytes(b"weights: [1] # \xe9t\xe9\n")
    (folder / "a_dir.yaml").mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> Path:
    return write_targets(tmp_path_factory.mktemp("targets"))


# ----------------------------------------------------------------------------------------------
# Bad input through the command line: exit 2, one line naming key, value and what is allowed,
# no traceback, nothing written. "{t}" stands for the folder of target files.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    kind: str  # "run" (one fit) or "sweep" (-m)
    args: tuple[str, ...]
    says: tuple[str, ...]  # every fragment the one error line must contain


def bad(id: str, kind: str, args: Sequence[str], says: Sequence[str]) -> Bad:
    return Bad(id, kind, tuple(args), tuple(says))


PD = "R = (1 - rho) I + rho 1 1^T must be positive definite"
FILE_OR_NULL = "null or the path of a readable YAML target file"
FORMAT = "a YAML mapping with exactly the keys weights (K numbers), means (K x d) and covs (K x d x d)"
SYMMETRIC_PD = "each covs[k] symmetric (within 1e-12 relative) and positive definite"
WEIGHTS = "weights all > 0 summing to 1 (within 1e-12)"


def target_case(id: str, name: str, problem: str, allowed: str, dim: int = 2) -> Bad:
    return bad(
        f"target: {id}",
        "run",
        [f"dim={dim}", f"target.file={{t}}/{name}"],
        [f"invalid target.file='{{t}}/{name}'", problem, f"allowed is {allowed}"],
    )


BAD_INPUT = [
    bad("dim=0", "run", ["dim=0"], ["invalid dim=0:", f"allowed is an integer from 1 to {DIM_MAX}"]),
    bad("dim=65", "run", ["dim=65"], ["invalid dim=65:", "allowed is an integer from 1 to 64"]),
    bad("dim=1.5", "run", ["dim=1.5"], ["dim=1.5", "could not be converted to Integer"]),
    bad("dim=null", "run", ["dim=null"], ["dim", "is not Optional"]),
    bad(
        "correlation=1",
        "run",
        ["correlation=1"],
        ["invalid correlation=1.0:", "a finite number < 1 for dim=1", PD],
    ),
    bad("correlation=nan", "run", ["correlation=nan"], ["invalid correlation=nan:", "a finite number < 1"]),
    bad(
        "correlation=abc", "run", ["correlation=abc"], ["correlation=abc", "could not be converted to Float"]
    ),
    bad(
        "dim=2 correlation=-1",
        "run",
        ["dim=2", "correlation=-1"],
        ["invalid correlation=-1.0:", "allowed is a number in the open interval (-1, 1) for dim=2", PD],
    ),
    bad(
        "dim=3 correlation=-0.5",
        "run",
        ["dim=3", "correlation=-0.5"],
        ["invalid correlation=-0.5:", "open interval (-1/2, 1) for dim=3"],
    ),
    bad(
        "dim=64 correlation=-0.02",
        "run",
        ["dim=64", "correlation=-0.02"],
        ["invalid correlation=-0.02:", "open interval (-1/63, 1) for dim=64"],
    ),
    bad(
        "direction",
        "run",
        ["direction=sideways"],
        ["invalid direction='sideways':", "allowed is one of axis, diagonal"],
    ),
    bad(
        "q_family",
        "run",
        ["q_family=mean_field"],
        ["invalid q_family='mean_field':", "allowed is one of full, diag, iso"],
    ),
    bad(
        "target.colour",
        "run",
        ["target.colour=1"],
        ["unknown key target.colour", "allowed keys here are target.file"],
    ),
    bad(
        "colour lists the new keys", "run", ["colour=red"], ["unknown key colour", "q_family", "target.file"]
    ),
    bad(
        "+colour lists the new keys",
        "run",
        ["+colour=red"],
        ["unknown key colour", "correlation", "target.file"],
    ),
    bad("~dim", "run", ["~dim"], ["invalid dim='<deleted>'", "this key cannot be removed"]),
    bad("~target", "run", ["~target"], ["invalid target.file='<deleted>'", "this key cannot be removed"]),
    bad(
        "target.file=''", "run", ["target.file=''"], ["invalid target.file='':", "null or the path of a YAML"]
    ),
    target_case("missing", "missing.yaml", "(no file {t}/missing.yaml)", FILE_OR_NULL),
    target_case("a directory", "a_dir.yaml", "({t}/a_dir.yaml is not a file)", FILE_OR_NULL),
    target_case("not UTF-8", "latin1.yaml", "is not UTF-8 text", FORMAT),
    target_case("malformed", "malformed.yaml", "(not valid YAML: expected ',' or ']'", FORMAT),
    target_case("a list", "list.yaml", "(the file holds a list, not a mapping)", FORMAT),
    target_case("empty", "empty.yaml", "(the file holds null (empty), not a mapping)", FORMAT),
    target_case("no covs", "no_covs.yaml", "(no key covs)", FORMAT),
    target_case("unknown key", "unknown_key.yaml", "(unknown key 'colour')", FORMAT),
    target_case(
        "text", "text.yaml", "(means[0][1] is the text 'abc', not a number)", "means as K lists of d numbers"
    ),
    target_case(
        "boolean", "boolean.yaml", "(weights[0] is true (a boolean), not a number)", "weights as a list"
    ),
    target_case("nan", "nan.yaml", "(means[0][0] is nan, not a finite number)", "means as K lists"),
    target_case(
        "beyond float64", "huge.yaml", "(covs[0][0][0] is inf, not a finite number)", "covs as K lists"
    ),
    target_case(
        "no components", "empty_weights.yaml", "(weights is an empty list)", "weights as a list of K"
    ),
    target_case(
        "ragged",
        "ragged.yaml",
        "(means[1] has 1 entry where the first has 2)",
        "means as K lists of d numbers (finite numbers, equal lengths)",
    ),
    target_case("K", "k_mismatch.yaml", "(2 weights, 1 means and 1 covs)", "one weight, mean and covariance"),
    target_case(
        "d", "d_mismatch.yaml", "(the means are 2-D and the covs 3 x 3)", "each covs[k] a d x d matrix"
    ),
    target_case(
        "dim", "good.yaml", "(its target is 2-D, dim is 3)", "a target with d = dim: set dim=2", dim=3
    ),
    target_case(
        "asymmetric", "asymmetric.yaml", "(covs[0] is not symmetric: [0][1] is 0.5, [1][0] 0.4)", SYMMETRIC_PD
    ),
    target_case(
        "not pd",
        "not_pd.yaml",
        "(covs[0] is not positive definite: its smallest eigenvalue is -1)",
        SYMMETRIC_PD,
    ),
    target_case("singular", "singular.yaml", "(covs[0] is not positive definite", SYMMETRIC_PD),
    target_case("weight 0", "zero_weight.yaml", "(weights[0] is 0.0)", WEIGHTS),
    target_case("sum", "sum.yaml", "(the weights sum to 1.000000001)", WEIGHTS),
    # the same through the sweeper: the override is named too
    bad("sweep: dim", "sweep", ["dim=1,65"], ["invalid dim=65 (override dim=1,65)", "from 1 to 64"]),
    bad("sweep: dim=1.5", "sweep", ["dim=1,1.5"], ["dim=1.5", "could not be converted to Integer"]),
    bad(
        "sweep: correlation for one dim",
        "sweep",
        ["dim=2,3", "correlation=0,-0.6", "separation=1,2"],
        ["invalid correlation=-0.6 (override correlation=0,-0.6)", "open interval (-1/2, 1) for dim=3"],
    ),
    bad("sweep: direction", "sweep", ["direction=axis,sideways"], ["direction='sideways'", "axis, diagonal"]),
    bad("sweep: q_family", "sweep", ["q_family=full,diag,mf"], ["q_family='mf'", "full, diag, iso"]),
    bad(
        "sweep: target defect",
        "sweep",
        ["dim=2", "target.file=null,{t}/not_pd.yaml"],
        [
            "invalid target.file='{t}/not_pd.yaml'",
            "not positive definite",
            "override target.file=null,",
            SYMMETRIC_PD,
        ],
    ),
    bad(
        "sweep: target for one dim",
        "sweep",
        ["dim=2,3", f"target.file={EXAMPLE}"],
        [f"invalid target.file='{EXAMPLE}'", "(its target is 2-D, dim is 3;", "set dim=2"],
    ),
    bad(
        "sweep: missing target",
        "sweep",
        ["target.file=nope.yaml", "separation=1,2"],
        ["nope.yaml", FILE_OR_NULL],
    ),
]

#: The cases run as a user runs them, in a subprocess: one or more of each kind of defect. The
#: others go through the same code in this process (the pre-flight that ``python -m kl_sweep``
#: runs, the sweeper's plan), which keeps this module's time in bounds on two cores.
IN_A_SUBPROCESS = {
    "dim=65",
    "dim=1.5",
    "dim=3 correlation=-0.5",
    "direction",
    "q_family",
    "colour lists the new keys",
    "target: missing",
    "target: malformed",
    "target: no covs",
    "target: text",
    "target: K",
    "target: dim",
    "target: asymmetric",
    "target: not pd",
    "target: weight 0",
    "target: sum",
    "sweep: dim",
    "sweep: correlation for one dim",
    "sweep: q_family",
    "sweep: target defect",
    "sweep: target for one dim",
}
assert IN_A_SUBPROCESS <= {c.id for c in BAD_INPUT}

#: Inputs that validate: ``{name: (arguments, run from the repository or the folder of target
#: files)}``; ``--cfg job`` prints the composed config after the pre-flight and exits 0.
GOOD_INPUT = {
    "every new key": (["dim=64", "correlation=-0.0158", "direction=diagonal", "q_family=iso"], "repo"),
    "near 1": (["dim=5", "correlation=0.999999", "q_family=diag"], "repo"),
    "1-D, any finite rho < 1": (["correlation=-1000"], "repo"),
    "the example": (["dim=2", f"target.file={EXAMPLE}", "divergence=reverse"], "repo"),
    # the shipped example from another directory: a relative path missing there is the repository's
    "the example from elsewhere": (["dim=2", f"target.file={EXAMPLE}"], "targets"),
    "a target in the working directory": (["dim=2", "target.file=good.yaml"], "targets"),
}
GOOD_IN_A_SUBPROCESS = {"the example", "the example from elsewhere", "a target in the working directory"}


@pytest.fixture(scope="module")
def cli_runs(targets, tmp_path_factory):
    """The commands of :data:`IN_A_SUBPROCESS` and :data:`GOOD_IN_A_SUBPROCESS`, run once:
    ``{id: (process, output directory)}``."""
    base = tmp_path_factory.mktemp("out")
    commands, outs = {}, {}
    for i, case in enumerate(c for c in BAD_INPUT if c.id in IN_A_SUBPROCESS):
        out = outs[case.id] = base / f"bad{i}"
        args = [a.replace("{t}", str(targets)) for a in case.args]
        if case.kind == "run":
            cmd = kl_sweep(*args, f"hydra.run.dir={out}")
        else:
            cmd = kl_sweep("-m", *args, f"hydra.sweep.dir={out}", "hydra.sweeper.latest_link=null")
        commands[case.id] = (cmd, ROOT)
    for i, name in enumerate(GOOD_IN_A_SUBPROCESS):
        args, where = GOOD_INPUT[name]
        out = outs[name] = base / f"good{i}"
        commands[name] = (
            kl_sweep(*args, f"hydra.run.dir={out}", "--cfg", "job"),
            ROOT if where == "repo" else targets,
        )
    procs = run_all(commands)
    return {name: (proc, outs[name]) for name, proc in procs.items()}


def in_process(case: Bad, targets: Path, out: Path) -> str | None:
    """The one line ``python -m kl_sweep`` would print for ``case``, found in this process: the
    pre-flight's (a single run), or the message of what the sweeper's plan raises (a sweep)."""
    from kl_sweep.cli import ensure_plugin_discoverable, preflight

    args = [a.replace("{t}", str(targets)) for a in case.args]
    if case.kind == "run":
        return preflight([*args, f"hydra.run.dir={out}"])
    ensure_plugin_discoverable()
    from hydra_plugins.kl_sweep_sweeper._core import SweepError

    try:
        plan(*args)
    except (ConfigError, SweepError) as ex:  # what Hydra prints of them: their message, one line
        return str(ex)
    return None


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.id for c in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli_runs, targets, tmp_path, case):
    says = [s.replace("{t}", str(targets)) for s in case.says]
    if case.id in IN_A_SUBPROCESS:
        proc, out = cli_runs[case.id]
        shown = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-2500:]}\nstdout:\n{proc.stdout[-500:]}"
        assert proc.returncode == 2, shown
        assert "Traceback" not in proc.stderr + proc.stdout, shown
        lines = error_lines(proc.stderr)
        assert not proc.stdout.strip(), shown
    else:
        out = tmp_path / "out"
        line = in_process(case, targets, out)
        assert line is not None, f"{case.args} was accepted"
        lines = shown = line.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kl_sweep: "), shown
    missing = [s for s in says if s not in lines[0]]
    assert not missing, f"the error line does not say {missing}: {lines[0]!r}"
    assert not out.exists(), f"{out} was created\n{shown}"


@pytest.mark.parametrize("name", list(GOOD_INPUT))
def test_good_input_passes_the_preflight(cli_runs, targets, tmp_path, monkeypatch, name):
    args, where = GOOD_INPUT[name]
    if name in GOOD_IN_A_SUBPROCESS:
        proc, out = cli_runs[name]
        assert proc.returncode == 0, proc.stderr[-2500:]
        printed = config_values(OmegaConf.create(proc.stdout))
        assert {k: printed[k] for k in ("dim", "target.file")} == {
            "dim": 2,
            "target.file": args[1].split("=", 1)[1],
        }
    else:
        from kl_sweep.cli import preflight

        monkeypatch.chdir(ROOT if where == "repo" else targets)
        out = tmp_path / "out"
        assert preflight([*args, f"hydra.run.dir={out}"]) is None
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# The keys: defaults, names, and the lists they must agree with.
# ----------------------------------------------------------------------------------------------


def test_the_defaults_compose_to_the_1d_model():
    values = values_of()
    assert {k: values[k] for k in NEW_KEY_DEFAULTS} == NEW_KEY_DEFAULTS
    assert values["dim"] == 1 and type(values["dim"]) is int and values["target.file"] is None
    assert values_of("dim=2", "q_family=diag")["dim"] == 2
    validate(values)


def test_the_new_keys_are_shared_known_and_listed():
    assert not set(NEW_KEY_DEFAULTS) & set(ROW_KEYS)  # shared: one composition per combination
    _, shared = split_values(values_of())
    assert set(NEW_KEY_DEFAULTS) <= set(shared)
    assert set(NEW_KEY_DEFAULTS) <= set(KNOWN_KEYS)
    assert DIM_MAX == 64 and DIRECTIONS == ("axis", "diagonal")


def test_q_families_agree_with_the_core():
    from kl_sweep.core.gaussians import FAMILY_NAMES

    assert Q_FAMILIES == FAMILY_NAMES


def test_the_example_is_a_2d_target_of_three_unequal_components():
    target = load_target(EXAMPLE, dim=2)
    assert (target.dim, target.n_components) == (2, 3)
    assert target.weights.dtype == target.means.dtype == target.covs.dtype == np.float64
    assert target.covs.shape == (3, 2, 2) and abs(target.weights.sum() - 1) <= 1e-12
    assert len({c.tobytes() for c in target.covs}) == 3
    text = (ROOT / EXAMPLE).read_text()
    assert "python -m kl_sweep dim=2 target.file=conf/targets/example.yaml divergence=reverse" in text
    with pytest.raises(ValueError):  # read-only: a target cannot be changed after its checks
        target.means[0, 0] = 1.0


# ----------------------------------------------------------------------------------------------
# Validation in process: good values pass, columns are checked whole, the loader's rules.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, rho",
    [(1, -1e300), (1, 0.999999), (2, -0.999999), (3, -0.4999), (64, -1 / 63 + 1e-9), (64, 0.99)],
)
def test_correlations_inside_the_positive_definite_range_validate(dim, rho):
    validate({**values_of(), "dim": dim, "correlation": rho, "q_family": "diag"})
    eig = np.linalg.eigvalsh((1 - rho) * np.eye(dim) + rho * np.ones((dim, dim)))
    assert eig.min() > 0 or dim == 1  # the rule is the definition (in 1-D R is 1 whatever rho)


@pytest.mark.parametrize(
    "dim, rho", [(1, 1.0), (2, -1.0), (3, -0.5), (4, -1 / 3), (64, -1 / 63), (5, np.inf)]
)
def test_correlations_on_or_past_the_edge_are_refused(dim, rho):
    with pytest.raises(ConfigError, match=r"invalid correlation=.*open interval|finite number < 1") as info:
        validate({**values_of(), "dim": dim, "correlation": rho, "q_family": "iso"})
    assert info.value.key == "correlation" and f"for dim={dim}" in str(info.value)


@pytest.mark.parametrize("family, dim, ok", [("full", 20, True), ("full", 21, False), ("diag", 64, True)])
def test_a_full_q_goes_to_dim_20(family, dim, ok):
    values = {**values_of(), "dim": dim, "q_family": family}
    if ok:
        validate(values)
        return
    with pytest.raises(
        ConfigError, match=r"invalid dim=21: allowed is an integer from 1 to 20 with q_family=full"
    ):
        validate(values)


def test_columns_of_dims_and_correlations_are_checked_whole():
    """The shared keys are scalars per group, but validate takes columns as every other key does."""
    base = values_of()
    validate({**base, "dim": np.array([1, 2, 3]), "correlation": np.array([0.9, -0.9, -0.4])})
    with pytest.raises(ConfigError, match=r"correlation=-0\.6.*\(-1/2, 1\) for dim=3"):
        validate({**base, "dim": np.array([2, 3]), "correlation": np.array([-0.6, -0.6])})
    with pytest.raises(ConfigError, match=r"invalid dim=65"):
        validate({**base, "dim": np.array([1, 65]), "q_family": "diag"})


@pytest.mark.parametrize(
    "name, problem",
    [
        ("malformed.yaml", "not valid YAML"),
        ("singular.yaml", "not positive definite"),
        ("sum.yaml", "sum to 1.000000001"),
        ("ragged.yaml", "means[1] has 1 entry"),
    ],
)
def test_validate_checks_the_target_file(targets, name, problem):
    with pytest.raises(ConfigError, match="target.file") as info:
        validate({**values_of("dim=2"), "target.file": str(targets / name)})
    assert problem in str(info.value) and info.value.key == "target.file"
    assert "\n" not in str(info.value)


def test_a_sweeps_context_is_added_to_the_files_problem(targets):
    path = str(targets / "not_pd.yaml")
    with pytest.raises(ConfigError) as info:
        validate({**values_of("dim=2"), "target.file": path}, lambda k, v: f"override {k}={v}")
    assert (
        f"(covs[0] is not positive definite: its smallest eigenvalue is -1; override target.file={path})"
        in str(info.value)
    )


def test_the_loader_reads_numbers_as_given(targets, tmp_path):
    t = load_target(str(targets / "good.yaml"), 2)
    assert t.weights.tolist() == [0.25, 0.75]
    assert t.means.tolist() == [[0, 0], [1, 2]]
    assert t.covs.tolist() == [[[1, 0.5], [0.5, 2]], [[1, 0], [0, 1]]]
    # PyYAML reads 1e-1 (no dot) as text; it is a number here. Rounding-level asymmetry is allowed.
    sci = tmp_path / "sci.yaml"
    sci.write_text("weights: [1e-1, 9e-1]\nmeans: [[0], [1]]\ncovs: [[[1]], [[2.5e0]]]\n")
    assert load_target(str(sci), 1).weights.tolist() == [0.1, 0.9]
    near = tmp_path / "near.yaml"
    near.write_text("weights: [1]\nmeans: [[0, 0]]\ncovs: [[[1, 0.3], [0.30000000000000004, 1]]]\n")
    assert load_target(str(near)).dim == 2


def test_an_edited_file_is_read_again(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(ONE_ROUND)
    assert load_target(str(path)).dim == 2
    path.write_text("weights: [1]\nmeans: [[0, 0, 0]]\ncovs: [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]\n")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_target(str(path)).dim == 3


def test_a_relative_path_is_read_from_where_the_command_ran(tmp_path, monkeypatch):
    """Under Hydra, from its original working directory (not a run directory it changed to);
    outside it, from the current one; else from the repository."""
    origin, elsewhere = tmp_path / "origin", tmp_path / "elsewhere"
    origin.mkdir()
    elsewhere.mkdir()
    (origin / "t.yaml").write_text(GOOD_2D)
    (elsewhere / "t.yaml").write_text("weights: [1]\nmeans: [[0]]\ncovs: [[[1]]]\n")
    monkeypatch.chdir(elsewhere)
    assert load_target("t.yaml").dim == 1  # no Hydra: the current directory
    assert load_target(EXAMPLE).dim == 2  # not here: the repository's
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    OmegaConf.update(cfg, "hydra.runtime.cwd", str(origin), force_add=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert load_target("t.yaml").dim == 2  # Hydra's original working directory
    finally:
        HydraConfig.instance().cfg = None


# ----------------------------------------------------------------------------------------------
# Hashes: 1-D configurations keep today's, the new keys count when they are not at their default.
# ----------------------------------------------------------------------------------------------

#: ``config_hash`` of single runs, computed by the code before the new keys existed (commit b969bed).
HASHES_BEFORE = {
    (): "5fd469f2917a9c9f",
    ("separation=2", "divergence=reverse"): "aacc83630de3994c",
    ("estimator=mc", "optimizer=sgd", "weight=0.5"): "b7f67363a1754342",
    ("divergence=alpha", "divergence.alpha=0.5"): "ffc139ef72b10512",
}
#: The plan of ``-m separation=1,2 divergence=forward,reverse estimator=quadrature,mc`` then.
PLAN_BEFORE = [
    "a8d0756134a2f36e",
    "3fefc93aa4122215",
    "af27ea34659a0bb9",
    "e322de8fdb7fb25a",
    "5eb3644355df0197",
    "cae76d85e8b52268",
    "aacc83630de3994c",
    "a5b842094c598b83",
]


def hash_of(*overrides: str) -> str:
    rows, shared = split_values(values_of(*overrides))
    return config_hashes(rows_frame(rows, 1), shared)[0]


@pytest.mark.parametrize("overrides", list(HASHES_BEFORE), ids=lambda o: " ".join(o) or "defaults")
def test_1d_rows_keep_their_hashes_bit_for_bit(overrides):
    assert hash_of(*overrides) == HASHES_BEFORE[overrides]
    # Spelled out at the new keys' defaults, too.
    spelled = ("dim=1", "correlation=0", "direction=axis", "q_family=full", "target.file=null")
    assert hash_of(*overrides, *spelled) == HASHES_BEFORE[overrides]


def test_the_hash_of_a_default_row_is_the_old_way_hash():
    """The old definition, written out: the shared settings without the new keys, as one JSON
    string beside the typed rows (tests/test_hashes.py)."""
    rows, shared = split_values(values_of("separation=2.5", "weight=0.6"))
    old = {k: v for k, v in shared.items() if k not in NEW_KEY_DEFAULTS and k not in STOCHASTIC_DEFAULTS}
    assert len(old) < len(shared)
    reference = rows_frame(rows, 1).drop(columns="seed")  # seed 0: not hashed (issue 25)
    reference["__shared__"] = json.dumps(dict(sorted(old.items())), sort_keys=True, default=str)
    expected = pd.util.hash_pandas_object(reference, index=False).to_numpy()
    assert (config_hash_values(rows_frame(rows, 1), shared) == expected).all()
    assert hashed_settings(shared) == old


def test_a_1d_sweep_plans_todays_hashes():
    got = plan("separation=1,2", "divergence=forward,reverse", "estimator=quadrature,mc")
    assert hash_text(got.rows["hash"].to_numpy()).tolist() == PLAN_BEFORE


NON_DEFAULT = [
    ("dim=2",),
    ("correlation=0.5",),
    ("direction=diagonal",),
    ("q_family=diag",),
    ("q_family=iso",),
    ("dim=2", f"target.file={EXAMPLE}"),
]


def test_each_new_key_off_its_default_changes_the_hash():
    hashes = [hash_of(*o) for o in [(), *NON_DEFAULT]]
    assert len(set(hashes)) == len(hashes), hashes
    assert hash_of("dim=2") != hash_of("dim=2", f"target.file={EXAMPLE}")


def test_a_target_is_hashed_by_its_numbers_not_its_path(tmp_path):
    """The same numbers under another path, layout or comments: the same configuration. Another
    number: another configuration, so a resumed sweep fits an edited file again."""
    same = tmp_path / "same.yaml"
    same.write_text(
        "# the example, written another way\nweights: [0.5, 0.3, 0.2]\nmeans: [[-2, 0], [2, 1], [1, -2.5]]\n"
        "covs: [[[1.5, 0.9], [0.9, 1.5]], [[0.3, 0], [0, 0.3]], [[1.2, -0.2], [-0.2, 0.25]]]\n"
    )
    other = tmp_path / "other.yaml"
    other.write_text(same.read_text().replace("0.25]", "0.26]"))
    example = hash_of("dim=2", f"target.file={EXAMPLE}")
    assert hash_of("dim=2", f"target.file={ROOT / EXAMPLE}") == example
    assert hash_of("dim=2", f"target.file={same}") == example
    assert hash_of("dim=2", f"target.file={other}") != example


# ----------------------------------------------------------------------------------------------
# Planning a sweep over the new keys: one composition per combination, every row validated.
# ----------------------------------------------------------------------------------------------


def test_a_sweep_over_the_new_keys_plans_one_group_per_combination():
    got = plan("dim=1,2", "correlation=0,0.5", "q_family=full,diag", "separation=1,2")
    assert len(got.rows) == 16 and len(got.groups) == 8
    assert got.rows["hash"].is_unique
    combos = {(g["dim"], g["correlation"], g["q_family"]) for g in got.groups}
    assert combos == {(d, r, q) for d in (1, 2) for r in (0.0, 0.5) for q in ("full", "diag")}
    assert all(g["direction"] == "axis" and g["target.file"] is None for g in got.groups)
    for _, rows in got.rows.groupby("group"):  # each group: both separations
        assert sorted(rows["separation"]) == [1.0, 2.0]
    # Job order: the product's, first key slowest (dim), separation fastest.
    first = got.rows.sort_values("job_num").iloc[:2]
    assert [got.groups[g]["dim"] for g in first["group"]] == [1, 1]


def test_a_sweep_over_target_files_and_their_dims(targets):
    got = plan("dim=2", f"target.file=null,{EXAMPLE},{targets / 'good.yaml'}", "separation=1,2")
    assert len(got.rows) == 6 and [g["target.file"] for g in got.groups] == [
        None,
        EXAMPLE,
        str(targets / "good.yaml"),
    ]
    with pytest.raises(ConfigError, match=r"its target is 2-D, dim is 3"):
        plan("dim=2,3", f"target.file={EXAMPLE}")


def test_a_copied_target_plans_the_same_hashes(tmp_path):
    shutil.copy(ROOT / EXAMPLE, tmp_path / "copy.yaml")
    a = plan("dim=2", f"target.file={EXAMPLE}", "separation=1,2")
    b = plan("dim=2", f"target.file={tmp_path / 'copy.yaml'}", "separation=1,2")
    assert a.rows["hash"].tolist() == b.rows["hash"].tolist()


def test_a_composition_error_keeps_the_line_that_says_what_is_wrong():
    """Hydra announces a merge error on one line and says it on the next: both are printed (a
    preset that sets a config group to a string once printed only the announcement)."""
    from kl_sweep.cli import _first_line

    error = RuntimeError(
        "In 'experiment/mine': ValidationError raised while composing config:\n"
        "Merge error: str is not a subclass of DivergenceConf. value: reverse\n    full_key: \n"
    )
    assert _first_line(error) == (
        "In 'experiment/mine': ValidationError raised while composing config: "
        "Merge error: str is not a subclass of DivergenceConf. value: reverse"
    )
    assert _first_line(RuntimeError("one line\nand more")) == "one line"
