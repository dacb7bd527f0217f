"""The text tower: XLM-RoBERTa (post-LN, BERT style) and AltCLIP's head on it.

Module names follow the checkpoint keys under `text_model.` exactly, so loading is a strict
`load_state_dict`. Read bottom-up: embeddings, one layer, the encoder, the tower.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig
from .layers import ACTIVATIONS, Embedding, LayerNorm, Linear, attention


class RobertaEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pad_id = cfg.pad_token_id
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa positions: real tokens get pad_id+1, pad_id+2, ...; pads get pad_id.
        real = ids.ne(self.pad_id).long()
        positions = torch.cumsum(real, dim=1) * real + self.pad_id  # (B, T)
        # Summed in fp32 whatever the weights' dtype: the LayerNorm after it is fp32 anyway.
        h = self.word_embeddings(ids).float() + self.position_embeddings(positions).float()
        h = h + self.token_type_embeddings.weight[0].float()  # every token is of type 0
        return self.LayerNorm(h)  # (B, T, D)


class RobertaSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attention(self.query(h), self.key(h), self.value(h), self.heads, mask)


class DenseLayerNorm(nn.Module):
    """dense, then LayerNorm over (that + residual): the output half of both BERT sub-blocks."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class RobertaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self = RobertaSelfAttention(cfg)  # `self` is the checkpoint's name for it
        self.output = DenseLayerNorm(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(h, mask), h)


class RobertaIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.activation = cfg.hidden_act
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        fused = self.dense.onednn_activation(self.activation)
        if fused is not None and fused[2] == 1.0:  # XLM-R's gelu: inside oneDNN's product
            return self.dense.onednn(h, fused[0], fused[1])
        return self.act(self.dense(h))


class RobertaLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = RobertaAttention(cfg)
        self.intermediate = RobertaIntermediate(cfg)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attention(h, mask)
        return self.output(self.intermediate(h), h)


class RobertaEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(RobertaLayer(cfg) for _ in range(cfg.num_hidden_layers))


class Roberta(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = RobertaEmbeddings(cfg)
        self.encoder = RobertaEncoder(cfg)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys each query may see
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, mask)
        return h  # (B, T, D)


class TextTower(nn.Module):
    """XLM-R, then AltCLIP's head: LayerNorm over all tokens, a linear map, token 0 (`<s>`).

    The RoBERTa pooler (dense + tanh) is not part of AltCLIP; checkpoints that carry it
    have it dropped on load.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.roberta = Roberta(cfg)
        self.pre_LN = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.transformation = Linear(cfg.hidden_size, cfg.project_dim)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.roberta(ids, attention_mask)  # (B, T, D)
        # Only token 0 is read, and pre_LN and transformation act per token: apply them to it alone.
        return self.transformation(self.pre_LN(h[:, 0]))  # (B, project_dim)
