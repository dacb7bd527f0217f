"""Attacks on the image tower's in-place residual adds: what a user of `clip.model` (a plain
torch.nn.Module, docs/python.md) can observe of them."""
from __future__ import annotations

import pytest
import torch

import altclip_cli


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forward_hooks_on_the_image_towers_layers_run_and_keep_what_they_saw(model, precision):
    """Hooks on the pre-LN and on each layer (the usual way to take a tower's hidden states) run,
    and the tensors they were given are not added into afterwards; the result is unchanged."""
    clip = altclip_cli.load(str(model), device="cpu", precision=precision)
    tower = clip.model.vision_model
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224)
    plain = clip.encode_pixel_batch(pixels)
    seen = {}

    def keep(name):
        def hook(module, args, out):
            seen[name] = (out, out.clone())  # the tensor itself, and what it held then
        return hook

    handles = [tower.pre_layrnorm.register_forward_hook(keep("pre-LN"))]
    handles += [layer.register_forward_hook(keep(i)) for i, layer in enumerate(tower.encoder.layers)]
    try:
        hooked = clip.encode_pixel_batch(pixels)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen, key=str) == sorted(["pre-LN", *range(len(tower.encoder.layers))], key=str)
    changed = [name for name, (kept, copy) in seen.items() if not torch.equal(kept, copy)]
    assert changed == []
    assert torch.equal(hooked, plain)
    assert torch.equal(clip.encode_pixel_batch(pixels), plain)  # hooks removed: the in-place path again


def test_without_hooks_the_tower_takes_the_in_place_path(model, monkeypatch):
    """The copying path is for hooks only: a tower without them never calls a layer's forward
    (which copies its input), so the residual adds stay in place."""
    from altclip_cli.nn import vision

    clip = altclip_cli.load(str(model), device="cpu", precision="fp32")

    def copying(self, h):
        raise AssertionError("VisionLayer.forward called: the tower took the copying path")

    monkeypatch.setattr(vision.VisionLayer, "forward", copying)
    assert clip.encode_pixel_batch(torch.randn(2, 3, 224, 224)).shape[0] == 2


def test_the_server_refuses_a_blank_index_as_the_commands_do(model, tmp_path):
    """POST /v1/search with a blank index: 400 naming the field (the server takes only "auto" or
    an absolute folder), and nothing made in any folder."""
    pytest.importorskip("fastapi")
    from test_serve import start_server

    from altclip_cli.serve import client
    from altclip_cli.serve.client import RequestFailed

    (tmp_path / "photos").mkdir()
    server = start_server(model)
    try:
        for index in ("", "  "):
            with pytest.raises(RequestFailed) as err:
                client.post_json(server.target, "/v1/search",
                                 {"query": [{"text": "cat"}], "dir": str(tmp_path / "photos"), "index": index})
            assert err.value.status == 400, err.value.message
            assert err.value.error["param"] == "index" and "absolute folder" in err.value.message
    finally:
        assert server.stop() == 0, server.log()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
