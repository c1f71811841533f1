"""One sweep at a time per sweep directory: a lock file that works on shared (NFS) file systems.

The lock is ``SWEEP_DIR/.lock``, a small JSON file naming its holder (host, pid, the process's
start time, the machine's boot id, when it was taken, a random token). It is taken without
``flock`` (which NFS does not keep across hosts) and without ``O_EXCL`` (not atomic on old NFS):
the holder-to-be writes a file of its own under a unique name and ``link(2)``s it to ``.lock``.
``link`` is atomic on NFS, so exactly one of two racing sweeps succeeds; the one whose ``link``
fails reads the lock and either stops or, if the lock is stale, breaks it and tries again.

**Staleness rule.** A lock is stale, and the next sweep takes it over, when

- it was taken on this host in this boot, and its process is gone (or the pid now belongs to a
  process started at another time): a sweep killed by SIGKILL does not block the rerun at all;
- it was taken on this host in an earlier boot (the machine restarted);
- it was taken on another host and has had no heartbeat for ``stale_after`` seconds (default
  600). The holder touches the lock's modification time every ``stale_after / 10`` seconds (at
  most every 60 s) while it runs; a lost node stops doing so. Ages are measured on the file
  server's clock (the mtime of a file just written), so skewed client clocks do not matter.

A lock file that cannot be read as JSON counts as another host's lock (stale after
``stale_after`` seconds without change).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kl_sweep.lock")
LOCK = ".lock"
#: Seconds without a heartbeat after which another host's lock is stale.
STALE_AFTER = 600.0


class LockedError(RuntimeError):
    """The sweep directory is held by a live sweep."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass
class Holder:
    """Who holds (or held) a lock, as written in the lock file."""

    host: str
    pid: int
    since: str
    token: str
    boot_id: str | None = None
    process_start: str | None = None

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            token=uuid.uuid4().hex,
            boot_id=_boot_id(),
            process_start=_process_start(pid),
        )

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder named in ``path``; None if the file is not a lock this module wrote."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}"

    def stale_reason(self, age: float, stale_after: float) -> str | None:
        """Why this lock is stale (see the module's rule), or None when its sweep may be alive."""
        same_machine = self.host == socket.gethostname() and self.boot_id is not None
        if same_machine and self.boot_id == _boot_id():
            if not _alive(self.pid):
                return f"process {self.pid} is not running"
            start = _process_start(self.pid)
            if self.process_start is not None and start is not None and start != self.process_start:
                return f"pid {self.pid} is now another process"
            return None
        if same_machine:
            return f"{self.host} has restarted since"
        if age > stale_after:
            return f"no heartbeat for {age:.0f} s (more than {stale_after:.0f} s)"
        return None


class SweepLock:
    """``with SweepLock(sweep_dir):`` holds the sweep directory, or raises :class:`LockedError`.

    Released on exit (a lock left by a killed process is stale by the module's rule).
    """

    def __init__(self, sweep_dir: Path, stale_after: float = STALE_AFTER) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.path = self.sweep_dir / LOCK
        self.stale_after = stale_after
        self.me = Holder.me()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, breaking a stale one; raises :class:`LockedError` if a live sweep holds it."""
        mine = self.sweep_dir / f"{LOCK}.{self.me.host}.{self.me.pid}.{self.me.token}"
        try:
            with open(mine, "w") as handle:  # removed below, whole or not (a full disk)
                json.dump(self.me.__dict__, handle)
                handle.flush()
                os.fsync(handle.fileno())
            for _ in range(5):
                try:
                    os.link(mine, self.path)
                    break
                except FileExistsError:
                    pass
                except OSError:
                    if os.stat(mine).st_nlink != 2:  # NFS: the link may be made though the call failed
                        raise
                    break
                holder = Holder.read(self.path)
                try:
                    os.utime(mine)  # now, on the file server's clock
                    age = os.stat(mine).st_mtime - os.stat(self.path).st_mtime
                except FileNotFoundError:  # released meanwhile: try again
                    continue
                if holder is None:
                    holder_text, reason = (
                        "an unreadable lock",
                        (f"unreadable for {age:.0f} s" if age > self.stale_after else None),
                    )
                else:
                    holder_text, reason = holder.describe(), holder.stale_reason(age, self.stale_after)
                if reason is None:
                    raise LockedError(
                        f"kl_sweep: {self.sweep_dir} is in use by another sweep ({holder_text}); "
                        f"wait for it to end or choose another hydra.sweep.dir "
                        f"(a lock left by a dead sweep is taken over: see the README's staleness rule)"
                    )
                self._break(holder)
                log.warning(f"kl_sweep: taking over the stale lock of {holder_text}: {reason}")
            else:
                raise LockedError(f"kl_sweep: could not take the lock {self.path}: it keeps changing")
        finally:
            mine.unlink(missing_ok=True)
        self._beat = threading.Thread(target=self._heartbeat, name="kl_sweep-lock", daemon=True)
        self._beat.start()

    def _break(self, stale: Holder | None) -> None:
        """Remove the stale lock ``stale``, unless another sweep replaced it meanwhile."""
        aside = self.sweep_dir / f"{LOCK}.stale.{self.me.token}"
        try:
            os.rename(self.path, aside)  # atomic: of two sweeps breaking it, one gets it
        except FileNotFoundError:
            return
        taken = Holder.read(aside)
        if stale is not None and (taken is None or taken.token != stale.token):
            with contextlib.suppress(OSError):  # a live lock taken meanwhile: put it back
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        every = min(60.0, self.stale_after / 10)
        while not self._stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = Holder.read(self.path) if self.path.exists() else None
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SweepLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
