"""Cases found by attacking the CPU kernels, the per-pass image batches and glibc's malloc setting."""
from __future__ import annotations

import pytest
from test_heap import has_mallinfo2, probe


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc 2.33 or newer only")
@pytest.mark.parametrize("tunables", ["glibc.malloc.trim_threshold=131072",
                                      "glibc.malloc.check=0:glibc.malloc.mmap_threshold=131072"])
def test_a_users_own_glibc_tunable_stays(tunables):
    """GLIBC_TUNABLES is glibc's documented way to set the same thresholds as MALLOC_*_."""
    result = probe("set", GLIBC_TUNABLES=tunables)
    assert result["set"] is False
    assert result["mapped_mb"] >= 90  # the user's (here glibc's default) threshold, not altclip's


def test_other_glibc_tunables_do_not_stop_the_setting():
    result = probe("set", GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    assert result["set"] is True
