"""The ``detoxrl`` command keeps freed memory for reuse (``runs.preflight.reuse_freed_memory``).

The allocator is process state, so the page-fault check runs in a child process.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from detoxrl.runs.preflight import reuse_freed_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux"
                                or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's")

CHILD = """
import resource, torch
from detoxrl.runs.preflight import reuse_freed_memory

def faults(n=8):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: over glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

default = faults()
assert reuse_freed_memory()
faults(16)  # the heap grows until freed blocks fit the next request
print(default, faults())
"""


@glibc_only
def test_a_freed_vocabulary_sized_block_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    default, reused = int(out[0]), int(out[1])
    assert reused * 4 < default, (default, reused)


@glibc_only
@pytest.mark.parametrize("variable", ["MALLOC_ARENA_MAX", "LD_PRELOAD"])
def test_an_allocator_the_user_chose_is_left_alone(monkeypatch, variable):
    monkeypatch.setenv(variable, "2" if variable.startswith("MALLOC") else "libjemalloc.so.2")
    assert reuse_freed_memory() is False
