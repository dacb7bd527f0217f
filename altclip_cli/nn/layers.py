"""Primitives both towers share: parameter layers that can skip their random initialisation, an
fp32 LayerNorm, the activations, multi-head attention.

Two of them pick their kernel by where the tensors are (as F.scaled_dot_product_attention does):
on the CPU, bf16 `Linear` calls oneDNN with the bias (and, where the caller asks, the activation)
applied as the matrix product is written, and `attention` is two batched matrix products around a
softmax unless the CPU has AMX; elsewhere both are the stock calls."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

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


# oneDNN's linear: `addmm`, which F.linear calls, first copies the bias into every row of the
# output and then accumulates the product into it (one more pass over the output, about 6% of the
# bf16 image tower's time); oneDNN adds the bias as it writes the product. Internal to torch (inductor uses
# it), so its absence falls back to F.linear.
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


# Activations oneDNN can apply as its linear writes the product (a post-op), which saves the passes
# over the (B, T, 4D) hidden layer that a separate activation makes (3 for quick_gelu, about 12% of
# the bf16 image tower on a CPU with AMX): name -> (post-op, algorithm, s), act(y) = post_op(s y) / s.
# oneDNN's swish, x sigmoid(x), takes no scale here, so quick_gelu(y) = y sigmoid(1.702 y) =
# swish(1.702 y) / 1.702: the caller applies s before the product and 1/s after it.
ONEDNN_ACTIVATIONS = {
    "quick_gelu": ("swish", "", 1.702),
    "gelu": ("gelu", "none", 1.0),  # "none": the exact erf form
    "gelu_new": ("gelu", "tanh", 1.0),
    "gelu_pytorch_tanh": ("gelu", "tanh", 1.0),
    "gelu_fast": ("gelu", "tanh", 1.0),
    "relu": ("relu", "", 1.0),
    "silu": ("swish", "", 1.0),
}


class Linear(SkipInit, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_on_onednn:
            return self.onednn(x)
        return F.linear(x, self.weight, self.bias)

    @property
    def runs_on_onednn(self) -> bool:
        # Not while autograd records (outside no_grad/inference_mode, as the runtime always runs):
        # oneDNN's linear has no backward, and PyTorch only warns and leaves the gradients out.
        w = self.weight
        return (w.dtype == torch.bfloat16 and w.device.type == "cpu" and _ONEDNN_LINEAR is not None
                and not torch.is_grad_enabled())

    def onednn(self, x: torch.Tensor, post_op: str = "none", algorithm: str = "",
                bias_scale: float = 1.0) -> torch.Tensor:
        """(..., in) -> (..., out) bf16: post_op(x W^T + bias_scale * b), in one oneDNN call (only
        where `runs_on_onednn`). The input is cast to bf16, as autocast would; a scaled bias is
        kept in fp32, which oneDNN adds as it is (no second rounding to bf16)."""
        bias = self.bias
        if bias is not None and bias_scale != 1.0:
            bias = bias.float() * bias_scale
        return _ONEDNN_LINEAR(x.to(self.weight.dtype), self.weight, bias, post_op, [], algorithm)

    def onednn_activation(self, name: str) -> tuple[str, str, float] | None:
        """(post-op, algorithm, s) for activation `name` fused into this layer's product, or None
        where it cannot be (not on oneDNN, or an activation it has no post-op for)."""
        return ONEDNN_ACTIVATIONS.get(name) if self.runs_on_onednn else None


class Embedding(SkipInit, nn.Embedding):
    pass


class Conv2d(SkipInit, nn.Conv2d):
    pass


class LayerNorm(SkipInit, nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, returning fp32.

    Under mixed precision the residual stream therefore stays fp32 and only the matmuls run
    in bf16/fp16 (the runtime keeps these parameters in fp32).
    """

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """scale: the output times `scale`, through the affine parameters (no extra pass)."""
        weight, bias = self.weight.float(), self.bias.float()
        if scale != 1.0:
            weight, bias = weight * scale, bias * scale
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(1.702 x), computed in place on the one temporary: 17% faster on the CPU; while
    # autograd records, out of place, as the sigmoid's backward needs its output.
    if torch.is_grad_enabled():
        return x * torch.sigmoid(x * 1.702)
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
    if q.device.type == "cpu" and t <= MATMUL_ATTENTION_MAX_TOKENS and not cpu_attention_is_flash(q.dtype):
        out = matmul_attention(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale: (D/H) ** -0.5
    return out.transpose(1, 2).reshape(b, t, d)  # (B, T, D)


# Sequences up to this long take matmul_attention on the CPU (the image tower's 257 tokens, most
# texts); longer ones keep the flash kernel, which never holds the (B, H, T, T) scores whole (a
# batch of 64 texts of 512 tokens would hold 0.5 GB of them in bf16). In bf16 on a CPU with AMX the
# flash kernel is used throughout: it runs its products on AMX tiles, as fast as matmul_attention
# there, and as it holds no scores the image tower can take 8 images a pass (runtime.device).
MATMUL_ATTENTION_MAX_TOKENS = 320


def cpu_attention_is_flash(dtype: torch.dtype) -> bool:
    """Whether attention in `dtype` on the CPU takes PyTorch's flash kernel whatever the length
    (bf16 on a CPU with AMX), rather than matmul_attention up to MATMUL_ATTENTION_MAX_TOKENS."""
    return dtype == torch.bfloat16 and cpu_has_amx()


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon from Sapphire Rapids on), as PyTorch sees it."""
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:  # noqa: BLE001 - a private probe: its absence or failure means "no"
        return False


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D/H)) v over (B, H, T, D/H): two batched matrix products in the inputs'
    dtype (accumulated in fp32) around a softmax (computed in fp32, stored in the inputs' dtype).
    On the CPU the products run near the matrix-product rate, where PyTorch's flash kernel reaches
    a third of it or less on 257-token sequences; the (B, H, T, T) scores are held whole, which
    the image tower's 4 images per pass on the CPU keep at 8 MB in bf16."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # (B, H, T, T)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, T, D/H)
