"""Cases found by attacking the CPU kernels, the per-pass image batches and glibc's malloc setting."""
from __future__ import annotations

import pytest
import torch
from test_heap import has_mallinfo2, probe

from altclip_cli.nn import layers

glibc_only = pytest.mark.skipif(not has_mallinfo2(), reason="glibc 2.33 or newer only")


@glibc_only
@pytest.mark.parametrize("tunables", ["glibc.malloc.trim_threshold=131072",
                                      "glibc.malloc.check=0:glibc.malloc.mmap_threshold=131072"])
def test_a_users_own_glibc_tunable_stays(tunables):
    """GLIBC_TUNABLES is glibc's documented way to set the same thresholds as MALLOC_*_."""
    result = probe("set", GLIBC_TUNABLES=tunables)
    assert result["set"] is False
    assert result["mapped_mb"] >= 90  # the user's (here glibc's default) threshold, not altclip's


@glibc_only
def test_other_glibc_tunables_do_not_stop_the_setting():
    result = probe("set", GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    assert result["set"] is True


def test_a_bf16_linear_on_the_cpu_still_has_gradients():
    """oneDNN's linear has no backward: with autograd recording, x.grad must still be F.linear's,
    not silently absent (PyTorch only warns that the op has no autograd kernel)."""
    torch.manual_seed(0)
    linear = layers.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    linear(x).float().sum().backward()
    expected = torch.ones(3, 8) @ linear.weight.float()
    assert x.grad is not None
    torch.testing.assert_close(x.grad.float(), expected, atol=0.05, rtol=0.02)
