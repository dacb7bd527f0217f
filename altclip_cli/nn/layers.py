"""Primitives both towers share: parameter layers that can skip their random initialisation, an
fp32 LayerNorm, the activations, multi-head attention."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

# True while `uninitialised()` is active in this thread (or asyncio task): altclip's own layers
# then leave their parameters as allocated. Other code's modules, and other threads, are not
# touched (patching torch.nn.init would reach them too).
_SKIP_INIT: ContextVar[bool] = ContextVar("altclip_skip_init", default=False)


@contextmanager
def uninitialised():
    """Build altclip's layers without random initialisation: the checkpoint supplies every tensor,
    and initialising meta tensors imports torch._dynamo (0.8 s of a cold start)."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


class SkipInit:
    """Mixin: `reset_parameters` is a no-op inside `uninitialised()`. A module of ours that has
    parameters of its own defines `_reset_parameters`; torch's layers have `reset_parameters`."""

    def reset_parameters(self) -> None:
        if _SKIP_INIT.get():
            return
        own = getattr(self, "_reset_parameters", None)
        if own is not None:
            own()
        else:
            super().reset_parameters()


class Linear(SkipInit, nn.Linear):
    pass


class Embedding(SkipInit, nn.Embedding):
    pass


class Conv2d(SkipInit, nn.Conv2d):
    pass


class LayerNorm(SkipInit, nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, returning fp32.

    Under mixed precision the residual stream therefore stays fp32 and only the matmuls run
    in bf16/fp16 (the runtime keeps these parameters in fp32).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(1.702 x), computed in place on the one temporary: 17% faster on the CPU.
    return torch.sigmoid_(x * 1.702).mul_(x)


ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form, as XLM-R and ViT-H use
    "quick_gelu": quick_gelu,  # OpenAI CLIP's approximation, as AltCLIP's ViT-L uses
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention over (B, T, D) projections; mask: (B, 1, 1, T) bool, True = attend."""
    b, t, d = q.shape
    # (B, T, D) -> (B, H, T, D/H)
    q, k, v = (x.view(b, t, heads, d // heads).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale: (D/H) ** -0.5
    return out.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
