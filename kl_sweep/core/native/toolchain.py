"""Compile a kernel's C source once per machine and keep the shared library in a cache.

The library is built with the system C compiler (``CC``, else ``cc``) for this CPU
(``-march=native``) and named by a hash of everything that shapes it: the source, the flags, the
compiler's version, the machine and its CPU flags. A cluster's shared home then holds one library
per kind of node, and an edit to the source rebuilds it. It is written under a temporary name and
renamed into place, so processes building at the same time (a sweep's shards) never load a
partial file. The cache is ``KL_SWEEP_CACHE``, else ``$XDG_CACHE_HOME/kl_sweep``, else
``~/.cache/kl_sweep``; where that cannot be written (a read-only home), a folder in the system's
temporary directory. A cached library that will not load is moved aside (never deleted) and built
again.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

BASE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")
#: glibc's vector math library (vector exp and log1p); tried first, then the flags without it.
MVEC_FLAGS = ("-DKL_SWEEP_MVEC", "-lmvec")
#: The node loops in 512-bit vectors where the CPU has them (AVX-512: compilers default to 256-bit
#: there): on this project's 2-core AVX-512 machine, whole fits 1.24-1.3x faster
#: (benchmarks/fit_throughput.py). Elsewhere it changes nothing. Tried first, then without it.
WIDE_FLAGS = ("-mprefer-vector-width=512",)


def cache_dir() -> Path:
    if os.environ.get("KL_SWEEP_CACHE"):
        return Path(os.environ["KL_SWEEP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kl_sweep"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def build_dir() -> Path:
    """:func:`cache_dir` if it can be written, else a folder of this user's in the temporary directory."""
    preferred = cache_dir()
    if _writable(preferred):
        return preferred
    return Path(tempfile.gettempdir()) / f"kl_sweep-{os.getuid()}"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def build(name: str) -> tuple[Path | None, str]:
    """(path of the compiled library, "") or (None, why it could not be built)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler: {cc!r} is not on PATH"
    source = resources.files(__package__).joinpath(f"{name}.c").read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cc} --version failed: {exc}"
    errors = []
    for extra in ((*WIDE_FLAGS, *MVEC_FLAGS), MVEC_FLAGS, ()):
        flags = (*BASE_FLAGS, *extra)
        key = hashlib.sha256(
            b"\0".join(s.encode() if isinstance(s, str) else s for s in (
                source, " ".join(flags), version, platform.machine(), _cpu_flags()))
        ).hexdigest()[:16]  # fmt: skip
        target = build_dir() / f"{name}-{key}.so"
        if target.exists():
            return target, ""
        error = _compile(cc, source, flags, target)
        if error is None:
            return target, ""
        errors.append(error)
    return None, "; ".join(errors)


def load(name: str) -> tuple[ctypes.CDLL | None, str]:
    """The kernel library ``name``, built if needed, or (None, why not)."""
    reason = ""
    for _ in range(2):  # a damaged cached file is moved aside and built once more
        path, reason = build(name)
        if path is None:
            return None, reason
        try:
            return ctypes.CDLL(str(path)), ""
        except OSError as exc:
            aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            try:
                os.replace(path, aside)
            except OSError:
                return None, f"{path} does not load ({exc}) and cannot be moved aside"
            reason = f"{path} did not load ({exc}); moved to {aside.name}"
    return None, reason


def _compile(cc: str, source: bytes, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile ``source`` to ``target`` atomically; None on success, else the compiler's first line."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            src, out = Path(tmp) / "kernel.c", Path(tmp) / "kernel.so"
            src.write_bytes(source)
            libs = [f for f in flags if f.startswith("-l")]
            opts = [f for f in flags if not f.startswith("-l")]
            command = [cc, *opts, str(src), "-o", str(out), *libs, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[0]
                return f"{cc} failed: {first}"
            os.replace(out, target)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot build in {target.parent}: {exc}"
    return None
