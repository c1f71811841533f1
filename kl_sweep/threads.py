"""How many threads a fit process uses: every core it may run on, shared fairly among shards.

torch's own default is the machine's core count, which ignores the process's CPU affinity (a
SLURM step, ``taskset``, a container's cpuset) and multiplies when several shards run side by side
(joblib gives each worker all threads: oversubscription, slower than one shard). The rule here:

- the budget is ``OMP_NUM_THREADS`` when it is set (a user's or a scheduler's explicit choice),
  else the number of cores this process may run on (``os.sched_getaffinity``);
- a sweep run as one process (the basic launcher) fits with the whole budget;
- a sweep split into shards that run at the same time gives each shard ``budget // concurrent``
  threads (at least 1), where ``concurrent`` is how many shards the launcher runs at once.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_budget(environ: dict[str, str] | None = None) -> int:
    """``OMP_NUM_THREADS`` if it is a positive integer, else :func:`available_cores`."""
    value = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "")
    try:
        n = int(value)
    except ValueError:
        n = 0
    return n if n > 0 else available_cores()


def threads_per_shard(budget: int, concurrent: int) -> int:
    """Threads for each of ``concurrent`` shards sharing ``budget`` threads (at least 1)."""
    return max(1, budget // max(1, concurrent))
