"""Fault injection for tests/test_faults.py, loaded by Python at start-up from ``PYTHONPATH``.

It does nothing unless one of these variables is set (the tests set them for one subprocess):

- ``KL_SWEEP_TEST_GATE=PATH``: every shard waits (at most 300 s) until the file PATH exists before
  fitting, so a sweep holds its directory while a second sweep (or a SIGKILL) meets it.
- ``KL_SWEEP_TEST_KILL_SHARD=N``: the process fitting shard N kills itself with SIGKILL after
  writing its first part (a worker lost to the OOM killer).
- ``KL_SWEEP_TEST_RAISE_SHARD=N``: shard N raises ``MemoryError`` after writing its first part.
- ``KL_SWEEP_TEST_FILL_DISK=PATH:K``: before the K-th part file is written, a ballast file PATH
  fills its file system (a small tmpfs), so that write meets a real ``ENOSPC``; with ``PATH``
  empty the write raises ``OSError(ENOSPC)`` itself (where no tmpfs can be mounted).

Production code has no hook of its own: this file wraps ``kl_sweep.sweep`` from outside.
"""

import os

_VARS = ("GATE", "KILL_SHARD", "RAISE_SHARD", "FILL_DISK")

if any(f"KL_SWEEP_TEST_{name}" in os.environ for name in _VARS):
    import errno
    import re
    import signal
    import time

    import kl_sweep.sweep as _sweep

    _state = {"shard": None, "parts": 0}
    _run_shard, _write_parquet = _sweep.run_shard, _sweep.write_parquet

    def _fill(ballast: str) -> None:
        if not ballast:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        try:
            with open(ballast, "ab") as out:
                while True:
                    out.write(b"\0" * 65536)
                    out.flush()
        except OSError:
            pass

    def write_parquet(frame, path, metadata=None):
        if _state["shard"] is None:  # the sweeper writing shard files, not a shard writing parts
            return _write_parquet(frame, path, metadata)
        _state["parts"] += 1
        fill = os.environ.get("KL_SWEEP_TEST_FILL_DISK")
        if fill is not None:
            ballast, at = fill.rsplit(":", 1)
            if _state["parts"] == int(at):
                _fill(ballast)
        done = _write_parquet(frame, path, metadata)
        if _state["parts"] == 1:
            if os.environ.get("KL_SWEEP_TEST_KILL_SHARD") == str(_state["shard"]):
                os.kill(os.getpid(), signal.SIGKILL)
            if os.environ.get("KL_SWEEP_TEST_RAISE_SHARD") == str(_state["shard"]):
                raise MemoryError("injected by the test: out of memory")
        return done

    def run_shard(path):
        match = re.search(r"shard-(\d+)\.parquet$", str(path))
        _state["shard"], _state["parts"] = (int(match.group(1)) if match else None), 0
        gate, deadline = os.environ.get("KL_SWEEP_TEST_GATE"), time.monotonic() + 300
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        return _run_shard(path)

    _sweep.run_shard, _sweep.write_parquet = run_shard, write_parquet
