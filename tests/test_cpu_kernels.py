"""The CPU kernels of nn/layers.py against the reference, one transformer layer at a time.

In bf16 on the CPU altclip runs its linear layers through oneDNN with the bias and the MLP's
activation applied as the product is written (quick_gelu through oneDNN's swish, its 1.702 folded
into the layer norm, the biases and the residual add), and attention either as two matrix
products around a softmax or, on a CPU with AMX, through PyTorch's flash kernel. Each layer here
is compared with transformers' own layer in fp32 on the same weights, on both attention paths, and
the oneDNN calls are recorded, so the test fails if the fused path is not the one that ran.
"""
from __future__ import annotations

import copy

import pytest
import torch
from oracle import require

from altclip_cli.nn import layers
from altclip_cli.nn.config import TextConfig, VisionConfig, config_to_dict, AltCLIPConfig
from altclip_cli.nn.text import RobertaLayer
from altclip_cli.nn.vision import VisionLayer

transformers = require("transformers")
modeling = require("transformers.models.altclip.modeling_altclip")

HIDDEN, HEADS, INTERMEDIATE = 64, 4, 256


def reference_configs(vision_act: str):
    cfg = AltCLIPConfig(
        text=TextConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=80, project_dim=32),
        vision=VisionConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                            intermediate_size=INTERMEDIATE, image_size=224, patch_size=14, hidden_act=vision_act),
        projection_dim=32)
    ref = transformers.AltCLIPConfig(**config_to_dict(cfg))
    for sub in (ref.text_config, ref.vision_config):
        sub._attn_implementation = "eager"
    return cfg, ref


def in_bf16(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer as the runtime holds it in bf16: linear weights bf16, layer norms fp32."""
    layer = copy.deepcopy(layer)
    for module in layer.modules():
        if isinstance(module, layers.Linear):
            module.to(torch.bfloat16)
    return layer


def run_bf16(layer, *args):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(*args).float()


@pytest.fixture
def onednn_calls(monkeypatch):
    """The post-ops of every oneDNN linear call made while the test runs."""
    real = layers._ONEDNN_LINEAR
    if real is None:
        pytest.skip("this PyTorch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    calls = []

    def recording(x, w, b, post_op, scalars, algorithm):
        calls.append((post_op, algorithm))
        return real(x, w, b, post_op, scalars, algorithm)

    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", recording)
    return calls


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest, over tokens, of |ours - reference| / |reference| (L2 norms per token)."""
    return float(((ours - reference).norm(dim=-1) / reference.norm(dim=-1)).max())


@pytest.mark.parametrize("flash", [False, True], ids=["matmul-attention", "flash-attention"])
@pytest.mark.parametrize("activation, post_op", [("quick_gelu", "swish"), ("gelu", "gelu")])
def test_vision_layer_in_bf16_matches_the_reference(monkeypatch, onednn_calls, activation, post_op, flash):
    monkeypatch.setattr(layers, "cpu_has_amx", lambda: flash)
    cfg, ref_cfg = reference_configs(activation)
    torch.manual_seed(0)
    reference = modeling.AltCLIPEncoderLayer(ref_cfg.vision_config).eval()
    ours = VisionLayer(cfg.vision)
    ours.load_state_dict(reference.state_dict(), strict=True)
    h = torch.randn(3, 257, HIDDEN)  # the image tower's 257 tokens

    with torch.no_grad():
        expected = reference(h, attention_mask=None)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = run_bf16(in_bf16(ours), h.clone())

    # A scale of quick_gelu's not undone (1.702 in the residual add, or in fc2's bias) puts the
    # error far above bf16's rounding; the activation ran inside fc1's product.
    assert relative_error(got, expected) < 0.02
    assert (post_op, "none" if post_op == "gelu" else "") in onednn_calls


def test_vision_layer_leaves_its_input_alone():
    cfg, _ = reference_configs("quick_gelu")
    layer = in_bf16(VisionLayer(cfg.vision))
    h = torch.randn(2, 257, HIDDEN)
    before = h.clone()
    run_bf16(layer, h)
    assert torch.equal(h, before)


@pytest.mark.parametrize("flash", [False, True], ids=["matmul-attention", "flash-attention"])
def test_text_layer_in_bf16_matches_the_reference_with_padding(monkeypatch, onednn_calls, flash):
    monkeypatch.setattr(layers, "cpu_has_amx", lambda: flash)
    cfg, ref_cfg = reference_configs("quick_gelu")
    torch.manual_seed(1)
    reference = modeling.AltRobertaLayer(ref_cfg.text_config).eval()
    ours = RobertaLayer(cfg.text)
    ours.load_state_dict(reference.state_dict(), strict=True)
    h = torch.randn(4, 23, HIDDEN)
    lengths = torch.tensor([23, 17, 5, 1])
    keep = torch.arange(23)[None, :] < lengths[:, None]  # (B, T)
    additive = torch.zeros(4, 1, 1, 23).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)

    with torch.no_grad():
        expected = reference(h, attention_mask=additive)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = run_bf16(in_bf16(ours), h, keep[:, None, None, :])

    assert relative_error(got[keep], expected[keep]) < 0.02  # padded rows are never read
    assert ("gelu", "none") in onednn_calls  # XLM-R's exact gelu, inside the product
