"""runtime/heap.py: on glibc, blocks the model allocates stay in malloc's heap, and memory it frees
is kept there for its next pass, instead of being mapped fresh from the kernel and given back
each time (then faulted in again, page by page). Read off glibc's own counters (mallinfo2), in a
fresh process whose malloc has seen nothing yet."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

# Holds 25 blocks of 4 MB (as the image tower's temporaries are), frees them, and prints glibc's
# bytes in blocks mapped on their own (hblkhd) while they are held, and its heap (arena) after.
PROBE = r"""
import ctypes, json, sys
import torch
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
result = {}
if sys.argv[1] == "set":
    from altclip_cli.runtime.heap import reuse_freed_memory
    result["set"] = reuse_freed_memory()
elif sys.argv[1] == "load":  # what altclip's commands do first
    import altclip_cli
    altclip_cli.load(sys.argv[2], device="cpu", precision="fp32")
before = libc.mallinfo2()
held = [torch.ones(4 << 20, dtype=torch.uint8) for _ in range(25)]
result["mapped_mb"] = (libc.mallinfo2().hblkhd - before.hblkhd) / 2**20
del held
result["heap_after_mb"] = libc.mallinfo2().arena / 2**20
print(json.dumps(result))
"""


def probe(mode: str, *args: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return json.loads(out.splitlines()[-1])


def has_mallinfo2() -> bool:
    try:
        return bool(ctypes.CDLL(None).mallinfo2)
    except (OSError, AttributeError):
        return False


pytestmark = pytest.mark.skipif(not has_mallinfo2(), reason="glibc 2.33 or newer only")


def test_the_models_blocks_stay_in_the_heap_and_are_kept_when_freed():
    default = probe("default")
    assert default["mapped_mb"] >= 90  # what the setting is for: each block mapped on its own
    kept = probe("set")
    assert kept["set"] is True
    assert kept["mapped_mb"] < 10, kept
    assert kept["heap_after_mb"] >= 90, kept  # freed, and still there for the next pass


def test_a_users_own_malloc_setting_stays():
    result = probe("set", MALLOC_TRIM_THRESHOLD_="131072")
    assert result["set"] is False
    assert result["mapped_mb"] >= 90


def test_loading_a_model_on_the_cpu_sets_it(tiny_model_dir):
    result = probe("load", str(tiny_model_dir))
    assert result["mapped_mb"] < 10, result
    assert result["heap_after_mb"] >= 90, result
