import os
import sys
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import KLSweepSweeperConf  # noqa: F401  (registers the config)


class KLSweepSweeper(Sweeper):
    """Expands the sweep into a table, fits it in batched chunks, writes ``results.parquet``."""

    def __init__(
        self,
        params: dict[str, str] | None = None,
        chunk_size: int = 8192,
        shards: int = 1,
        shard_size: int | None = None,
        latest_link: str | None = "multirun/latest",
        max_configurations: int = 100_000_000,
        on_version_change: str = "stop",
        stale_lock_seconds: float = 600.0,
    ) -> None:
        self.options = dict(
            params=dict(params or {}),
            chunk_size=chunk_size,
            shards=shards,
            shard_size=shard_size,
            latest_link=latest_link,
            max_configurations=max_configurations,
            on_version_change=on_version_change,
            stale_lock_seconds=stale_lock_seconds,
        )
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def sweep(self, arguments: list[str]) -> Any:
        assert self.hydra_context is not None and self.task_function is not None and self.config is not None
        if "joblib" in str(self.config.hydra.launcher.get("_target_", "")):
            from kl_sweep.workers import use_forkserver

            use_forkserver()  # a no-op when the command line did
        from kl_sweep.validate import ConfigError

        from ._core import SweepError, run_sweep

        try:
            return run_sweep(self.hydra_context, self.task_function, self.config, arguments, **self.options)
        except (ConfigError, SweepError) as ex:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            # One line, no traceback: exit status 2 for a sweep that cannot start (nothing written,
            # as with a single run's bad input), 1 for one that started but could not finish.
            print(ex, file=sys.stderr)
            raise SystemExit(getattr(ex, "exit_code", 2)) from None
