"""AltCLIP: the two towers, their projections and the logit scale (checkpoint keys at the top level)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AltCLIPConfig
from .layers import Linear
from .text import TextTower
from .vision import VisionTower


class AltCLIPModel(nn.Module):
    def __init__(self, cfg: AltCLIPConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTower(cfg.text)
        self.vision_model = VisionTower(cfg.vision)
        self.text_projection = Linear(cfg.text.project_dim, cfg.projection_dim, bias=False)
        self.visual_projection = Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # stored as a log: ln(1 / 0.07)

    def encode_text(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids, right-padded -> (B, P) projected, not normalised, fp32."""
        return self.text_projection(self.text_model(ids, attention_mask)).float()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P) projected, not normalised, fp32."""
        return self.visual_projection(self.vision_model(pixels)).float()

    def forward(self, ids, attention_mask, pixels):
        """logits_per_image (B_img, B_txt), as the reference computes it, in fp32."""
        text = F.normalize(self.encode_text(ids, attention_mask), dim=-1)
        image = F.normalize(self.encode_image(pixels), dim=-1)
        return image @ text.T * self.logit_scale.float().exp()
