from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class KLSweepSweeperConf:
    _target_: str = "hydra_plugins.kl_sweep_sweeper.kl_sweep_sweeper.KLSweepSweeper"
    params: dict[str, str] | None = None  # sweep parameters from the config; the command line wins
    chunk_size: int = 8192  # configurations per batched fit: bounds memory however large the sweep
    shards: int = 1  # Hydra jobs the sweep is split into, sent through the configured launcher
    shard_size: int | None = None  # configurations per job instead of a number of jobs
    latest_link: str | None = "multirun/latest"  # symlink to the newest sweep dir; null: none
    max_configurations: int = 100_000_000  # refuse larger sweeps before enumerating them
    on_version_change: str = "stop"  # rows of another numerics version in the sweep dir: stop|refit|keep
    stale_lock_seconds: float = 600.0  # another host's lock without a heartbeat this long is stale


ConfigStore.instance().store(
    group="hydra/sweeper", name="kl_sweep", node=KLSweepSweeperConf, provider="kl_sweep"
)
