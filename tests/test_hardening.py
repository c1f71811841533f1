"""Issue 5 (hardening): bad input, numerical extremes, faults and reproducibility, end to end.

Every check runs the command line as a user does, in subprocesses. They are started in batches by
module-scoped fixtures, two at a time (the machine has two cores), and each test then checks one
result. Expected values come from independent methods: the semi-analytic KL of
``test_properties.reference_kl`` (itself checked against scipy and mpmath there), closed forms,
and uninterrupted runs of the same sweep.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from test_properties import kl_tolerance, reference_grad, reference_kl

from kl_sweep.collect import read_sweep
from kl_sweep.table import COLUMNS, TIMING_COLUMNS

HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
JOBS = 2  # subprocesses at a time


def env(full_error: bool = False) -> dict[str, str]:
    # JOBS processes run side by side: one thread each, not JOBS x cores threads fighting for cores.
    out = {"OMP_NUM_THREADS": "1", **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}}
    if full_error:
        out["HYDRA_FULL_ERROR"] = "1"
    return out


def kl_sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "kl_sweep", *map(str, args)]


def sweep_cmd(sweep_dir: Path, *args: str) -> list[str]:
    return kl_sweep("-m", *args, f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.latest_link=null")


def run(cmd: list[str], full_error: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(full_error), capture_output=True, text=True, timeout=600)


def run_all(commands: dict[str, tuple[list[str], bool]]) -> dict[str, subprocess.CompletedProcess]:
    """Run ``{name: (cmd, full_error)}``, ``JOBS`` at a time, in the order given."""
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {name: pool.submit(run, cmd, full_error) for name, (cmd, full_error) in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def error_lines(stderr: str) -> list[str]:
    """What a user reads on stderr, without blank lines and Hydra's HYDRA_FULL_ERROR hint."""
    return [line for line in stderr.splitlines() if line.strip() and line.strip() != HINT]


def table(sweep_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(sweep_dir / "results.parquet")


def same_rows(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 0.0) -> None:
    """Equal tables apart from the timing columns: bit for bit, or to ``rtol``."""
    drop = [c for c in TIMING_COLUMNS if c in a.columns]
    a, b = a.drop(columns=drop).reset_index(drop=True), b.drop(columns=drop).reset_index(drop=True)
    if rtol:
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=rtol, atol=0.0)
    else:
        pd.testing.assert_frame_equal(a, b, check_exact=True)


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming what is wrong and what is allowed, a non-zero exit, nothing written,
# no traceback.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    id: str
    kind: str  # "run" (one fit), "sweep" (-m) or "analysis" (python -m analysis DIR)
    args: tuple[str, ...]
    says: tuple[str, ...]  # every fragment the one error line must contain
    blocked: bool = False  # the output directory lies under a regular file


def bad(id: str, kind: str, args, says, **kw) -> Bad:
    return Bad(id, kind, tuple(args), tuple(says), **kw)


BAD_INPUT = [
    # out-of-range values for every numeric key
    bad("separation<0", "run", ["separation=-1"], ["separation=-1.0", "a finite number >= 0"]),
    bad("weight=0", "run", ["weight=0"], ["weight=0.0", "strictly between 0 and 1"]),
    bad("weight>1", "run", ["weight=1.5"], ["weight=1.5", "strictly between 0 and 1"]),
    bad("component_var=0", "run", ["component_var=0"], ["component_var=0.0", "> 0"]),
    bad("init_sigma2<0", "run", ["init_sigma2=-1e-8"], ["init_sigma2=-1e-08", "> 0"]),
    bad("lr=0", "run", ["optimizer.lr=0"], ["optimizer.lr=0.0", "> 0"]),
    bad("max_steps=0", "run", ["optimizer.max_steps=0"], ["optimizer.max_steps=0", "from 1 to 10000000"]),
    bad("max_steps>1e7", "run", ["optimizer.max_steps=10000001"], ["max_steps=10000001", "to 10000000"]),
    bad("tol=0", "run", ["optimizer.tol=0"], ["optimizer.tol=0.0", "> 0"]),
    bad("beta1=1", "run", ["optimizer.beta1=1"], ["optimizer.beta1=1.0", "[0, 1)"]),
    bad("beta2<0", "run", ["optimizer.beta2=-0.5"], ["optimizer.beta2=-0.5", "[0, 1)"]),
    bad("eps=0", "run", ["optimizer.eps=0"], ["optimizer.eps=0.0", "> 0"]),
    bad("momentum=1", "run", ["optimizer=sgd", "optimizer.momentum=1"], ["optimizer.momentum=1.0", "[0, 1)"]),
    bad("nodes_per_panel=1", "run", ["estimator.nodes_per_panel=1"], ["nodes_per_panel=1", "from 2 to 64"]),
    bad("num_points=2", "run", ["estimator=grid", "estimator.num_points=2"], ["num_points=2", "from 3 to"]),
    bad("num_samples=0", "run", ["estimator=mc", "estimator.num_samples=0"], ["num_samples=0", "from 1 to"]),
    # stochastic VI (issue 25): its keys need estimator=mc estimator.resample=true, in d = 1
    bad(
        "resample, quadrature",
        "run",
        ["estimator.resample=true"],
        ["estimator.resample", "a key of estimator=mc"],
    ),
    bad("seed, no resample", "run", ["seed=3"], ["seed=3", "estimator.resample=true"]),
    bad(
        "average>1",
        "run",
        ["estimator=mc", "estimator.resample=true", "optimizer.average=1.5"],
        ["optimizer.average=1.5", "(0, 1]"],
    ),
    bad("average=0", "run", ["optimizer.average=0"], ["optimizer.average=0.0", "(0, 1]"]),
    bad(
        "decay<=0.5",
        "run",
        [
            "estimator=mc",
            "estimator.resample=true",
            "optimizer.schedule=robbins_monro",
            "optimizer.decay=0.5",
        ],
        ["optimizer.decay=0.5", "(0.5, 1]"],
    ),
    bad(
        "decay_steps=0",
        "run",
        ["estimator=mc", "estimator.resample=true", "optimizer.decay_steps=0"],
        ["optimizer.decay_steps=0.0", "> 0"],
    ),
    bad("schedule", "run", ["optimizer.schedule=cosine"], ["optimizer.schedule='cosine'", "robbins_monro"]),
    bad("resample, dim=2", "run", ["estimator=mc", "estimator.resample=true", "dim=2"], ["dim=2", "line"]),
    bad(
        "stl, renyi",
        "run",
        ["estimator=mc", "estimator.resample=true", "estimator.gradient=stl", "divergence=renyi"],
        ["estimator.gradient", "divergence=reverse"],
    ),
    bad(
        "sweep: seed, no resample",
        "sweep",
        ["seed=0,1,2"],
        ["seed=1", "estimator.resample=true"],
    ),
    bad("seed<0", "run", ["estimator=mc", "estimator.seed=-1"], ["estimator.seed=-1", "2**63 - 1"]),
    bad(
        "seed=2**63",
        "run",
        ["estimator=mc", "estimator.seed=9223372036854775808"],
        ["estimator.seed=9223372036854775808", "2**63 - 1"],
    ),
    # NaN and inf
    bad("separation=nan", "run", ["separation=nan"], ["separation=nan", "finite"]),
    bad("center=inf", "run", ["center=inf"], ["center=inf", "finite"]),
    bad("init_mu=-inf", "run", ["init_mu=-inf"], ["init_mu=-inf", "finite"]),
    bad("separation=1e400", "run", ["separation=1e400"], ["separation=inf", "finite"]),
    # text where a number belongs
    bad("separation=abc", "run", ["separation=abc"], ["separation", "abc", "Float"]),
    bad("max_steps=1.5", "run", ["optimizer.max_steps=1.5"], ["optimizer.max_steps", "1.5", "Integer"]),
    bad("polish=maybe", "run", ["polish=maybe"], ["polish", "maybe", "bool"]),
    # unknown group choices
    bad("divergence", "run", ["divergence=sideways"], ["divergence=sideways", "forward", "reverse"]),
    bad("estimator", "run", ["estimator=trapezoid"], ["estimator=trapezoid", "quadrature", "grid", "mc"]),
    bad("optimizer", "run", ["optimizer=lbfgs"], ["optimizer=lbfgs", "adam", "sgd"]),
    bad("experiment", "run", ["experiment=nope"], ["experiment=nope", "smoke", "study"]),
    # unknown keys: the allowed keys are listed
    bad("colour", "run", ["colour=red"], ["colour", "separation", "init_sigma2"]),
    bad("optimizer.colour", "run", ["optimizer.colour=1"], ["optimizer.colour", "max_steps", "beta1"]),
    bad("+colour", "run", ["+colour=red"], ["colour", "separation"]),
    # malformed overrides
    bad("unclosed [", "run", ["separation=[1"], ["malformed override", "separation=[1"]),
    bad("no key", "run", ["=3"], ["=3"]),
    bad("delete a key", "run", ["~separation"], ["separation"]),
    bad("list without -m", "run", ["separation=1,2"], ["separation=1,2", "--multirun"]),
    bad("run dir under a file", "run", [], ["not a directory"], blocked=True),
    # the same through the sweeper
    bad(
        "empty sweep", "sweep", ["separation=range(0,0)"], ["separation", "range(0,0)", "at least one value"]
    ),
    bad(
        "1 bad in 6000",
        "sweep",
        ["separation=range(0,20,0.01)", "init_sigma2=1,2,0"],
        ["init_sigma2=0.0", "init_sigma2=1,2,0", "> 0"],
    ),
    bad("sweep: text", "sweep", ["separation=0,1,abc"], ["separation='abc'", "a number"]),
    bad(
        "sweep: text, group",
        "sweep",
        ["estimator=mc", "estimator.seed=0,abc"],
        ["estimator.seed", "abc", "Integer"],
    ),
    bad(
        "sweep: choice",
        "sweep",
        ["divergence=forward,sideways"],
        ["sideways", "alpha, chi2, forward, hellinger, jensen_shannon, renyi, reverse"],
    ),
    bad("sweep: unknown key", "sweep", ["colour=red,blue"], ["colour", "separation", "init_sigma2"]),
    # the alpha family's order: only where it exists, finite, and a range with a step
    bad(
        "alpha for forward",
        "run",
        ["divergence=forward", "divergence.alpha=0.5"],
        ["divergence.alpha=0.5", "divergence=forward has no alpha", "alpha and renyi"],
    ),
    bad("alpha=nan", "run", ["divergence=alpha", "divergence.alpha=nan"], ["divergence.alpha=nan", "finite"]),
    bad("alpha=inf", "run", ["divergence=alpha", "divergence.alpha=inf"], ["divergence.alpha=inf", "finite"]),
    bad(
        "sweep: alpha zero step",
        "sweep",
        ["divergence=alpha", "divergence.alpha=range(-1,2,0)"],
        ["divergence.alpha", "range(-1,2,0)", "step"],
    ),
    bad(
        "sweep: renyi alpha=0",
        "sweep",
        ["divergence=renyi", "divergence.alpha=1,0.5,0"],
        ["divergence.alpha=0.0", "> 0", "renyi"],
    ),
    bad(
        "sweep: alpha for hellinger",
        "sweep",
        ["divergence=hellinger", "divergence.alpha=0.5,1"],
        ["divergence.alpha=0.5", "divergence=hellinger has no alpha"],
    ),
    bad(
        "sweep: num_points",
        "sweep",
        ["estimator=grid", "estimator.num_points=2,4001"],
        ["estimator.num_points=2", "from 3 to 1000000"],
    ),
    bad("sweep: interval", "sweep", ["weight=interval(0,1)"], ["weight", "interval(0,1)", "optuna"]),
    bad("sweep: zero step", "sweep", ["separation=range(0,8,0)"], ["separation", "range(0,8,0)", "step"]),
    bad("sweep: delete a key", "sweep", ["~separation", "weight=0.5,0.6"], ["separation"]),
    bad("sweep: malformed", "sweep", ["separation=1,,2"], ["malformed override", "separation=1,,2"]),
    bad("chunk_size=0", "sweep", ["separation=1,2", "hydra.sweeper.chunk_size=0"], ["chunk_size=0", ">= 1"]),
    bad("sweep dir under a file", "sweep", ["separation=1,2"], ["not a directory"], blocked=True),
    # the analysis
    bad("analysis: missing dir", "analysis", ["{out}"], ["{out}", "no sweep directory"]),
    bad("analysis: no results", "analysis", ["{empty}"], ["{empty}", "no results", "results.parquet"]),
    bad("analysis: empty table", "analysis", ["{zero}"], ["{zero}", "no rows"]),
    bad("analysis: a file", "analysis", ["{file}"], ["{file}", "no sweep directory"]),
]
FULL_ERROR = {"sweep": ["separation=0,1", "weight=0.5,1.2"]}


def _bad_target(base: Path, case: Bad) -> Path:
    folder = base / "".join(c if c.isalnum() else "_" for c in case.id)  # Hydra's grammar takes no <=+
    folder.mkdir(parents=True)
    if case.blocked:
        (folder / "file").write_text("in the way")
        return folder / "file" / "out"
    return folder / "out"


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    """Every bad-input command, and the HYDRA_FULL_ERROR=1 one, run once.

    Returns {id: (process, output directory, fragments to find, input folders that must not change)}.
    """
    base = tmp_path_factory.mktemp("bad")
    empty, zero = base / "empty_sweep_dir", base / "zero_row_sweep_dir"
    empty.mkdir()
    zero.mkdir()
    a_file = base / "a_file"
    a_file.write_text("not a sweep")
    pd.DataFrame({c: pd.Series(dtype="float64") for c in COLUMNS}).to_parquet(zero / "results.parquet")
    commands, targets = {}, {}
    for case in BAD_INPUT:
        out = _bad_target(base, case)
        fill = {"{out}": str(out), "{empty}": str(empty), "{zero}": str(zero), "{file}": str(a_file)}
        args = [fill.get(a, a) for a in case.args]
        if case.kind == "run":
            cmd = kl_sweep(*args, f"hydra.run.dir={out}")
        elif case.kind == "sweep":
            cmd = sweep_cmd(out, *args)
        else:
            cmd = [sys.executable, "-m", "analysis", *args]
        commands[case.id] = (cmd, False)
        targets[case.id] = (out, [fill.get(s, s) for s in case.says], {empty, zero} & set(map(Path, args)))
    for kind, args in FULL_ERROR.items():
        out = base / f"full_error_{kind}"
        cmd = kl_sweep(*args, f"hydra.run.dir={out}") if kind == "run" else sweep_cmd(out, *args)
        commands[f"full_error_{kind}"] = (cmd, True)
    procs = run_all(commands)
    return {name: (proc, *targets.get(name, (None, None, None))) for name, proc in procs.items()}


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c.id for c in BAD_INPUT])
def test_bad_input_is_one_clear_line_a_nonzero_exit_and_no_output(bad_input, case):
    proc, out, says, inputs = bad_input[case.id]
    shown = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-2500:]}\nstdout:\n{proc.stdout[-500:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, shown
    if case.kind == "sweep":
        assert proc.returncode != 0, shown
    else:  # the single-run pre-flight and the analysis both promise status 2
        assert proc.returncode == 2, shown
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, shown
    prefix = "analysis:" if case.kind == "analysis" else "kl_sweep:"
    assert lines[0].startswith(prefix), shown
    missing = [s for s in says if s not in lines[0]]
    assert not missing, f"the error line does not say {missing}: {lines[0]!r}"
    assert not proc.stdout.strip(), shown
    # no partial output: the run or sweep directory was never created, the analysis wrote nothing
    assert not out.exists(), f"{out} was created\n{shown}"
    for folder in inputs:
        assert sorted(p.name for p in folder.iterdir()) in ([], ["results.parquet"]), list(folder.iterdir())


@pytest.mark.parametrize("kind", sorted(FULL_ERROR))
def test_hydra_full_error_shows_the_traceback(bad_input, kind):
    proc = bad_input[f"full_error_{kind}"][0]
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr, proc.stderr[-2000:]
    assert "allowed is" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Numerical extremes: every row finite, converged or honestly not, and its KLs exact.
# ----------------------------------------------------------------------------------------------

EXTREMES = [
    "separation=0,50",
    "weight=1e-6,0.999999",
    "component_var=1e-6,1e6",
    "init_mu=-1000,1000",
    "init_sigma2=1e-8,1e8",
    "divergence=forward,reverse",
    "optimizer=adam,sgd",
    "optimizer.lr=0.05,10",
    "optimizer.max_steps=40",
]
EXTREME_ROWS = 2**8  # per estimator: 2**5 mixtures and starts, 2 divergences, 2 optimizers, 2 rates
ESTIMATORS = {
    "quadrature": ["estimator=quadrature"],
    "grid": ["estimator=grid", "estimator.num_points=801"],
    "mc": ["estimator=mc", "estimator.num_samples=512"],
}
# Gaussian P (separation 0) from ordinary starts: fits that converge to KL ~ 0.
TINY = [
    "separation=0",
    "weight=1e-6,0.999999",
    "component_var=1e-6,1e6",
    "init_mu=-1,1",
    "divergence=forward,reverse",
    "optimizer.max_steps=1000",
]
NUMERIC = ["mu", "sigma2", "loss", "kl_forward", "kl_reverse", "grad_norm"]


@pytest.fixture(scope="module")
def sweeps_at_the_extremes(tmp_path_factory):
    base = tmp_path_factory.mktemp("extremes")
    commands = {name: (sweep_cmd(base / name, *EXTREMES, *args), False) for name, args in ESTIMATORS.items()}
    commands["tiny"] = (sweep_cmd(base / "tiny", *TINY), False)
    procs = run_all(commands)
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: the sweep did not go on\n{proc.stderr[-3000:]}"
    return base


@pytest.fixture(scope="module")
def extremes(sweeps_at_the_extremes):
    return pd.concat([table(sweeps_at_the_extremes / name) for name in ESTIMATORS], ignore_index=True)


@pytest.fixture(scope="module")
def tiny(sweeps_at_the_extremes):
    return table(sweeps_at_the_extremes / "tiny")


def describe(rows: pd.DataFrame, extra: dict | None = None, limit: int = 8) -> str:
    keys = ["estimator", "divergence", "optimizer", "lr", "separation", "weight", "component_var"]
    keys += ["init_mu", "init_sigma2", "mu", "sigma2", "loss", "status", "steps"]
    shown = rows[keys].assign(**(extra or {}))
    return f"{len(rows)} rows, e.g.\n{shown.head(limit).to_string()}"


def test_extremes_every_configuration_has_a_finite_row(extremes):
    t = extremes
    assert len(t) == len(ESTIMATORS) * EXTREME_ROWS and t.config_hash.is_unique
    assert set(t.status) <= {"converged", "max_steps", "diverged"}
    finite = np.isfinite(t[NUMERIC].to_numpy(dtype=float)).all(axis=1) & (t.sigma2 > 0)
    assert finite.all(), describe(t[~finite])
    assert (t.converged == (t.status == "converged")).all()
    assert ((t.kl_forward >= 0) & (t.kl_reverse >= 0)).all()
    own = np.where(t.divergence == "forward", t.kl_forward, t.kl_reverse)
    assert (t.loss.to_numpy() == own).all()
    assert (t.steps <= t.max_steps).all()
    assert (t.steps[t.status == "max_steps"] == t.max_steps[t.status == "max_steps"]).all()
    # sgd at lr 10 blows up: those rows are marked, keep their last finite values, and the rest ran
    blown = t[(t.optimizer == "sgd") & (t.lr == 10)]
    assert (blown.status == "diverged").mean() > 0.5, blown.status.value_counts()
    assert (t.status == "max_steps").any()


def test_extremes_reported_divergences_are_exact(extremes):
    """Every reported KL, tiny or huge, equals the independent reference to 1e-9 relative."""
    t = extremes
    failures = []
    for name in ("forward", "reverse"):
        want = np.array(
            [
                reference_kl(name, r.separation, r.weight, r.component_var, r.mu, r.sigma2)
                for r in t.itertuples()
            ]
        )
        got = t[f"kl_{name}"].to_numpy()
        err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
        wrong = err > 1e-9
        if wrong.any():
            extra = {"reported": got[wrong], "reference": want[wrong], "rel_err": err[wrong]}
            rows = t[wrong].assign(**extra).sort_values("rel_err", ascending=False)
            failures.append(f"kl_{name}: {describe(rows, {k: rows[k] for k in extra})}")
    assert not failures, "\n\n".join(failures)


def test_extremes_at_separation_0_match_the_gaussian_closed_form(extremes, tiny):
    """At separation 0, P = N(0, component_var): every KL, tiny or huge, has a closed form, and
    converged fits reach KL ~ 0 with their digits intact."""
    import mpmath
    import torch

    assert len(tiny) == 16 and (tiny.status == "converged").sum() >= 4, tiny.status.value_counts()
    t = pd.concat([extremes[extremes.separation == 0], tiny], ignore_index=True)
    # the variance the reported KL was evaluated at: exp(2 * log sigma), log sigma = log(sigma2) / 2
    var_q = torch.exp(2.0 * (0.5 * torch.log(torch.tensor(t.sigma2.to_numpy())))).numpy()
    wrong = []
    for r, s2 in zip(t.itertuples(), var_q):
        for name in ("forward", "reverse"):
            with mpmath.workdps(50):
                p, q = (0, r.component_var), (r.mu, s2)
                a, b = (p, q) if name == "forward" else (q, p)
                m_a, v_a, m_b, v_b = (mpmath.mpf(float(x)) for x in (*a, *b))
                want = float((mpmath.log(v_b / v_a) + (v_a + (m_a - m_b) ** 2) / v_b - 1) / 2)
            got = getattr(r, f"kl_{name}")
            if not abs(got - want) <= kl_tolerance(want):
                wrong.append((r.Index, name, got, want))
    if wrong:
        index, name, got, want = zip(*wrong)
        rows = t.loc[list(index)]
        raise AssertionError(describe(rows, {"kl": name, "reported": got, "closed_form": want}))
    converged = tiny[tiny.status == "converged"]
    assert converged.loss.max() < 1e-12, describe(converged[converged.loss >= 1e-12])


def test_extremes_converged_rows_are_stationary(extremes, tiny):
    """A converged row sits where the reference gradient in (mu, log sigma) vanishes.

    The tolerance depends on the estimator the fit used: quadrature is exact to 1e-9, the
    801-point grid to about 1e-6, 512 Monte Carlo draws only to a few percent.
    """
    tol = {"quadrature": 1e-6, "grid": 1e-3, "mc": 0.5}
    t = pd.concat([extremes, tiny], ignore_index=True)
    t = t[t.status == "converged"]
    assert (tiny.status == "converged").sum() >= 4  # genuine optima are among the rows checked
    norms = np.array(
        [
            np.hypot(*reference_grad(r.divergence, r.separation, r.weight, r.component_var, r.mu, r.sigma2))
            for r in t.itertuples()
        ]
    )
    bad_rows = norms > t.estimator.map(tol).to_numpy()
    assert not bad_rows.any(), describe(t[bad_rows], {"reference_grad_norm": norms[bad_rows]})


# ----------------------------------------------------------------------------------------------
# Reproducibility: the same command twice; chunk size, shards and launcher change nothing.
# ----------------------------------------------------------------------------------------------

SWEEP = ["separation=range(0,6,0.2)", "weight=0.5,0.75", "init_mu=-1,2", "divergence=forward,reverse"]
SWEEP_ROWS = 30 * 2 * 2 * 2
CHUNK = "hydra.sweeper.chunk_size=40"
MC = [
    "estimator=mc",
    "estimator.num_samples=1024",
    "estimator.seed=11",
    "separation=1,3,5",
    "weight=0.5,0.8",
    "init_mu=-1,1",
    "divergence=forward,reverse",
]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweeps")
    runs = {  # the four-process joblib run first, beside the light ones
        "joblib_4_shards": [
            *SWEEP,
            "hydra/launcher=joblib",
            "hydra.sweeper.shards=4",
            "hydra.sweeper.chunk_size=13",
        ],
        "mc": MC,
        "mc_again": MC,
        "reference": [*SWEEP, CHUNK],
        "again": [*SWEEP, CHUNK],
        "joblib_1_shard": [*SWEEP, "hydra/launcher=joblib", "hydra.sweeper.shards=1"],
    }
    procs = run_all({name: (sweep_cmd(base / name, *args), False) for name, args in runs.items()})
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}\n{proc.stderr[-3000:]}"
    return {name: base / name for name in runs}


def test_the_same_sweep_twice_gives_identical_rows(sweeps):
    a, b = table(sweeps["reference"]), table(sweeps["again"])
    assert len(a) == SWEEP_ROWS and a.config_hash.is_unique
    assert (a.status == "converged").all()
    same_rows(a, b)


def test_the_same_monte_carlo_sweep_twice_gives_identical_rows(sweeps):
    a, b = table(sweeps["mc"]), table(sweeps["mc_again"])
    assert len(a) == 24 and (a.estimator == "mc").all()
    same_rows(a, b)
    # the draws matter: the Monte Carlo fit differs from the exact forward optimum (moment matching)
    fwd = a[a.divergence == "forward"]
    var = 1 + fwd.separation**2 * fwd.weight * (1 - fwd.weight)
    assert ((fwd.sigma2 - var).abs() / var).max() > 1e-6


def test_monte_carlo_results_follow_the_seed():
    from kl_sweep.table import rows_frame, run_rows

    rows = rows_frame(
        {
            "separation": [3.0],
            "weight": [0.7],
            "center": [0.0],
            "component_var": [1.0],
            "init_mu": [1.0],
            "init_sigma2": [1.0],
            "optimizer.lr": [0.05],
            "optimizer.max_steps": [5000],
            "optimizer.tol": [1e-8],
        },
        1,
    )
    shared = {
        "divergence.name": "reverse",
        "estimator.name": "mc",
        "estimator.num_samples": 1024,
        "optimizer.name": "adam",
        "polish": True,
    }
    a, b, c = (run_rows(rows, {**shared, "estimator.seed": seed}) for seed in (5, 5, 6))
    assert a.mu.iloc[0] == b.mu.iloc[0] and a.sigma2.iloc[0] == b.sigma2.iloc[0]
    assert a.mu.iloc[0] != c.mu.iloc[0]


def test_rows_do_not_depend_on_chunk_size_shards_or_launcher(sweeps):
    one, four = table(sweeps["joblib_1_shard"]), table(sweeps["joblib_4_shards"])
    assert len(list(sweeps["joblib_4_shards"].glob("[0-9]*"))) == 4  # four Hydra jobs ran
    same_rows(one, four)
    same_rows(table(sweeps["reference"]), four)


# ----------------------------------------------------------------------------------------------
# Faults: SIGKILL at many moments, then a rerun; full, read-only or blocked sweep directories;
# two sweeps at once.
# ----------------------------------------------------------------------------------------------


def part_files(sweep_dir: Path) -> list[Path]:
    parts = sweep_dir / "parts"
    try:
        return [parts / n for n in os.listdir(parts) if n.endswith(".parquet") and not n.startswith(".")]
    except FileNotFoundError:
        return []


def rows_in_parts(sweep_dir: Path) -> int:
    total = 0
    for p in part_files(sweep_dir):
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except (FileNotFoundError, OSError):  # removed by the assembly meanwhile
            pass
    return total


@dataclass
class Moment:
    name: str
    reached: Callable[[Path, float], bool]  # (sweep_dir, seconds since start)
    rows_after: Callable[[int], bool] = lambda n: True  # what the directory may hold after the kill


MOMENTS = {
    "chain_a": [
        Moment("0.3 s after start", lambda d, t: t > 0.3, lambda n: n == 0),
        Moment("after the first part", lambda d, t: len(part_files(d)) >= 1, lambda n: 0 < n < SWEEP_ROWS),
        Moment(
            "all rows in parts, before assembly",
            lambda d, t: rows_in_parts(d) >= SWEEP_ROWS,
            lambda n: n == SWEEP_ROWS,
        ),
    ],
    "chain_b": [
        Moment(
            "sweep dir created, before any part",
            lambda d, t: (d / "multirun.yaml").exists(),
            lambda n: n == 0,
        ),
        Moment(
            "after three parts (one group done)",
            lambda d, t: len(part_files(d)) >= 3,
            lambda n: 0 < n < SWEEP_ROWS,
        ),
        Moment("during assembly", lambda d, t: (d / "results.parquet").exists(), lambda n: n == SWEEP_ROWS),
    ],
}


@dataclass
class Killed:
    moment: str
    returncode: int
    rows: pd.DataFrame | None  # what the directory held right after the kill
    next_log: str = ""  # the output of the run that followed
    problems: list[str] = field(default_factory=list)


def _kill_at(cmd: list[str], sweep_dir: Path, moment: Moment, log: Path) -> int:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)
        start = time.monotonic()
        try:
            while proc.poll() is None and time.monotonic() - start < 300:
                if moment.reached(sweep_dir, time.monotonic() - start):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None and time.monotonic() - start >= 300:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _safe_read(sweep_dir: Path) -> pd.DataFrame | None:
    """The rows a sweep directory holds, or None when there is no directory or no results yet."""
    try:
        return read_sweep(sweep_dir)
    except (FileNotFoundError, ValueError):
        return None


def _chain(base: Path, moments: list[Moment]) -> tuple[Path, list[Killed]]:
    sweep_dir = base / "sweep"
    cmd = sweep_cmd(sweep_dir, *SWEEP, CHUNK)
    records = []
    for i, moment in enumerate(moments):
        rc = _kill_at(cmd, sweep_dir, moment, base / f"run{i}.log")
        rows = _safe_read(sweep_dir)
        if records:
            records[-1].next_log = (base / f"run{i}.log").read_text()
        records.append(Killed(moment.name, rc, rows))
    final = run(cmd)
    assert final.returncode == 0, final.stderr[-3000:]
    records[-1].next_log = final.stdout + final.stderr
    return sweep_dir, records


@pytest.fixture(scope="module")
def killed(tmp_path_factory, sweeps):
    base = tmp_path_factory.mktemp("killed")
    with ThreadPoolExecutor(len(MOMENTS)) as pool:
        futures = {}
        for name, moments in MOMENTS.items():
            (base / name).mkdir()
            futures[name] = pool.submit(_chain, base / name, moments)
        return {name: f.result() for name, f in futures.items()}


MOMENT_IDS = [(chain, i) for chain, moments in MOMENTS.items() for i in range(len(moments))]


@pytest.mark.parametrize(
    "chain, index", MOMENT_IDS, ids=[f"{c}: {MOMENTS[c][i].name}" for c, i in MOMENT_IDS]
)
def test_a_sigkill_leaves_only_whole_rows_and_the_rerun_resumes(killed, sweeps, chain, index):
    moment = MOMENTS[chain][index]
    record = killed[chain][1][index]
    assert record.returncode == -signal.SIGKILL, (
        f"the kill missed its moment ({moment.name}): exit {record.returncode}"
    )
    rows = record.rows if record.rows is not None else pd.DataFrame(columns=["config_hash"])
    assert moment.rows_after(len(rows)), f"{len(rows)} rows on disk after the kill {moment.name}"
    assert rows.config_hash.is_unique
    if len(rows):  # whatever survived is exactly the uninterrupted run's rows
        reference = table(sweeps["reference"]).set_index("config_hash")
        assert set(rows.config_hash) <= set(reference.index)
        same_rows(
            rows.set_index("config_hash")[reference.columns], reference.loc[rows.config_hash], rtol=1e-12
        )
    # the next run fits only the rows that are missing
    expected = f"{len(rows)} already done, {SWEEP_ROWS - len(rows)} to fit"
    assert expected in record.next_log, record.next_log[-2000:]


@pytest.mark.parametrize("chain", sorted(MOMENTS))
def test_after_the_kills_the_table_equals_an_uninterrupted_run(killed, sweeps, chain):
    sweep_dir, _ = killed[chain]
    resumed, uninterrupted = table(sweep_dir), table(sweeps["reference"])
    assert len(resumed) == SWEEP_ROWS and resumed.config_hash.is_unique
    assert list(resumed.config_hash) == list(uninterrupted.config_hash)
    same_rows(resumed, uninterrupted, rtol=1e-12)


def test_two_sweeps_at_once_into_different_directories_do_not_interfere(sweeps, tmp_path):
    link = tmp_path / "latest"
    other = [
        "separation=range(0.1,6,0.4)",
        "weight=0.6",
        "init_mu=0,3",
        "divergence=forward",
    ]
    cmds = {
        "a": kl_sweep(
            "-m", *SWEEP, CHUNK, f"hydra.sweep.dir={tmp_path / 'a'}", f"hydra.sweeper.latest_link={link}"
        ),
        "b": kl_sweep(
            "-m", *other, CHUNK, f"hydra.sweep.dir={tmp_path / 'b'}", f"hydra.sweeper.latest_link={link}"
        ),
    }
    procs = run_all({k: (v, False) for k, v in cmds.items()})
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}\n{proc.stderr[-3000:]}"
    a, b = table(tmp_path / "a"), table(tmp_path / "b")
    same_rows(a, table(sweeps["reference"]))
    assert len(b) == 15 * 2 and b.config_hash.is_unique and not set(a.config_hash) & set(b.config_hash)
    assert (b.divergence == "forward").all() and (b.weight == 0.6).all()
    var = 1 + b.separation**2 * 0.6 * 0.4
    mean = b.separation / 2 * (1 - 2 * 0.6)
    assert ((b.sigma2 - var).abs() / var).max() < 1e-8 and ((b.mu - mean).abs() / np.sqrt(var)).max() < 1e-8
    assert link.resolve() in {(tmp_path / "a").resolve(), (tmp_path / "b").resolve()}


def _mount_tmpfs(where: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


def test_a_full_or_read_only_sweep_directory_fails_before_fitting(tmp_path):
    """Real file systems: a 64 KiB tmpfs and a read-only tmpfs (as root), or a read-only folder."""
    full, read_only = tmp_path / "full", tmp_path / "ro"
    mounted = [p for p, opts in ((full, "size=64k"), (read_only, "ro,size=1m")) if _mount_tmpfs(p, opts)]
    try:
        cases = {}
        if full in mounted:
            cases["full"] = (full, "not enough free space")
        if read_only in mounted or os.geteuid() != 0:
            if read_only not in mounted:  # not root: an ordinary folder without write permission
                read_only.mkdir()
                read_only.chmod(0o500)
            cases["read-only"] = (read_only, "not writable")
        if not cases:
            pytest.skip("root without mount: no way to make a directory root cannot write")
        procs = run_all(
            {k: (sweep_cmd(d / "sweep", "experiment=smoke"), False) for k, (d, _) in cases.items()}
        )
        for name, (folder, says) in cases.items():
            proc = procs[name]
            shown = f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
            lines = error_lines(proc.stderr)
            assert proc.returncode != 0 and "Traceback" not in proc.stderr, shown
            assert len(lines) == 1 and says in lines[0] and str(folder) in lines[0], shown
            assert not (folder / "sweep").exists() and "configurations in" not in proc.stdout + proc.stderr
    finally:
        for p in mounted:
            subprocess.run(["umount", str(p)], capture_output=True)
        if read_only.exists() and read_only not in mounted:
            read_only.chmod(0o700)


def test_the_free_space_check_refuses_a_nearly_full_disk(tmp_path, monkeypatch):
    """Unit level, on any machine: shutil.disk_usage reports little free space."""
    import collections

    from hydra_plugins.kl_sweep_sweeper import _core

    usage = collections.namedtuple("usage", "total used free")
    rows = 100_000
    monkeypatch.setattr(_core.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(_core.SweepError) as info:
        _core._check_writable(tmp_path / "sweep", rows)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "free space" in message and str(tmp_path) in message
    assert "4096 bytes free" in message
    assert not (tmp_path / "sweep").exists()
    # with room to spare the same sweep passes the check
    monkeypatch.setattr(_core.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    _core._check_writable(tmp_path / "sweep", rows)
