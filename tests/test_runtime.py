"""Device and precision choice, mixed-precision loading, and the public API end to end."""
import numpy as np
import pytest
import torch

from altclip_cli.runtime import altclip as runtime
from altclip_cli.runtime import build, device
from altclip_cli.errors import DeviceError
from altclip_cli.nn.layers import LayerNorm


def test_explicit_absent_cuda_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device.choose_device("cuda")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device.choose_device("cuda:1")


def test_explicit_absent_mps_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="MPS is not available"):
        device.choose_device("mps")


def test_unknown_device_and_precision():
    with pytest.raises(DeviceError, match="unknown device 'tpu7'"):
        device.choose_device("tpu7")
    with pytest.raises(DeviceError, match="unknown precision 'fp8'"):
        device.choose_precision(torch.device("cpu"), "fp8")


def test_auto_device_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device.choose_device("auto")[0].type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device.choose_device("auto")[0].type == "cpu"


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: has_bf16)
    assert device.choose_precision(torch.device("cpu"), "auto")[0] == expected


def test_auto_precision_on_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert device.choose_precision(torch.device("cuda"), "auto")[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert device.choose_precision(torch.device("cuda"), "auto")[0] == "bf16"
    assert device.choose_precision(torch.device("mps"), "auto")[0] == "fp16"


def test_bf16_loading_keeps_norms_and_scale_in_fp32(tiny_model_dir):
    model = build.build_model(tiny_model_dir, None, torch.device("cpu"), "bf16")
    for name, module in model.named_modules():
        if isinstance(module, LayerNorm):
            assert module.weight.dtype == torch.float32, name
    assert model.logit_scale.dtype == torch.float32
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert model.text_model.roberta.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_bf16_close_to_fp32(tiny_model_dir):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a photo of a cat", "一张狗的照片", "собака", ""]
    fp32 = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    bf16 = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")
    for encode in ("encode_texts", "encode_images"):
        inputs = texts if encode == "encode_texts" else images
        a, b = getattr(fp32, encode)(inputs), getattr(bf16, encode)(inputs)
        assert a.dtype == b.dtype == np.float32
        cosine = (a * b).sum(axis=1)  # both L2-normalised
        assert cosine.min() > 0.99, (encode, cosine)


def test_public_api_matches_reference_end_to_end(tiny_model_dir):
    """load() + classify against AltCLIPModel/tokenizer/image processor from transformers."""
    from oracle import require

    transformers = require("transformers")
    from PIL import Image

    import altclip_cli

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((480, 640), (301, 199))]
    labels = ["一张猫的照片", "a photo of a dog", "صورة قطة"]
    model = altclip_cli.load(str(tiny_model_dir), device="cpu", precision="fp32")
    probs, logits = model.classify(images, labels)

    ref = transformers.AltCLIPModel.from_pretrained(tiny_model_dir).eval()
    tok = transformers.XLMRobertaTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"))
    proc = transformers.CLIPImageProcessorPil.from_pretrained(tiny_model_dir)
    text_in = tok(labels, padding=True, return_tensors="pt")
    pixels = proc(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ref(input_ids=text_in["input_ids"], attention_mask=text_in["attention_mask"], pixel_values=pixels)
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(probs, out.logits_per_image.softmax(-1).numpy(), atol=1e-5)
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-6)


def test_templates_are_an_ensemble_of_normalised_embeddings(tiny_model_dir):
    model = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    templates = ["a photo of a {}.", "{} 的照片"]
    got = model.label_embeddings(["cat", "dog"], templates)
    filled = model.encode_texts(["a photo of a cat.", "cat 的照片"])
    want = filled.mean(axis=0) / np.linalg.norm(filled.mean(axis=0))
    np.testing.assert_allclose(got[0], want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_text_rows_keep_input_order_despite_length_sorting(tiny_model_dir):
    model = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    texts = ["a much longer sentence about cats and dogs and birds", "hi", "", "中文"]
    together = model.encode_texts(texts, batch_size=2)
    alone = np.concatenate([model.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_compute_dtype_weight_cache_is_used_and_equal(tiny_model_dir, monkeypatch):
    from altclip_cli.paths import altclip_home

    first = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")
    files = list(altclip_home().glob("weights/*/model-bf16.safetensors"))
    assert len(files) == 1
    reads = []
    real = build.read_state_dict
    monkeypatch.setattr(build, "read_state_dict", lambda paths, convert: reads.append(paths) or real(paths, convert))
    second = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")
    assert reads == [[files[0]]]  # the cast copy, not the original
    texts = ["猫", "a dog"]
    np.testing.assert_array_equal(first.encode_texts(texts), second.encode_texts(texts))


def test_label_cache_skips_the_text_tower(tiny_model_dir, monkeypatch):
    model = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    labels = ["猫", "dog", "猫"]  # a repeated label keeps its own row
    first = model.label_embeddings(labels, ["a photo of {}"])
    assert first.shape == (3, model.embed_dim)
    again = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    monkeypatch.setattr(again, "encode_texts", lambda *a, **k: pytest.fail("text tower ran"))
    np.testing.assert_array_equal(again.label_embeddings(labels, ["a photo of {}"]), first)
    assert "tokenizer" not in vars(again)  # never loaded: cached labels need no tokenizer
    # Other templates are other keys: they must be computed.
    with pytest.raises(pytest.fail.Exception):
        again.label_embeddings(labels, ["{}"])


def test_cache_can_be_turned_off(tiny_model_dir, monkeypatch):
    from altclip_cli.paths import altclip_home

    monkeypatch.setenv("ALTCLIP_NO_CACHE", "1")
    model = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")
    assert model.label_cache is None
    assert not altclip_home().exists()


def test_cuda_out_of_memory_halves_the_batch_and_says_so(tiny_model_dir, monkeypatch, caplog):
    from PIL import Image

    model = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(8)]
    expected = model.encode_images(images, batch_size=8)
    real = model.encode_pixel_batch
    sizes = []

    def limited(pixels):
        sizes.append(len(pixels))
        if len(pixels) > 2:  # as if the GPU only fits two images
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(pixels)

    monkeypatch.setattr(model, "encode_pixel_batch", limited)
    with caplog.at_level("WARNING", logger="altclip"):
        got = model.encode_images(images, batch_size=8)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert sizes[:3] == [8, 4, 2]
    assert "out of memory on a batch of 8 images" in caplog.text


def test_large_jpegs_decode_at_reduced_scale_unless_exact(tiny_model_dir, tmp_path, monkeypatch):
    from PIL import Image

    import altclip_cli.inputs.images as images

    rng = np.random.default_rng(3)
    path = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (1000, 1400, 3), dtype=np.uint8)).save(path, quality=90)
    sizes = []
    real_open = images.open_image
    monkeypatch.setattr(images, "open_image", lambda *a, **k: sizes.append(real_open(*a, **k).size) or real_open(*a, **k))
    fast = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32")
    exact = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32", exact_decode=True)
    assert fast.draft_min_side == 448 and exact.draft_min_side is None
    a = next(iter(fast.stream_images([path]))).embedding
    b = next(iter(exact.stream_images([path]))).embedding
    assert sizes == [(700, 500), (1400, 1000)]  # 1/2 scale keeps the shortest side >= 448
    assert float(a @ b) > 0.999


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_batch_larger_than_one_pass_matches_the_reference(tiny_model_dir, precision):
    """On the CPU the image tower takes at most device.images_per_pass images at once: a batch of
    2 x that + 3 goes through in three passes, every row still the reference's (bf16: to its rounding)."""
    from oracle import require

    transformers = require("transformers")
    from PIL import Image

    per_pass = device.images_per_pass(torch.device("cpu"), precision)
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 255, (64 + 8 * i, 80, 3), dtype=np.uint8)) for i in range(2 * per_pass + 3)]
    ours = runtime.load(str(tiny_model_dir), device="cpu", precision=precision).encode_images(images, batch_size=len(images))
    ref = transformers.AltCLIPModel.from_pretrained(tiny_model_dir).eval()
    pixels = transformers.CLIPImageProcessorPil.from_pretrained(tiny_model_dir)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=pixels)
    expected = torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1).numpy()
    cosine = (ours * expected).sum(axis=1)
    assert cosine.min() > (1 - 1e-6 if precision == "fp32" else 0.999), cosine

