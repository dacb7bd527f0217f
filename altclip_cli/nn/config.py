"""Model hyper-parameters: one dataclass per tower, built from a checkpoint's config.json in one place.

The hub's config.json is read the way the reference (transformers' AltCLIPConfig) reads it,
including its legacy `text_config_dict` / `vision_config_dict`, and every size is then checked
against the tensor shapes (`check_against_tensors`), so a config that disagrees with its weights
is an error naming the field instead of a shape error deep inside `load_state_dict`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class TextConfig:
    """XLM-RoBERTa-large text tower (defaults: BAAI/AltCLIP)."""

    vocab_size: int = 250002
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    project_dim: int = 768  # width of `transformation`, the head before text_projection

    @property
    def max_tokens(self) -> int:
        # RoBERTa positions start at pad_token_id + 1, so two rows of the table are never used.
        return self.max_position_embeddings - self.pad_token_id - 1


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT image tower (defaults: BAAI/AltCLIP's ViT-L/14 at 224 px)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


@dataclass(frozen=True)
class AltCLIPConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    projection_dim: int = 768


# The reference's class defaults, which fill keys missing from a hub config. Note the vision
# defaults are ViT-B/32, not AltCLIP's ViT-L/14: a legacy `vision_config_dict` that omits a key
# gets these, and so do we (then the shape check catches any disagreement with the weights).
_REFERENCE_TEXT_DEFAULTS = {f.name: f.default for f in fields(TextConfig)}
_REFERENCE_VISION_DEFAULTS = {**{f.name: f.default for f in fields(VisionConfig)},
                              "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                              "intermediate_size": 3072, "patch_size": 32}


def _tower(cls, defaults: dict, raw: dict, legacy: dict | None):
    # As the reference: a legacy *_config_dict, when present, overrides the whole sub-config,
    # each of its missing keys taking the class default.
    values = dict(defaults)
    values.update(legacy if legacy is not None else raw or {})
    known = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in known}
    if isinstance(kwargs.get("image_size"), (list, tuple)) or isinstance(kwargs.get("patch_size"), (list, tuple)):
        raise ConfigError("non-square image_size / patch_size in config.json is not supported")
    cfg = cls(**kwargs)
    from .layers import ACTIVATIONS  # the one table of activations (it needs torch)

    if cfg.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"unsupported hidden_act {cfg.hidden_act!r} in config.json",
                          hint=f"supported: {', '.join(ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"hidden_size {cfg.hidden_size} is not a multiple of "
                          f"num_attention_heads {cfg.num_attention_heads} in config.json")
    return cfg


def config_from_dict(raw: dict) -> AltCLIPConfig:
    """Build the config from a parsed hub config.json."""
    text = _tower(TextConfig, _REFERENCE_TEXT_DEFAULTS, raw.get("text_config"), raw.get("text_config_dict"))
    vision = _tower(VisionConfig, _REFERENCE_VISION_DEFAULTS, raw.get("vision_config"),
                    raw.get("vision_config_dict"))
    return AltCLIPConfig(text=text, vision=vision, projection_dim=int(raw.get("projection_dim", 768)))


def config_to_dict(cfg: AltCLIPConfig) -> dict:
    """The config.json the reference writes for `cfg` (used to create checkpoints)."""
    return {"architectures": ["AltCLIPModel"], "model_type": "altclip", "projection_dim": cfg.projection_dim,
            "logit_scale_init_value": 2.6592,
            "text_config": {**asdict(cfg.text), "model_type": "altclip_text_model"},
            "vision_config": {**asdict(cfg.vision), "model_type": "altclip_vision_model"}}


def read_config(folder: Path) -> AltCLIPConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder}",
                          hint="a model folder needs config.json beside its weights (Hugging Face layout)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    try:
        return config_from_dict(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value in {path}: {e}") from None


def _layer_count(shapes: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def check_against_tensors(cfg: AltCLIPConfig, shapes: dict[str, tuple]) -> None:
    """Compare every size in `cfg` with the checkpoint's tensor shapes (keys already normalised).

    Raises ConfigError listing each disagreement as `field: config says X, tensors say Y`.
    Keys that are absent are left to the key check, which names them.
    """
    t, v = cfg.text, cfg.vision
    emb = "text_model.roberta.embeddings."
    observed = {  # field: (config value, shape key, index into the shape) ...
        "text_config.vocab_size": (t.vocab_size, emb + "word_embeddings.weight", 0),
        "text_config.hidden_size": (t.hidden_size, emb + "word_embeddings.weight", 1),
        "text_config.max_position_embeddings": (t.max_position_embeddings, emb + "position_embeddings.weight", 0),
        "text_config.type_vocab_size": (t.type_vocab_size, emb + "token_type_embeddings.weight", 0),
        "text_config.intermediate_size": (t.intermediate_size,
                                          "text_model.roberta.encoder.layer.0.intermediate.dense.weight", 0),
        "text_config.project_dim": (t.project_dim, "text_model.transformation.weight", 0),
        "vision_config.hidden_size": (v.hidden_size, "vision_model.embeddings.patch_embedding.weight", 0),
        "vision_config.num_channels": (v.num_channels, "vision_model.embeddings.patch_embedding.weight", 1),
        "vision_config.patch_size": (v.patch_size, "vision_model.embeddings.patch_embedding.weight", 2),
        "vision_config.intermediate_size": (v.intermediate_size, "vision_model.encoder.layers.0.mlp.fc1.weight", 0),
        "projection_dim": (cfg.projection_dim, "visual_projection.weight", 0),
    }
    problems = []
    for name, (want, key, dim) in observed.items():
        if key in shapes and len(shapes[key]) > dim and shapes[key][dim] != want:
            problems.append(f"{name}: config says {want}, tensors say {shapes[key][dim]}")
    pos_key = "vision_model.embeddings.position_embedding.weight"
    if pos_key in shapes and shapes[pos_key][0] != v.num_positions:
        problems.append(f"vision_config.image_size/patch_size: config gives {v.num_positions} positions "
                        f"({v.image_size}/{v.patch_size}), tensors have {shapes[pos_key][0]}")
    for name, want, prefix in (
        ("text_config.num_hidden_layers", t.num_hidden_layers, "text_model.roberta.encoder.layer."),
        ("vision_config.num_hidden_layers", v.num_hidden_layers, "vision_model.encoder.layers."),
    ):
        have = _layer_count(shapes, prefix)
        if have and have != want:
            problems.append(f"{name}: config says {want}, tensors have {have} layers")
    if problems:
        raise ConfigError("config.json does not match the weights: " + "; ".join(problems),
                          hint="the config and weight files come from different models")
