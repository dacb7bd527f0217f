"""A library call changes nothing process-wide: torch.nn.init, torch's thread count (only ever
lowered), PIL's pixel limit and the warnings filters stay as the caller left them, also while
altclip works in other threads."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import altclip_cli
from altclip_cli.cli import cli
from altclip_cli.errors import InputError
from altclip_cli.inputs.images import open_image
from altclip_cli.nn.model import AltCLIPModel
from altclip_cli.inputs import threads
from altclip_cli.runtime import build
from altclip_cli.inputs.threads import plan_threads
from tiny import tiny_config

SAFE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1",
            "ALTCLIP_DEVICE": "cpu", "ALTCLIP_PRECISION": "fp32"}


# --- torch.nn.init ---------------------------------------------------------------------------------


def test_load_leaves_other_threads_modules_initialised(tiny_model_dir, monkeypatch):
    """While load() builds its network (uninitialised, on the meta device), another thread builds a
    torch Linear: it gets real, Kaiming-uniform weights on the CPU, and torch.nn.init is untouched."""
    kaiming = torch.nn.init.kaiming_uniform_
    inside, other_done = threading.Event(), threading.Event()
    real_model = build.AltCLIPModel

    def model_waiting_for_the_other_thread(cfg):
        inside.set()
        assert other_done.wait(30)
        return real_model(cfg)

    monkeypatch.setattr(build, "AltCLIPModel", model_waiting_for_the_other_thread)
    seen = {}

    def other_thread():
        assert inside.wait(30)
        seen["init"] = torch.nn.init.kaiming_uniform_
        seen["linear"] = torch.nn.Linear(64, 64)
        other_done.set()

    helper = threading.Thread(target=other_thread)
    helper.start()
    model = altclip_cli.load(str(tiny_model_dir), device="cpu", precision="fp32")
    helper.join(30)
    assert seen["init"] is kaiming and torch.nn.init.kaiming_uniform_ is kaiming
    weight = seen["linear"].weight
    assert weight.device.type == "cpu"
    bound = 1 / 64 ** 0.5  # kaiming_uniform_(a=sqrt(5)) on fan_in 64: U(-1/8, 1/8), std 1/8/sqrt(3)
    assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.15)
    assert model.embed_dim == 16  # and the model loaded


def test_a_model_built_normally_is_initialised():
    """Outside uninitialised() altclip's layers initialise as torch's do: random matmul and
    embedding weights, LayerNorms at identity, nothing left as allocated."""
    from altclip_cli.nn import layers

    torch.manual_seed(0)
    model = AltCLIPModel(tiny_config())
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, layers.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, (layers.Linear, layers.Embedding, layers.Conv2d)):
            weight = module.weight.detach()
            assert torch.isfinite(weight).all() and 0.005 < weight.std() < 1.5, name
            if getattr(module, "bias", None) is not None:
                assert torch.isfinite(module.bias).all() and module.bias.abs().max() < 1, name
        else:
            continue
        checked += 1
    assert checked == 44  # every layer of the tiny model: 22 in the text tower, 20 in the vision tower, 2 projections


def test_the_class_embedding_is_initialised_too():
    torch.manual_seed(0)
    for _ in range(5):  # torch.empty may happen to reuse zeroed or random-looking memory
        p = AltCLIPModel(tiny_config()).vision_model.embeddings.class_embedding.detach()
        assert torch.isfinite(p).all() and 0.05 < p.std() < 1 and p.abs().max() < 10


# --- torch threads -------------------------------------------------------------------------------


@pytest.mark.parametrize("cores", [1, 2, 4, 8, 16, 64])
def test_cpu_plan_does_not_oversubscribe(cores):
    plan = plan_threads("cpu", cores=cores)
    assert plan.torch_threads >= 1 and plan.decode_workers >= 1
    # Up to 4 cores the one decoder mostly sleeps (the look-ahead queue is full), so it may be the +1.
    assert plan.torch_threads + plan.decode_workers <= (cores + 1 if cores <= 4 else cores)
    assert plan.decode_workers <= 8


@pytest.mark.parametrize("cores, decoders", [(1, 1), (2, 2), (4, 4), (8, 8), (16, 8), (64, 8)])
def test_gpu_plan_lets_every_core_decode(cores, decoders):
    assert plan_threads("cuda", cores=cores).decode_workers == decoders


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_load_never_raises_the_callers_torch_threads(tiny_model_dir, monkeypatch, torch_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)  # the plan would give torch 12
    torch.set_num_threads(1)
    altclip_cli.load(str(tiny_model_dir), device="cpu", precision="fp32")
    assert torch.get_num_threads() == 1


def test_load_lowers_torch_threads_to_the_plan(tiny_model_dir, monkeypatch, torch_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    torch.set_num_threads(8)
    altclip_cli.load(str(tiny_model_dir), device="cpu", precision="fp32")
    assert torch.get_num_threads() == plan_threads("cpu", cores=8).torch_threads == 6


# --- PIL's pixel limit and the warnings filters -------------------------------------------------------


def _watch(read, stop: threading.Event, seen: set):
    while not stop.is_set():
        seen.add(read())


def _decode_concurrently(paths, **kw):
    """Decode every path 20 times in 4 threads; the images (or exceptions) in order."""
    out = [None] * (20 * len(paths))

    def work(offset):
        for i in range(offset, len(out), 4):
            try:
                out[i] = open_image(paths[i % len(paths)], **kw)
            except InputError as e:
                out[i] = e

    workers = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return out


@pytest.fixture
def over_pils_limit(tmp_path, monkeypatch):
    """PIL's limit made small (1,000 pixels, refusal above 2,000) and a 100 x 100 PNG, JPEG and GIF."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    pixels = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    paths = []
    for ext in ("png", "jpg", "gif"):
        path = tmp_path / f"big.{ext}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("max_pixels", [None, 10_000])
def test_pils_limit_is_never_changed_while_decoding_past_it(over_pils_limit, max_pixels):
    stop, seen = threading.Event(), set()
    watcher = threading.Thread(target=_watch, args=(lambda: Image.MAX_IMAGE_PIXELS, stop, seen))
    watcher.start()
    try:
        decoded = _decode_concurrently(over_pils_limit, max_pixels=max_pixels)
    finally:
        stop.set()
        watcher.join()
    assert seen == {1000}
    assert all(isinstance(im, Image.Image) and im.size == (100, 100) for im in decoded)


def test_decoding_leaves_the_warnings_filters_alone(over_pils_limit):
    """Over PIL's warning threshold: no warning escapes, and the process-wide filter list is never
    swapped (warnings.catch_warnings does that, and is not thread-safe)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = warnings.filters
        stop, seen = threading.Event(), set()
        watcher = threading.Thread(target=_watch, args=(lambda: warnings.filters is filters, stop, seen))
        watcher.start()
        try:
            _decode_concurrently(over_pils_limit, max_pixels=None)
        finally:
            stop.set()
            watcher.join()
    assert caught == []
    assert seen == {True}


def test_max_pixels_still_refuses_and_names_the_file(over_pils_limit):
    for path in over_pils_limit:
        with pytest.raises(InputError, match=rf"^{path}: image has 10,000 pixels, over the limit of 9,999 pixels"):
            open_image(path, max_pixels=9_999)


def test_pils_own_check_while_decoding_is_explained(tmp_path, monkeypatch):
    """The residual: TIFF checks PIL's limit again while decoding. The library leaves the limit
    alone and says so; the command line sets it from --max-pixels for its run, then restores it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (100, 100)).save(tmp_path / "scan.tif")
    with pytest.raises(InputError, match=r"scan\.tif: Pillow refuses to decode this image .*PIL\.Image\.MAX_IMAGE_PIXELS"):
        open_image(tmp_path / "scan.tif", max_pixels=None)
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("max_pixels", ["0", "20000"])
def test_the_command_line_lifts_pils_limit_for_its_run_only(tiny_model_dir, tmp_path, monkeypatch, max_pixels):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (100, 100)).save(tmp_path / "scan.tif")
    result = CliRunner().invoke(cli, ["classify", str(tmp_path / "scan.tif"), "-l", "x", "-f", "jsonl",
                                      "-m", str(tiny_model_dir), "--max-pixels", max_pixels],
                                env=SAFE_ENV, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert Image.MAX_IMAGE_PIXELS == 1000
