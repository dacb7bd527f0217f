"""Image opening and preprocessing; pixel values are checked bit for bit against transformers."""

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from oracle import require

from altclip_cli.errors import ConfigError, InputError
from altclip_cli.inputs.images import DEFAULT_MAX_PIXELS, ImagePreprocessor, open_image

# BAAI/AltCLIP's preprocessor_config.json on the hub (old feature-extractor form: int sizes).
HUB_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


@pytest.fixture(scope="module")
def clip_pil():
    """A factory for the oracle, transformers' PIL-backend CLIP processor, from a config dict."""
    transformers = require("transformers")

    def make(config):
        return transformers.CLIPImageProcessorPil(**config)

    return make


def reference_pixels(processor, image):
    out = processor(image, return_tensors="np")["pixel_values"][0]
    return out.astype(np.float32)  # with rescale and normalise off the reference stays uint8


def random_image(mode, width, height, seed=0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        data = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        return Image.frombytes("I;16", (width, height), data.astype("<u2").tobytes())
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    if mode == "P":
        image = Image.fromarray(data[:, :, 0], "L").convert("P")
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        return image
    if bands == 1:
        return Image.fromarray(data[:, :, 0], "L").convert(mode)
    return Image.frombytes(mode, (width, height), data.tobytes())


def assert_bit_equal(ours, theirs):
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    assert ours.flags["C_CONTIGUOUS"]
    assert np.array_equal(ours, theirs), f"max abs diff {np.abs(ours - theirs).max()}"


# --- parity with CLIPImageProcessorPil ----------------------------------------------------------------

SIZES = [(1, 1), (3, 500), (500, 3), (223, 225), (224, 224), (641, 479), (479, 641), (1000, 17), (17, 1000)]


@pytest.mark.parametrize("width,height", SIZES)
def test_rgb_parity_odd_sizes(clip_pil, width, height):
    image = random_image("RGB", width, height, seed=width * 1000 + height)
    ours = ImagePreprocessor.from_dict(HUB_CONFIG)(image)
    assert ours.shape == (3, 224, 224)
    assert_bit_equal(ours, reference_pixels(clip_pil(HUB_CONFIG), image))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1", "I", "F", "YCbCr"])
def test_mode_parity(clip_pil, mode):
    image = random_image(mode, 97, 131, seed=7)
    assert_bit_equal(ImagePreprocessor()(image), reference_pixels(clip_pil(HUB_CONFIG), image))


def with_key_colour(image, key, share=0.4, seed=11):
    """`image` with about `share` of its pixels set to `key` (a palette index, grey level or RGB triple)."""
    data = np.array(image)
    data[np.random.default_rng(seed).random(data.shape[:2]) < share] = key
    out = Image.frombytes(image.mode, image.size, data.tobytes())
    if image.mode == "P":
        out.putpalette(image.getpalette())
    return out


@pytest.mark.parametrize("mode", ["P", "RGB", "L"])
def test_transparency_key_parity(clip_pil, mode):
    """A tRNS colour key (no alpha band) is composited onto white by the reference, as by us."""
    key = 5 if mode in ("P", "L") else (10, 20, 30)
    image = random_image(mode, 60, 45, seed=3)
    if mode == "P":  # the key's palette colour must not be white, or compositing onto white changes nothing
        palette = image.getpalette()
        palette[3 * key:3 * key + 3] = [10, 20, 30]
        image.putpalette(palette)
    buf = io.BytesIO()
    with_key_colour(image, key).save(buf, "PNG", transparency=key)
    image = open_image(buf.getvalue())
    assert image.info.get("transparency") is not None
    # Under the reference's logic (convert to RGBA: the key becomes alpha 0) a good share is transparent.
    alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
    assert 0.3 < (alpha == 0).mean() < 0.5
    ours = ImagePreprocessor()(image)
    assert_bit_equal(ours, reference_pixels(clip_pil(HUB_CONFIG), image))
    # ... and compositing made a difference: a plain convert("RGB"), transparency dropped, gives other pixels.
    plain = Image.fromarray(np.asarray(image.convert("RGB")))
    assert plain.info.get("transparency") is None
    assert np.abs(ours - ImagePreprocessor()(plain)).max() > 0.5


CONFIGS = [
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 28}},
    {"size": 16, "crop_size": [40, 21]},  # crop larger than the resized image: zero padding
    {"size": {"height": 40, "width": 50}, "do_center_crop": False, "resample": 2},
    {"size": 20, "crop_size": 18, "do_normalize": False, "rescale_factor": 0.5},
    {"size": 20, "crop_size": 18, "do_rescale": False,
     "image_mean": [100, 110, 120], "image_std": [50, 60, 70]},
    {"do_resize": False, "crop_size": {"height": 50, "width": 9}, "do_rescale": False, "do_normalize": False},
    {"size": 33, "crop_size": 31, "resample": 1, "image_mean": 0.5, "image_std": 0.25},
]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("width,height", [(37, 61), (61, 37), (5, 3)])
def test_config_driven_parity(clip_pil, config, width, height):
    image = random_image("RGB", width, height, seed=width + height)
    ours = ImagePreprocessor.from_dict(config)(image)
    assert_bit_equal(ours, reference_pixels(clip_pil(config), image))


def test_non_default_shape():
    config = {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 28}}
    pre = ImagePreprocessor.from_dict(config)
    assert pre(random_image("RGB", 100, 50))[0].shape == (30, 28)


# --- configuration -------------------------------------------------------------------------------------


def test_hub_config_is_the_default():
    assert ImagePreprocessor.from_dict(HUB_CONFIG) == ImagePreprocessor()
    new_form = dict(HUB_CONFIG, size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    assert ImagePreprocessor.from_dict(new_form) == ImagePreprocessor()


def test_from_dir(tmp_path):
    assert ImagePreprocessor.from_dir(tmp_path) == ImagePreprocessor()  # no file: defaults
    config = {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 28}, "do_convert_rgb": None}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    pre = ImagePreprocessor.from_dir(tmp_path)
    assert (pre.shortest_edge, pre.crop_height, pre.crop_width, pre.do_convert_rgb) == (32, 30, 28, True)


BAD_CONFIGS = ["{not json", "[1, 2]", '{"size": {"longest_edge": 3}}', '{"image_mean": [1, 2]}']


@pytest.mark.parametrize("text", BAD_CONFIGS)
def test_from_dir_bad_config(tmp_path, text):
    (tmp_path / "preprocessor_config.json").write_text(text)
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        ImagePreprocessor.from_dir(tmp_path)


def test_no_rgb_conversion_needs_rgb():
    pre = ImagePreprocessor(do_convert_rgb=False)
    assert pre(random_image("RGB", 9, 9)).shape == (3, 224, 224)
    with pytest.raises(InputError, match="mode L"):
        pre(random_image("L", 9, 9))


# --- opening -------------------------------------------------------------------------------------------


def halves(width, height):
    """Red left half, blue right half: any rotation or flip is visible."""
    data = np.zeros((height, width, 3), dtype=np.uint8)
    data[:, : width // 2] = (255, 0, 0)
    data[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(data)


@pytest.mark.parametrize("orientation,transpose", [
    (3, Image.Transpose.ROTATE_180),
    (6, Image.Transpose.ROTATE_270),
    (8, Image.Transpose.ROTATE_90),
])
def test_exif_orientation(tmp_path, orientation, transpose):
    path = tmp_path / f"rotated{orientation}.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    halves(64, 32).save(path, "JPEG", exif=exif, quality=95)

    image = open_image(path)
    raw = Image.open(path)
    assert raw.size == (64, 32)
    assert image.size == ((64, 32) if orientation == 3 else (32, 64))
    assert np.array_equal(np.asarray(image), np.asarray(raw.transpose(transpose)))
    if orientation == 6:  # a quarter turn clockwise: the red left half is now on top
        pixels = np.asarray(image)
        assert pixels[2, 2, 0] > 200 and pixels[-3, -3, 2] > 200


def test_first_frame_of_animated_gif(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (20, 10), c) for c in colours]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3

    image = open_image(path)
    rgb = np.asarray(image.convert("RGB"))
    assert image.size == (20, 10)
    assert (rgb == colours[0]).all()
    assert ImagePreprocessor()(image).shape == (3, 224, 224)  # usable after the file is closed


def test_first_page_of_multipage_tiff(tmp_path):
    path = tmp_path / "pages.tiff"
    Image.new("L", (8, 8), 10).save(path, save_all=True, append_images=[Image.new("L", (8, 8), 200)])
    assert (np.asarray(open_image(path)) == 10).all()


def test_bytes_and_name(tmp_path):
    buf = io.BytesIO()
    halves(10, 6).save(buf, "PNG")
    assert open_image(buf.getvalue()).size == (10, 6)
    with pytest.raises(InputError, match="upload.png"):
        open_image(b"not an image", name="upload.png")
    with pytest.raises(InputError, match="zero bytes"):
        open_image(b"", name="upload.png")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nothere\.jpg: no such file"):
        open_image(tmp_path / "nothere.jpg")


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.jpg: .*empty"):
        open_image(path)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am not a JPEG\n")
    with pytest.raises(InputError, match=r"notes\.jpg: not an image"):
        open_image(path)


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        open_image(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_jpeg_is_an_error(tmp_path, keep):
    buf = io.BytesIO()
    random_image("RGB", 120, 80).save(buf, "JPEG")
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match=r"cut\.jpg: .*truncated"):
        open_image(path)


def test_decompression_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 100)).save(path)
    with pytest.raises(InputError, match=r"bomb\.png: .*20,000 pixels.*10,000 pixels") as info:
        open_image(path, max_pixels=10_000)
    assert "max_pixels" in info.value.message and info.value.hint
    assert open_image(path, max_pixels=20_000).size == (200, 100)  # the limit is inclusive


def test_pil_limits_neither_leak_nor_override_ours(tmp_path, monkeypatch):
    """PIL's own warning and error (here made tiny) give way to our max_pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warned, refused = tmp_path / "warned.png", tmp_path / "refused.png"
    Image.new("L", (15, 10)).save(warned)  # over PIL's warning threshold
    Image.new("L", (30, 10)).save(refused)  # over PIL's error threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_image(warned).size == (15, 10)
        assert open_image(refused).size == (30, 10)
        assert open_image(refused, max_pixels=None).size == (30, 10)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored
    with pytest.raises(InputError, match="refused.png"):
        open_image(refused, max_pixels=299)


def test_default_cap_is_pils():
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485


def test_opened_file_parity(tmp_path, clip_pil):
    """The whole path: a file on disk, opened by us, preprocessed by both."""
    path = tmp_path / "photo.jpg"
    random_image("RGB", 300, 200).save(path, "JPEG")
    image = open_image(path)
    assert_bit_equal(ImagePreprocessor()(image), reference_pixels(clip_pil(HUB_CONFIG), image))


def test_draft_decoding_of_large_jpegs(tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    big.save(tmp_path / "big.png")
    drafted = open_image(tmp_path / "big.jpg", draft_min_side=448)
    assert drafted.size == (800, 600)  # 1/2 scale: the smallest whose shortest side is >= 448
    assert open_image(tmp_path / "big.jpg").size == (1600, 1200)
    assert open_image(tmp_path / "big.png", draft_min_side=448).size == (1600, 1200)  # JPEG only


@pytest.mark.parametrize("content", [b"B", b"BM", b"BMx", b"\x89P"])
def test_a_file_of_a_few_bytes_is_not_an_image(tmp_path, content):
    path = tmp_path / "tiny.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError, match="tiny.jpg: not an image, or in a format Pillow cannot read"):
        open_image(path)
