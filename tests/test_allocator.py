"""The CPU allocator settings: large tensors come from the heap, and freed memory stays in the process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import torch
    from oppu.allocator import keep_freed_memory

    print(keep_freed_memory())

    def in_heap(ptr):
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= ptr < hi:
                    return True
        return False

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20

    big = torch.ones(6 * 2 ** 20)  # 24 MiB: a fresh mapping under glibc's defaults (threshold 128 KiB at start)
    print(in_heap(big.data_ptr()))
    del big
    held = [torch.ones(2 ** 20) for _ in range(50)]  # 200 MiB in 4 MiB tensors, as a step's activations
    before = resident_mib()
    del held
    print(before - resident_mib())
""")


def _probe(**env: str) -> list[str]:
    """What a fresh process prints: whether the settings were applied, whether a 24 MiB tensor lies in the heap,
    and how many MiB of resident memory freeing 200 MiB of tensors handed back."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", _PROBE], env={**clean, "OPPU_DEFAULT_MALLOC": "0", **env},
                          capture_output=True, text=True, check=True, timeout=120).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_large_tensors_come_from_the_heap_and_freed_memory_stays():
    """With the settings, a 24 MiB tensor is carved from the heap (glibc's default maps it afresh), and freeing
    200 MiB of tensors gives no resident memory back (the default trims it, so the next step faults it in again:
    the page faults `oppu.allocator` exists to remove). The opt-out shows the default behaviour, so the probe
    tells the two apart."""
    applied, in_heap, handed_back = _probe()
    assert (applied, in_heap) == ("True", "True")
    assert float(handed_back) < 8, handed_back  # a few MiB of other frees at most, not the 200 MiB
    default = _probe(OPPU_DEFAULT_MALLOC="1")
    assert default[:2] == ["False", "False"] and float(default[2]) > 100, default


def test_the_users_own_allocator_settings_win():
    """glibc settings of the user's own in the environment leave the allocator alone."""
    assert _probe(MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")[0] == "False"
