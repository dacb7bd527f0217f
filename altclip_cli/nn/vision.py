"""The image tower: a CLIP ViT (pre-LN). Module names follow the checkpoint keys under
`vision_model.` exactly. Read bottom-up: embeddings, attention, MLP, one layer, the tower."""
from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .layers import ACTIVATIONS, Conv2d, Embedding, LayerNorm, Linear, SkipInit, attention


class VisionEmbeddings(SkipInit, nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                      stride=cfg.patch_size, bias=False)
        self.position_embedding = Embedding(cfg.num_positions, cfg.hidden_size)
        self.reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.normal_(self.class_embedding, std=self.class_embedding.shape[0] ** -0.5)  # as CLIP

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, D)
        # Summed in fp32 (pre_layrnorm follows in fp32 anyway).
        return torch.cat([cls, patches], dim=1).float() + self.position_embedding.weight.float()  # (B, N+1, D)


class SelfAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.q_proj.weight.dtype)  # cast once for the three projections, not in each
        return self.out_proj(attention(self.q_proj(h), self.k_proj(h), self.v_proj(h), self.heads))


def add_residual_(h: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """h + alpha x, added into h in place; a new tensor while autograd records, since the layer
    norm that read h saved it for the backward pass (changing it would make the backward fail)."""
    return h.add(x, alpha=alpha) if torch.is_grad_enabled() else h.add_(x, alpha=alpha)


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation = cfg.hidden_act  # quick_gelu for AltCLIP; the m18 tower says gelu
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(h)))

    def add_to_(self, h: torch.Tensor, norm: LayerNorm) -> torch.Tensor:
        """h += self(norm(h)), in place (see add_residual_): (B, T, D) fp32, the pre-LN block's
        second half.

        On oneDNN (bf16 on the CPU) the activation runs inside fc1's product. Its scale s
        (act(y) = post_op(s y) / s) goes into the layer norm's affine parameters and fc1's bias,
        and 1/s into the residual add, with fc2's bias times s to match; the bf16 weights are
        used as they are, so nothing is rounded twice."""
        fused = self.fc1.onednn_activation(self.activation)
        if fused is None:
            return add_residual_(h, self(norm(h)))
        post_op, algorithm, s = fused
        hidden = self.fc1.onednn(norm(h, scale=s), post_op, algorithm, bias_scale=s)  # s act(fc1(norm(h)))
        return h.add_(self.fc2.onednn(hidden, bias_scale=s), alpha=1 / s)


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) fp32 -> a new tensor; the caller's h is not changed."""
        return self.add_to_(h.clone())

    def add_to_(self, h: torch.Tensor) -> torch.Tensor:
        """The pre-LN layer on (B, T, D) fp32, in place (see add_residual_): h += attention(norm1(h)),
        then h += mlp(norm2(h)); returns h. Adding the bf16 attention output into h in place,
        rather than making h + it, takes the bf16 tower on the CPU 4% less time."""
        h = add_residual_(h, self.self_attn(self.layer_norm1(h)))
        return self.mlp.add_to_(h, self.layer_norm2)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks, its own or global ones (the dicts nn.Module.__call__
    checks; private to torch: if a later torch renames one, this says yes, the safe answer)."""
    own = (getattr(module, name, True) for name in _HOOKS)
    everyone = (getattr(nn.modules.module, "_global" + name, True) for name in _HOOKS)
    return any(bool(hooks) for hooks in (*own, *everyone))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (B, 3, H, W) normalised -> (B, D), the CLS token after post_layernorm."""
        h = self.pre_layrnorm(self.embeddings(pixels))  # (B, N+1, D), a new tensor: the layers add into it
        # A hook may keep what it is given (the pre-LN output, a layer's input or output: how hidden
        # states are taken): then each layer runs through its own call, so its hooks run, on a copy.
        hooked = any(has_hooks(m) for m in (self.pre_layrnorm, *self.encoder.layers))
        for layer in self.encoder.layers:
            h = layer(h) if hooked else layer.add_to_(h)
        return self.post_layernorm(h[:, 0])  # CLS only, as the reference pools
