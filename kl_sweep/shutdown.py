"""Ending a process that has loaded torch without tearing its interpreter down.

Once a sweep's table is written, tearing down an interpreter that has imported torch, pandas and
Hydra still takes 0.4-0.7 s: module teardown, a last garbage collection, torch's C++ static
destructors. None of it saves anything. Every file is written atomically and closed before then.
So the command line ends with :func:`run_then_exit`, and joblib's forkserver with
:func:`exit_quickly`. The forkserver matters as much: it outlives the command line by that long and
holds its output open meanwhile, so whatever reads that output (a pipe, ``| tee``, a
``subprocess`` call) waits for it.

Both still run the exit handlers that do matter (logging's flush, multiprocessing's cleanup) and
flush the standard streams; only the teardown after them is skipped.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def _exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` would end with (a message is printed, as it would be)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe: nothing more can be said
            pass


def run_then_exit(entry: Callable[[], object]) -> NoReturn:
    """Run ``entry``; then run the exit handlers, flush the streams and end the process at once.

    An exception other than ``SystemExit`` propagates as usual (Python prints it and exits). So
    does every exit while another non-daemon thread still runs: Python would wait for it.
    """
    try:
        entry()
        code = 0
    except SystemExit as ex:
        code = _exit_code(ex.code)
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def exit_quickly() -> None:
    """Have this process (not the ones it forks) end without teardown at its exit.

    Exit handlers run last-registered first: those registered after this call still run, those
    registered before it are skipped. Call it first thing, in a process whose earlier handlers have
    nothing to do (the forkserver's are multiprocessing's own, for processes it never starts).
    """
    pid = os.getpid()

    def _now() -> None:
        if os.getpid() == pid:
            _flush()
            os._exit(0)

    atexit.register(_now)
