"""The single-run command: its output, its table, its hash, and its refusals."""

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kl_sweep.app import CONFIG_DIR, run
from kl_sweep.config import config_values, split_values
from kl_sweep.io import read_metadata
from kl_sweep.table import COLUMNS, config_hashes, rows_frame
from kl_sweep.validate import ConfigError


def composed(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_single_run_prints_a_summary_and_writes_one_row(cli, tmp_path):
    out = tmp_path / "run"
    proc = cli("separation=3", "weight=0.75", "init_mu=1", "divergence=reverse", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    summary = [line for line in proc.stdout.splitlines() if "reverse KL" in line]
    assert len(summary) == 1 and "status=converged" in summary[0] and "nats" in summary[0]
    table = pd.read_parquet(out / "results.parquet")
    assert list(table.columns) == COLUMNS and len(table) == 1
    row = table.iloc[0]
    assert (row.divergence, row.estimator, row.optimizer, row.separation, row.weight) == (
        "reverse",
        "quadrature",
        "adam",
        3.0,
        0.75,
    )
    assert row.converged and row.status == "converged" and row.grad_norm <= 1e-8
    assert row.loss == row.kl_reverse and row.kl_forward > 0
    meta = read_metadata(out / "results.parquet")
    assert meta["kl_sweep"] and meta["torch"]


def test_run_returns_the_loss_for_any_sweeper(tmp_path):
    cfg = composed("separation=4", "divergence=forward", "weight=0.5")
    loss = run(cfg, tmp_path)
    # Forward KL at the moment-matched fit of an equal mixture at separation 4 (sigma2 = 5).
    assert loss == pytest.approx(pd.read_parquet(tmp_path / "results.parquet").loss.iloc[0])
    assert 0 < loss < 1


@pytest.mark.parametrize(
    "override, key",
    [
        ("separation=-1", "separation"),
        ("weight=0", "weight"),
        ("weight=1.5", "weight"),
        ("component_var=0", "component_var"),
        ("init_sigma2=-2", "init_sigma2"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.max_steps=0", "optimizer.max_steps"),
        ("separation=nan", "separation"),
        ("init_mu=inf", "init_mu"),
        ("separation=abc", "separation"),
        ("divergence=sideways", "divergence"),
        ("estimator=trapezoid", "estimator"),
        ("optimizer=lbfgs", "optimizer"),
        ("colour=red", "colour"),
        ("separation=[1", "separation"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, override, key):
    out = tmp_path / "run"
    proc = cli(override, f"hydra.run.dir={out}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_error_names_the_allowed_range():
    from kl_sweep.validate import validate

    values = config_values(composed())
    validate(values)  # the defaults are valid
    with pytest.raises(ConfigError, match=r"invalid weight=1\.0.*strictly between 0 and 1"):
        validate({**values, "weight": [0.5, 0.7, 1.0]})
    with pytest.raises(ConfigError, match=r"separation.*cannot be removed"):
        validate({k: v for k, v in values.items() if k != "separation"})


def test_config_hash_is_stable_and_covers_every_setting():
    base = config_values(composed("separation=2"))
    rows, shared = split_values(base)
    h = config_hashes(rows_frame(rows, 1), shared)[0]
    assert h == config_hashes(rows_frame(rows, 1), shared)[0] and len(h) == 16
    # separation=2 given as an int hashes like 2.0: the schema's type decides.
    rows_int = {**rows, "separation": 2}
    assert config_hashes(rows_frame(rows_int, 1), shared)[0] == h
    for changed in [
        "separation=2.5",
        "optimizer.lr=0.01",
        "estimator=grid",
        "divergence=reverse",
        "optimizer.beta2=0.99",
        "polish=false",
    ]:
        r, s = split_values(config_values(composed("separation=2", changed)))
        assert config_hashes(rows_frame(r, 1), s)[0] != h, changed
