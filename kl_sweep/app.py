"""The Hydra application: one configuration per call, so any Hydra sweeper can drive it."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kl_sweep.allocator import keep_freed_memory, small_pages
from kl_sweep.config import CONFIG_DIR, config_values, split_values
from kl_sweep.io import write_parquet
from kl_sweep.rows import rows_frame
from kl_sweep.sweep import run_shard
from kl_sweep.threads import thread_budget
from kl_sweep.validate import validate

log = logging.getLogger("kl_sweep")
RESULTS = "results.parquet"


def run(cfg: DictConfig, output_dir: str | Path) -> float:
    """Fit one configuration, write its one-row ``results.parquet`` into ``output_dir``, return the loss.

    Validation comes first: a bad value raises before any fit and nothing is written. A job the
    kl_sweep sweeper launches carries ``shard``: it fits that shard's rows instead.
    """
    from kl_sweep.table import run_rows  # torch: loaded by the process that fits, when it fits

    if cfg.get("shard"):
        return float(run_shard(cfg.shard))
    values = config_values(cfg)
    validate(values)
    row_values, shared = split_values(values)
    result = run_rows(rows_frame(row_values, 1), shared)
    write_parquet(result, Path(output_dir) / RESULTS)
    r = result.iloc[0]
    is_kl = r.divergence in ("forward", "reverse")
    in_nats = is_kl or r.divergence in ("renyi", "jensen_shannon")  # D_a, H^2 and chi2 have no unit
    name = f"{r.divergence}{' KL' if is_kl else ''}{'' if pd.isna(r.alpha) else f'(alpha={r.alpha:g})'}"
    edge = " (on the edge of the finite region)" if r.on_boundary else ""
    if r.target_file is not None:  # mu and sigma2 along e_1
        name = f"{name} in d={r.dim} ({r.q_family} Q, target {r.target_file}, along e_1)"
    elif r.dim > 1:  # Q along u, and its shape
        name = f"{name} in d={r.dim} ({r.q_family} Q, direction {r.direction}, correlation {r.correlation:g})"
    log.info(
        f"{name}: mu={r.mu:.6g} sigma2={r.sigma2:.6g}{edge} "
        f"loss={r.loss:.6g}{' nats' if in_nats else ''} steps={r.steps} status={r.status}"
    )
    return float(r.loss)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    import torch

    torch.set_num_threads(thread_budget())  # a shard may set its own share (kl_sweep.sweep.run_shard)
    keep_freed_memory()  # the fit's temporaries stay in the heap between steps (kl_sweep.allocator)
    small_pages()  # and no stalls for huge pages in reading and writing tables (kl_sweep.allocator)
    return run(cfg, HydraConfig.get().runtime.output_dir)
