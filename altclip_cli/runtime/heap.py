"""glibc's malloc, set once per process for the model on the CPU: keep freed memory for reuse.

By default glibc maps each block above a threshold (128 KB at first, rising with what is freed,
to at most 32 MB) fresh from the kernel, and gives back freed memory at the top of its heap. The
image tower's temporaries (up to 17 MB each, a few hundred MB a batch) then come back from the
kernel again and again, zeroed page by page: in some runs 100,000 page faults (400 MB) per 16
images, in others none, depending on the order blocks happened to be freed. With the threshold
fixed at 32 MB and freed memory kept up to 256 MB, every pass reuses the last one's memory.
"""
from __future__ import annotations

import ctypes
import os
from functools import cache

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for its moving threshold on 64-bit
TRIM_THRESHOLD = 256 << 20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
# The same two settings as glibc's tunables (GLIBC_TUNABLES=name=value:name=value), which newer
# glibc documents in place of the variables above: a user's setting made there stays too.
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def users_own_setting() -> bool:
    """Whether the environment sets glibc's mmap or trim threshold, in either of glibc's ways."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    return (any(name in os.environ for name in USER_SETTINGS)
            or any(entry.split("=", 1)[0].strip() in USER_TUNABLES for entry in tunables))


@cache
def reuse_freed_memory() -> bool:
    """Set glibc's malloc as above; True if it was set. Not where the C library is not glibc, nor
    where the user set MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, or either threshold
    in GLIBC_TUNABLES (their setting stays).
    Process-wide, as any malloc setting is; memory freed is kept for reuse, up to 256 MB."""
    if users_own_setting():
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _glibc = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl; Windows has no CDLL(None))
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
