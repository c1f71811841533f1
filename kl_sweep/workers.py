"""Worker processes that start with the fit already imported.

Hydra's joblib launcher runs each shard in a worker process of joblib's pool (loky). By default
every worker is a fresh interpreter that imports Hydra, pandas, torch and the fit before its
first row: about 2 s of CPU each, as long as one core takes to fit some 50,000 configurations,
and all of it after the sweeper has planned. :func:`start_forkserver` instead starts one
*forkserver* (the standard library's ``multiprocessing.forkserver``) that imports all that once,
on another core while this process composes and plans; joblib's workers are then forked from it
as soon as those imports are done (at 163,200 configurations on 2 cores, a worker's first row
came 0.7-0.9 s after the launch, against 1.4-2.0 s).

The command line calls it first thing, when its arguments ask for the joblib launcher
(:func:`asks_for_joblib`); the sweeper calls it again (a no-op by then) for a launcher chosen in a
config file. Rows do not depend on it: a worker's torch threads are set from its shard file
(:func:`kl_sweep.sweep.run_shard`), not from the environment that loky would otherwise give it.
"""

from __future__ import annotations

import logging
import multiprocessing

#: What a shard's worker imports before its first row: the launcher's job runner and the fit;
#: first, what makes the forkserver end without tearing all that down (kl_sweep.shutdown).
PRELOAD = (
    "kl_sweep._forkserver",
    "hydra_plugins.hydra_joblib_launcher._core",
    "kl_sweep.app",
    "kl_sweep.table",
)

log = logging.getLogger("kl_sweep")
_started = False


def asks_for_joblib(argv: list[str]) -> bool:
    """True when a command line is a multirun on Hydra's joblib launcher (``hydra/launcher=joblib``)."""
    if not any("joblib" in arg for arg in argv):  # the common case, without parsing
        return False
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(argv)
    if not args.multirun:
        return False
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException:  # the pre-flight reports it
        return False
    return any(o.key_or_group == "hydra/launcher" and o.value() == "joblib" for o in overrides)


def start_forkserver() -> bool:
    """Have joblib's workers forked from a process that has imported the fit; start it now.

    Returns True when workers will start that way (also when an earlier call set it up). Returns
    False where the platform has no forkserver (Windows) or it cannot start (a sandbox without
    Unix sockets, no process left to start): workers then start as fresh interpreters, as loky
    starts them by default, and the sweep runs as it would have.
    """
    global _started
    if _started:
        return True
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    from multiprocessing import forkserver

    from joblib.externals.loky.backend.context import set_start_method

    multiprocessing.set_forkserver_preload(list(PRELOAD))
    try:
        forkserver.ensure_running()  # it imports PRELOAD in the background from here on
    except OSError as ex:
        log.debug(f"kl_sweep: no forkserver ({ex}); joblib's workers start as fresh interpreters")
        return False
    set_start_method("forkserver", force=True)  # the context loky's pool starts its workers with
    _started = True
    return True
