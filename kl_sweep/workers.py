"""Worker processes that start with the fit already imported.

Hydra's joblib launcher runs each shard in a worker process of joblib's pool (loky). By default
every worker is a fresh interpreter that imports Hydra, pandas, torch and the fit before its
first row: about 2 s of CPU each, as long as one core takes to fit some 50,000 configurations,
and all of it after the sweeper has planned. :func:`start_forkserver` instead starts one
*forkserver* (the standard library's ``multiprocessing.forkserver``) that imports all that once,
on another core while this process composes and plans; joblib's workers are then forked from it
as soon as those imports are done (at 163,200 configurations on 2 cores, a worker's first row
came 0.7-0.9 s after the launch, against 1.4-2.0 s).

``python -m kl_sweep`` starts the forkserver before its own imports when its arguments may ask
for the joblib launcher (:func:`might_ask_for_joblib`), and the command line points loky at it
once they do (:func:`asks_for_joblib`, :func:`use_forkserver`); the sweeper calls
:func:`use_forkserver` again (a no-op by then) for a launcher chosen in a config file. Rows do not
depend on it: a worker's torch threads are set from its shard file
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
#: Whether the forkserver runs: None until :func:`start_forkserver` is first called.
_running: bool | None = None
#: Whether loky starts joblib's workers from it (:func:`use_forkserver`).
_used = False


def might_ask_for_joblib(argv: list[str]) -> bool:
    """True for every command line :func:`asks_for_joblib` accepts (and a few more), without Hydra.

    For ``python -m kl_sweep`` to start the forkserver before its own imports (Hydra's take 0.2-0.3
    s); a forkserver started for a command line that turns out not to need it idles and ends with it.
    """
    return any("joblib" in arg for arg in argv) and any(arg in ("-m", "--multirun") for arg in argv)


def asks_for_joblib(argv: list[str]) -> bool:
    """True when a command line is a multirun on Hydra's joblib launcher (``hydra/launcher=joblib``)."""
    if not might_ask_for_joblib(argv):  # the common case, without parsing
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
    """Start the forkserver, which imports :data:`PRELOAD` in the background from then on.

    Returns True when it runs (also when an earlier call started it). Returns False where the
    platform has no forkserver (Windows) or it cannot start (a sandbox without Unix sockets, no
    process left to start).
    """
    global _running
    if _running is None:
        _running = False
        if "forkserver" in multiprocessing.get_all_start_methods():
            from multiprocessing import forkserver

            multiprocessing.set_forkserver_preload(list(PRELOAD))
            try:
                forkserver.ensure_running()
                _running = True
            except OSError as ex:
                log.debug(f"kl_sweep: no forkserver ({ex}); joblib's workers start as fresh interpreters")
    return _running


def use_forkserver() -> bool:
    """Have joblib's workers forked from the forkserver (started now if it is not running yet).

    Returns True when workers will start that way. Without a forkserver (:func:`start_forkserver`
    returned False), workers start as fresh interpreters, as loky starts them by default, and the
    sweep runs as it would have.
    """
    global _used
    if not _used and start_forkserver():
        from joblib.externals.loky.backend.context import set_start_method

        set_start_method("forkserver", force=True)  # the context loky's pool starts its workers with
        _used = True
    return _used
