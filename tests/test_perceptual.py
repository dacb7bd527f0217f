"""The perceptual hash: a photo saved again stays near its original; distinct photos never do.

Photos are synthesised (shapes, gradients, noise textures, text), saved to files and opened
through inputs.images.open_image, as indexing would open them.
"""

import io
import itertools
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from altclip_cli.inputs.images import open_image
from altclip_cli.inputs.perceptual import (
    DEFAULT_MAX_DISTANCE,
    PerceptualHash,
    from_int64,
    hamming,
    near,
    perceptual_hash,
    to_int64,
)

ORIENTATION = 0x0112


def _shapes(rng, size):
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(w // 8, w // 2), y0 + rng.integers(h // 8, h // 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def _gradient(rng, size):
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    cx, cy = rng.random(2)
    a, b, c = rng.random(3) * 2 - 1
    r = np.hypot(x - cx, y - cy)
    grey = 128 + 90 * np.sin(6 * (a * x + b * y)) * np.cos(5 * r + c)
    rgb = np.stack([grey, np.roll(grey, w // 5, axis=1), 255 - grey], axis=-1)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    ImageDraw.Draw(img).ellipse([w // 4, h // 3, w // 2, h // 2 + h // 5], fill=(240, 30, 30))
    return img


def _texture(rng, size):
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    smooth = Image.fromarray(coarse).resize(size, Image.BICUBIC)
    fine = rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(smooth) + fine, 0, 255).astype(np.uint8))


def _text(rng, size):
    img = Image.new("RGB", size, (250, 248, 240))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size[1] // 14)
    words = ["harbour", "summer", "1987", "grandma", "beach", "picnic", "train", "snow"]
    for row in range(12):
        line = " ".join(rng.choice(words, 4))
        draw.text((size[0] // 20, row * size[1] // 12), line, fill=(20, 20, 60), font=font)
    draw.rectangle([0, 0, size[0] // 3, size[1] // 6], fill=(30, 90, 160))
    return img


def _landscape(rng, size):
    """A clear sky, a faint gradient with no edge in it, over textured ground."""
    w, h = size
    horizon = int(h * rng.uniform(0.3, 0.6))
    sky = np.array([120.0, 170.0, 230.0]) + np.linspace(0, rng.uniform(5, 20), horizon)[:, None, None]
    ground = np.asarray(_texture(rng, (w, h - horizon)), dtype=np.float64)
    pixels = np.concatenate([np.broadcast_to(sky, (horizon, w, 3)), ground])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _on_page(rng, size, kind):
    """An object filling the middle third of a large white page (a product shot, a scan)."""
    page = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    inner = (w // 3, h // 3)
    obj = (_shapes if kind == "shapes" else _texture)(rng, inner)
    page.paste(obj, (w // 3, h // 3))
    return page


MAKERS = [_shapes, _gradient, _texture, _text, _landscape]
SIZES = [(1024, 768), (640, 480), (300, 400), (512, 512), (800, 600), (256, 384), (1000, 700), (480, 640),
         (900, 600), (700, 1000)]


def _bases():
    bases = []
    for n, size in enumerate(SIZES):
        rng = np.random.default_rng(1000 + n)
        make = MAKERS[n % len(MAKERS)]
        bases.append((f"{make.__name__[1:]}{n}", make(rng, size)))
    return bases


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def _exif(**tags):
    exif = Image.Exif()
    exif[0x010F] = "Altclip"  # Make
    exif[0x0110] = "Synthetic 1"  # Model
    for tag, value in tags.items():
        exif[int(tag[1:])] = value
    return exif


def _variants(base: Image.Image, folder):
    """The photo saved again, as people's libraries hold it: name -> path."""
    w, h = base.size
    cut = (round(w * 0.015), round(h * 0.015))  # 3% of the width and of the height, both sides
    return {
        "jpeg-q60": _save(base, folder / "q60.jpg", quality=60),
        "half-size": _save(base.resize((w // 2, h // 2), Image.LANCZOS), folder / "half.jpg", quality=90),
        # Stored turned a quarter to the left with orientation 6 ("rotate 90 clockwise to view").
        "exif-rotated": _save(base.transpose(Image.ROTATE_90), folder / "rot6.jpg", quality=92,
                              exif=_exif(t274=6)),
        "stripped": _save(open_image(folder / "base.jpg"), folder / "stripped.jpg", quality=92),
        "crop-3%": _save(base.crop((cut[0], cut[1], w - cut[0], h - cut[1])), folder / "crop.jpg", quality=92),
        "png": _save(base, folder / "copy.png"),
    }


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """{base name: (hash of the base file, {variant name: hash})}, every file opened by open_image."""
    out = {}
    for name, base in _bases():
        folder = tmp_path_factory.mktemp(name)
        _save(base, folder / "base.jpg", quality=95, exif=_exif(t274=1))
        variants = _variants(base, folder)
        out[name] = (
            perceptual_hash(open_image(folder / "base.jpg")),
            {v: perceptual_hash(open_image(path)) for v, path in variants.items()},
        )
    return out


def test_exif_rotated_variant_is_stored_sideways_and_opened_upright(library, tmp_path):
    # The orientation variant only tests something if its stored pixels really are turned.
    base = _bases()[0][1]
    path = _save(base.transpose(Image.ROTATE_90), tmp_path / "r.jpg", quality=92, exif=_exif(t274=6))
    with Image.open(path) as raw:
        assert raw.size == (base.height, base.width)
        assert raw.getexif()[ORIENTATION] == 6
    assert open_image(path).size == base.size
    assert perceptual_hash(Image.open(path)).value != perceptual_hash(open_image(path)).value


def test_every_variant_is_near_its_base(library):
    far = {}
    for name, (base, variants) in library.items():
        assert not base.low_information, name
        for variant, h in variants.items():
            if not near(base, h):
                far[f"{name}/{variant}"] = hamming(base.value, h.value)
    assert far == {}, f"variants farther than {DEFAULT_MAX_DISTANCE} bits from their base"


def test_distinct_photos_are_never_near(library):
    hashes = {}
    for name, (base, variants) in library.items():
        hashes[name] = [base, *variants.values()]
    close = []
    for a, b in itertools.combinations(hashes, 2):
        for ha, hb in itertools.product(hashes[a], hashes[b]):
            if near(ha, hb):
                close.append((a, b, hamming(ha.value, hb.value)))
    assert close == []


def _hash_of(img, tmp_path, name):
    return perceptual_hash(open_image(_save(img, tmp_path / f"{name}.jpg", quality=90)))


def test_photos_sharing_blank_margins_are_not_near(tmp_path):
    pages = [
        _on_page(np.random.default_rng(7), (900, 900), "shapes"),
        _on_page(np.random.default_rng(8), (900, 900), "shapes"),
        _on_page(np.random.default_rng(9), (900, 900), "texture"),
        _on_page(np.random.default_rng(10), (900, 900), "texture"),
    ]
    hashes = [_hash_of(p, tmp_path, f"page{i}") for i, p in enumerate(pages)]
    for a, b in itertools.combinations(hashes, 2):
        assert not near(a, b), hamming(a.value, b.value)
    # ...while the same page saved again, smaller and with a margin cut, still is.
    again = pages[0].resize((600, 600), Image.LANCZOS).crop((30, 30, 570, 570))
    assert near(hashes[0], _hash_of(again, tmp_path, "again"))


def test_letterboxed_copy_is_near_its_original(tmp_path):
    for name, base in _bases()[:4]:
        w, h = base.size
        boxed = Image.new("RGB", (w, h + h // 4), (0, 0, 0))  # black bars above and below
        boxed.paste(base, (0, h // 8))
        hb, hx = _hash_of(base, tmp_path, name), _hash_of(boxed, tmp_path, f"{name}-boxed")
        assert near(hb, hx), (name, hamming(hb.value, hx.value))


def test_different_near_black_frames_are_not_near(tmp_path):
    rng = np.random.default_rng(3)
    size = (640, 360)
    frames = {
        "black": Image.new("RGB", size, (0, 0, 0)),
        "dark-grey": Image.new("RGB", size, (9, 9, 12)),
        "noise": Image.fromarray(rng.integers(0, 8, (size[1], size[0], 3), dtype=np.uint8)),
        "vignette": Image.fromarray(
            np.clip(10 - 8 * np.hypot(*np.mgrid[-1:1:360j, -1:1:640j]), 0, 255).astype(np.uint8)
        ).convert("RGB"),
        "white": Image.new("RGB", size, (255, 255, 255)),
    }
    hashes = {name: _hash_of(img, tmp_path, name) for name, img in frames.items()}
    for name, h in hashes.items():
        assert h.low_information, name
        assert not near(h, h), name  # only identical bytes may pair a blank frame
    for a, b in itertools.combinations(hashes.values(), 2):
        assert not near(a, b)


def test_a_dark_photo_is_not_blank_and_stays_near_its_bright_original(tmp_path):
    base = _bases()[0][1]
    night = Image.fromarray((np.asarray(base) * 0.25).astype(np.uint8))
    hb, hn = _hash_of(base, tmp_path, "day"), _hash_of(night, tmp_path, "night")
    assert not hn.low_information
    assert near(hb, hn), hamming(hb.value, hn.value)


def test_transparent_and_16_bit_pictures_hash_like_their_8_bit_copies(tmp_path):
    base = _bases()[1][1]
    # A transparent PNG (hidden pixels black) and the JPEG flattened onto white that people keep.
    rgba = base.convert("RGBA")
    alpha = Image.new("L", base.size, 0)
    ImageDraw.Draw(alpha).ellipse([20, 20, base.width - 20, base.height - 20], fill=255)
    rgba.putalpha(alpha)
    hidden_black = Image.composite(rgba, Image.new("RGBA", base.size, (0, 0, 0, 0)), alpha)
    flat = Image.alpha_composite(Image.new("RGBA", base.size, (255, 255, 255, 255)), hidden_black).convert("RGB")
    h_png = perceptual_hash(open_image(_save(hidden_black, tmp_path / "t.png")))
    h_jpg = _hash_of(flat, tmp_path, "flat")
    assert near(h_png, h_jpg), hamming(h_png.value, h_jpg.value)
    # A 16-bit greyscale PNG and its 8-bit JPEG.
    grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    h16 = perceptual_hash(open_image(_save(Image.fromarray(grey), tmp_path / "g16.png")))
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    h8 = _hash_of(base.convert("L"), tmp_path, "g8")
    assert not h16.low_information
    assert near(h16, h8), hamming(h16.value, h8.value)


def test_untrimmed_hash_matches_imagehash_phash(library, tmp_path):
    try:
        import imagehash  # the reference implementation (the test extra)
    except ImportError:
        if os.environ.get("CI"):  # in CI the reference must be there: fail, not skip
            raise
        pytest.skip("imagehash is not installed (pip install '.[test]')")
    for name, base in _bases():
        img = open_image(_save(base, tmp_path / f"{name}.png"))
        reference = int(str(imagehash.phash(img)), 16)
        assert hamming(perceptual_hash(img, trim_margins=False).value, reference) <= 1, name


def test_hamming_and_int64_round_trip():
    rng = np.random.default_rng(5)
    values = [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1] + [int(v) for v in rng.integers(0, 2**63, 50, dtype=np.uint64) * 2 + 1]
    for v in values:
        s = to_int64(v)
        assert -(1 << 63) <= s < (1 << 63)
        assert from_int64(s) == v
        assert np.array([v], dtype=np.uint64).view(np.int64)[0] == s  # the same bits numpy reads
    assert hamming(0, (1 << 64) - 1) == 64
    assert hamming(to_int64((1 << 64) - 1), 0) == 64
    assert hamming(0b1011, 0b0110) == 3
    with pytest.raises(ValueError):
        to_int64(1 << 64)
    with pytest.raises(ValueError):
        from_int64(1 << 63)


def test_near_respects_the_distance():
    a = PerceptualHash(value=0, spread=50.0)
    b = PerceptualHash(value=(1 << 9) - 1, spread=50.0)  # 9 bits apart
    assert not near(a, b, 8)
    assert near(a, b, 9)
