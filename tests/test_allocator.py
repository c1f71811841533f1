"""kl_sweep.allocator: freed temporaries stay in the process, so a fit's steps do not page-fault."""

import subprocess
import sys

import pytest

# A fit's steps in miniature: a dozen [rows, nodes] float64 temporaries alive at once, then freed,
# with fewer rows each step (rows leave as they finish).
SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "on":
    from kl_sweep.allocator import keep_freed_memory
    assert keep_freed_memory()
x = torch.ones(8192, 114, dtype=torch.float64)
def step(rows):
    temporaries = [x[:rows] * k for k in range(12)]
    return sum(t.sum() for t in temporaries)
step(8192)  # the first step faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(1, 31):
    step(8192 - 100 * i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, env=None
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    # 7.5 MB a temporary = about 1,800 pages: by default glibc returns them to the kernel and each
    # step faults them in again; with the allocator's thresholds raised they are reused.
    assert faults("off") > 30 * 12 * 1000
    assert faults("on") < 1000
