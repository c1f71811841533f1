"""kl_sweep.allocator: freed temporaries stay in the process, so a fit's steps do not page-fault."""

import json
import os
import subprocess
import sys

import pytest

# A fit's steps in miniature: a dozen [rows, nodes] float64 temporaries alive at once, then freed,
# with fewer rows each step (rows leave as they finish). Prints how much resident memory freeing
# the first step's temporaries gave back, and the page faults of the 30 steps after it.
SCRIPT = """
import json, os, resource, sys, torch
if sys.argv[1] == "on":
    from kl_sweep.allocator import keep_freed_memory
    assert keep_freed_memory()
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
x = torch.ones(8192, 114, dtype=torch.float64)
def step(rows):
    temporaries = [x[:rows] * k for k in range(12)]
    return sum(t.sum() for t in temporaries)
temporaries = [x * k for k in range(12)]
held = resident()
del temporaries
given_back = held - resident()
step(8192)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(1, 31):
    step(8192 - 100 * i)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"given_back": given_back, "faults": faults}))
"""


def measure(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's, statm is Linux's")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    off, on = measure("off"), measure("on")
    # By default glibc hands 7.5 MB blocks straight back to the kernel (the 12 freed here: 90 MB),
    # and a later step faults them in again; with the thresholds raised it keeps them for reuse,
    # and 30 steps fault nothing in. (How many faults the default costs depends on the kernel's
    # page size policy: 50,000 to 530,000 here.)
    assert off["given_back"] > 80e6, off
    assert on["given_back"] < 1e6, on
    assert on["faults"] < 1000, on
    assert off["faults"] > 10 * on["faults"], (off, on)


def test_small_pages_turns_off_numpys_huge_page_advice_and_arrows_mimalloc():
    script = (
        "import numpy as np, pyarrow as pa\n"
        "from kl_sweep.allocator import small_pages\n"
        "small_pages()\n"
        "advice = np._core.multiarray._set_madvise_hugepage(True)\n"  # returns the setting it replaces
        "print(pa.default_memory_pool().backend_name, advice)\n"
    )
    unset = ("NUMPY_MADVISE_HUGEPAGE", "ARROW_DEFAULT_MEMORY_POOL")  # either would preset what is tested
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["system", "False"]
