"""Tiny random AltCLIP checkpoints in Hugging Face layout, written with the project's own code."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from altclip_cli.nn.config import AltCLIPConfig, TextConfig, VisionConfig, config_to_dict
from altclip_cli.nn.model import AltCLIPModel

PREPROCESSOR_CONFIG = {  # as the hub's BAAI/AltCLIP ships it (legacy int sizes)
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}


def tiny_config(vocab_size: int = 1002, hidden_act: str = "quick_gelu") -> AltCLIPConfig:
    text = TextConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=514, project_dim=24)
    vision = VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                          image_size=224, patch_size=32, hidden_act=hidden_act)
    return AltCLIPConfig(text=text, vision=vision, projection_dim=16)


def random_state_dict(cfg: AltCLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = AltCLIPModel(cfg)
    norm_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    state = {}
    for name, tensor in model.state_dict().items():
        # Layer norms near identity, other weights N(0, 0.1): outputs that are neither constant nor saturated.
        base = 1.0 if name in norm_weights else 0.0
        state[name] = (base + 0.1 * torch.randn_like(tensor)).contiguous()
    state["logit_scale"] = torch.tensor(2.6592)
    return state


def write_model(folder: Path, cfg: AltCLIPConfig | None = None, *, seed: int = 0) -> Path:
    """config.json, model.safetensors, tokenizer files and preprocessor_config.json in `folder`."""
    from tokenizer_fixture import make_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer_files(folder)
    cfg = cfg or tiny_config(vocab_size=vocab)
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    save_file(random_state_dict(cfg, seed), str(folder / "model.safetensors"))
    return folder
