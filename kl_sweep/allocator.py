"""How the process takes memory from the kernel: freed memory kept, small pages.

:func:`keep_freed_memory`: freed memory stays in the process, so a fit's temporaries are not
page-faulted in at every step.

A batched fit allocates the same few dozen [rows, nodes] float64 temporaries at every step (7 MB
each for a chunk of 8192 rows) and frees them at once. glibc's malloc hands blocks that large back
to the kernel (``mmap``/``munmap``, and trimming the top of the heap), so every step faults them in
again, page by page. Measured on this project's 2-core machine, 10,000 reverse KL fits: 1.1 million
minor page faults and 2.0 s of system time in a 4.8 s fit; with the thresholds below, 6 faults and
3.0 s in all (about 1.6x). The cost is that the process keeps its peak heap until it exits, which
a sweep's peak RSS already bounds.

This is plumbing: the entry points (the Hydra app, ``python -m analysis``, the benchmarks, the
tests) call :func:`keep_freed_memory` once, and the command line and the Hydra app call
:func:`small_pages` too; the numerical core never touches the allocator. On a
C library without ``mallopt`` (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap, not from mmap: glibc's largest allowed value on 64-bit.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap kept for reuse instead of being returned to the kernel (the
#: largest value mallopt's int argument takes: 2 GiB).
TRIM_THRESHOLD = 2**31 - 1

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True if they were set."""
    global _done
    if _done is None:
        _done = False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name)
            mallopt = libc.mallopt
        except (OSError, AttributeError, TypeError):
            return False
        mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        mallopt.restype = ctypes.c_int
        # mallopt returns 1 on success.
        mmap_set = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        _done = mmap_set and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done


def small_pages() -> None:
    """Have numpy and Arrow allocate without asking the kernel for transparent huge pages.

    numpy advises huge pages (``madvise(MADV_HUGEPAGE)``) for every array of 4 MiB or more, and
    pyarrow's default allocator (mimalloc) backs its arenas with them. Where the kernel compacts
    memory to find a free 2 MiB page when such a page is first touched
    (``/sys/kernel/mm/transparent_hugepage/defrag`` set to ``madvise``, the default of many
    distributions), that first touch stalls in the kernel. A sweep's planning and assembly touch
    about a GB of fresh memory at a million configurations. Measured by ``benchmarks/pages.py`` on
    this project's 2-core machine (1,020,000 configurations, fresh processes, medians of five):
    planning 1.16 -> 0.84 s, assembling the table 3.81 -> 2.67 s, and their system time
    3.65 -> 1.32 s.

    numpy is told not to advise them (its ``NUMPY_MADVISE_HUGEPAGE=0``, set at run time), and
    Arrow is given the system allocator (glibc's malloc, which :func:`keep_freed_memory` tunes).
    Plumbing, like :func:`keep_freed_memory`: the entry points call it; results do not depend on it.
    """
    import numpy as np
    import pyarrow as pa

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    core.multiarray._set_madvise_hugepage(False)
    pa.set_memory_pool(pa.system_memory_pool())
