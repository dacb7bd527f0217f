"""bench/tower.py times the image tower one step at a time; its steps must be the tower's own
forward, step for step, or the profile it prints is of code that does not run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import altclip_cli
from altclip_cli.nn import layers

_saved_path = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
try:
    import tower
    from report import vit_image_flops
finally:
    sys.path[:] = _saved_path  # bench/ holds ray.py, which must not stand in for Ray in other tests


@pytest.fixture
def bf16_clip(model):
    if layers._ONEDNN_LINEAR is None:
        pytest.skip("this PyTorch has no oneDNN linear (torch.ops.mkldnn._linear_pointwise)")
    return altclip_cli.load(str(model), device="cpu", precision="bf16")


@pytest.mark.parametrize("images", [1, 3])
def test_the_profiled_steps_give_the_towers_result_bit_for_bit(bf16_clip, images):
    torch.manual_seed(0)
    pixels = torch.randn(images, 3, 224, 224)
    steps = tower.Steps()
    with torch.inference_mode(), bf16_clip._autocast():
        stepped = tower.tower_by_steps(bf16_clip, pixels, steps)
    assert torch.equal(stepped, bf16_clip.encode_pixel_batch(pixels))
    assert {"attention", "fc1 + activation", "fc2", "layer norm 1 (fp32)"} <= set(steps.seconds)


def test_the_steps_flops_add_up_to_the_towers(bf16_clip):
    vision = bf16_clip.model.config.vision
    by_step = tower.step_flops(vision, images=5)
    assert sum(by_step.values()) == pytest.approx(5 * vit_image_flops(vision))


def test_a_layer_that_no_longer_matches_the_profile_is_caught(bf16_clip, monkeypatch):
    """The check `main` relies on: a tower whose layers compute something else differs."""
    from altclip_cli.nn import vision

    real = vision.VisionLayer.add_to_
    monkeypatch.setattr(vision.VisionLayer, "add_to_", lambda self, h: real(self, h).mul_(1.001))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode(), bf16_clip._autocast():
        stepped = tower.tower_by_steps(bf16_clip, pixels, tower.Steps())
    assert not torch.equal(stepped, bf16_clip.encode_pixel_batch(pixels))


@pytest.mark.parametrize("passes", ["0", "-1"])
def test_fewer_than_one_pass_is_a_usage_error(model, passes, capsys):
    """Medians over no passes have no value: argparse refuses it, before the model loads."""
    with pytest.raises(SystemExit) as exited:
        tower.main(["--model", str(model), "--passes", passes])
    assert exited.value.code == 2
    assert "--passes" in capsys.readouterr().err


def test_a_torch_without_onednns_linear_is_told_so(model, monkeypatch):
    """The profile is of the oneDNN path; without it the script says so instead of failing inside."""
    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", None)
    with pytest.raises(SystemExit) as exited:
        tower.main(["--model", str(model), "--precision", "bf16", "--passes", "1"])
    assert "oneDNN" in str(exited.value.code)
