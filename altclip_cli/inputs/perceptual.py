"""A perceptual hash of a photo's decoded pixels: the same picture saved again hashes alike.

The hash is the classic DCT pHash, 64 bits:
  1. the picture in 8-bit greyscale, shrunk to 32x32 with Lanczos filtering;
  2. its 2-D DCT-II; the 8x8 lowest frequencies (the DC term included) are kept;
  3. each of those 64 coefficients gives one bit: 1 when above their median.
Bits are read row by row, the first the most significant, as `imagehash.phash` orders them, so
`int(str(imagehash.phash(img)), 16)` is the same number for an opaque 8-bit picture hashed with
trim_margins=False (or one without blank margins).

Why pHash: low frequencies survive re-encoding, recompression, resizing, metadata stripping and
crops of a few percent (a difference hash of neighbouring pixels moves more under a crop), and
the median threshold makes it independent of brightness and contrast.

Two refinements, both for the false alarms a duplicate finder must not raise:
- Blank margins are trimmed before hashing: rows and columns at the edges whose every pixel is
  within `MARGIN_TOLERANCE` grey levels (fewer for a faint picture) of the border's colour.
  Two different objects on the same white page otherwise share most low frequencies (the
  page's); trimmed, they are compared by what they show. A border cropped away or added, or
  letterboxing, does not move the hash.
- A picture with almost no contrast (a black or blank frame, a lens-cap shot: the standard
  deviation of its 32x32 greyscale thumbnail, margins included, under `LOW_SPREAD` grey levels)
  has a hash made of noise, and any two such frames may share it. `near` never pairs such a
  picture by its hash: it is `low_information`, and only a byte-identical copy matches it.

The caller passes a decoded image already EXIF-transposed (`inputs.images.open_image` does),
so a rotated copy hashes like the upright original. numpy and Pillow are imported lazily.

Storage: the hash is a Python int in [0, 2**64); SQLite integers are signed 64-bit, so
`to_int64` / `from_int64` map it there and back.
"""

from __future__ import annotations

from dataclasses import dataclass

HASH_BITS = 64
HASH_SIDE = 32  # the greyscale thumbnail's side
LOW_SIDE = 8  # the kept DCT block's side: 8x8 = 64 bits

# Hamming distance (out of 64) within which two hashes are the same picture saved again.
# Re-encoding at JPEG quality 60, halving the size, PNG copies and EXIF rotation stay within
# 0-4 bits; a crop of 3% of the width and height moves up to about 10 (low frequencies shift
# with the frame); unrelated photos sit near 32 (half the bits). 10 keeps such crops while
# leaving a chance of about 1 in 10**8 that two unrelated random hashes pass, which the
# embedding check of a duplicate finder then has to reject.
DEFAULT_MAX_DISTANCE = 10

# Standard deviation (grey levels, 0-255) of the 32x32 thumbnail below which a picture is blank.
LOW_SPREAD = 3.0

# Grey levels a margin pixel may differ from the border's colour, on the shrunk copy where JPEG
# noise averages out. Small, so a photo's clear sky is not taken for margin: a trimmed gradient
# would end somewhere else in every crop. At most half the picture's spread, so a dark photo's
# content is not taken for margin either.
MARGIN_TOLERANCE = 4

# Margins are found on a copy this size (longest side), so a huge photo costs little.
_MARGIN_SIDE = 256

# Margins inside margins trimmed at most this deep (a letterboxed scan of a photo on a page).
_MARGIN_ROUNDS = 3

_SIGNED_OFFSET = 1 << 64


@dataclass(frozen=True)
class PerceptualHash:
    """A picture's 64-bit DCT hash and how much contrast it had to build it from."""

    value: int  # in [0, 2**64)
    spread: float  # standard deviation of the 32x32 greyscale thumbnail, in grey levels

    @property
    def low_information(self) -> bool:
        """Blank or near-uniform: the hash says nothing about what the picture shows."""
        return self.spread < LOW_SPREAD


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes (ints, signed or not)."""
    return ((a ^ b) & (_SIGNED_OFFSET - 1)).bit_count()


def near(a: PerceptualHash, b: PerceptualHash, max_distance: int = DEFAULT_MAX_DISTANCE) -> bool:
    """The same picture by hash: within `max_distance` bits, and neither of them blank.

    A duplicate finder should also require the photos' embeddings to agree: a hash alone cannot
    tell two pictures apart that differ only in fine detail.
    """
    if a.low_information or b.low_information:
        return False
    return hamming(a.value, b.value) <= max_distance


def to_int64(value: int) -> int:
    """A hash in [0, 2**64) as the signed 64-bit integer SQLite stores (same bits)."""
    if not 0 <= value < _SIGNED_OFFSET:
        raise ValueError(f"not a 64-bit hash: {value}")
    return value - _SIGNED_OFFSET if value >= 1 << 63 else value


def from_int64(value: int) -> int:
    """The inverse of `to_int64`."""
    if not -(1 << 63) <= value < 1 << 63:
        raise ValueError(f"not a signed 64-bit integer: {value}")
    return value + _SIGNED_OFFSET if value < 0 else value


def perceptual_hash(image, *, trim_margins: bool = True) -> PerceptualHash:
    """Hash a decoded, EXIF-transposed PIL image (any mode; transparency is composited onto white).

    trim_margins=False hashes the whole frame, exactly as `imagehash.phash` does.
    """
    import numpy as np
    from PIL import Image

    grey = _greyscale(image)
    whole = np.asarray(grey.resize((HASH_SIDE, HASH_SIDE), Image.LANCZOS), dtype=np.float64)  # (32, 32)
    spread = float(whole.std())
    # A dark or faint picture's margin is told from its content by a tolerance its contrast allows.
    tolerance = min(MARGIN_TOLERANCE, spread / 2)
    box = _content_box(grey, tolerance) if trim_margins else None
    pixels = whole
    if box is not None and box != (0, 0) + grey.size:
        pixels = np.asarray(grey.crop(box).resize((HASH_SIDE, HASH_SIDE), Image.LANCZOS), dtype=np.float64)
    basis = _dct_basis(HASH_SIDE)
    low = (basis @ pixels @ basis.T)[:LOW_SIDE, :LOW_SIDE]  # (8, 8): rows are vertical frequencies
    bits = (low > np.median(low)).ravel()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return PerceptualHash(value=value, spread=spread)


def _greyscale(image):
    """The picture in 8-bit grey ("L"), as the model would see it.

    Transparency is composited onto white (inputs.images.to_rgb, the model's own rule), so a
    transparent PNG and its flattened JPEG copy agree. 16-bit and 32-bit integer pixels are scaled
    from 0-65535 (Pillow's own conversion would clip them at 255); float pixels are stretched
    from their minimum to their maximum.
    """
    import numpy as np
    from PIL import Image

    from .images import to_rgb

    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64) / 257  # 16-bit range to 8-bit
        return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8))
    return to_rgb(image).convert("L")


def _dct_basis(n: int):
    """The (n, n) DCT-II matrix without normalisation: X = C @ x is scipy's dct(x, axis=0) / 2."""
    import numpy as np

    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def _content_box(grey, tolerance: float):
    """The (left, top, right, bottom) box inside blank margins, in `grey`'s pixels.

    None when the whole picture is one colour (nothing to trim to).
    """
    import numpy as np
    from PIL import Image

    width, height = grey.size
    scale = max(width, height) / _MARGIN_SIDE
    small = grey
    if scale > 1:
        small = grey.resize((max(1, round(width / scale)), max(1, round(height / scale))), Image.BOX)
    else:
        scale = 1.0
    a = np.asarray(small, dtype=np.int16)  # (h, w)
    top, left, bottom, right = 0, 0, a.shape[0], a.shape[1]  # the content so far, in `small`
    for round_ in range(_MARGIN_ROUNDS):  # margins inside margins: a letterboxed picture on a page
        inner = a[top:bottom, left:right]
        ring = np.concatenate([inner[0], inner[-1], inner[:, 0], inner[:, -1]])
        busy = np.abs(inner - int(np.median(ring))) > tolerance  # (h, w): pixels that are not margin
        rows = np.flatnonzero(busy.any(axis=1))
        cols = np.flatnonzero(busy.any(axis=0))
        if rows.size == 0:  # one colour inside: the frame itself, or a plain block on a page
            if round_ == 0:
                return None
            break
        box = (top + rows[0], left + cols[0], top + rows[-1] + 1, left + cols[-1] + 1)
        if box == (top, left, bottom, right):
            break
        top, left, bottom, right = box
    return _scale_box((left, top, right, bottom), scale, width, height)


def _scale_box(box, scale: float, width: int, height: int):
    """A box in the small copy's pixels, in full-size pixels, rounded outwards so no content is cut."""
    import numpy as np

    left, top, right, bottom = box
    return (max(0, int(left * scale)), max(0, int(top * scale)),
            min(width, int(np.ceil(right * scale))), min(height, int(np.ceil(bottom * scale))))
