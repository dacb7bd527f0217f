"""Opening images and turning them into the vision tower's pixel values.

`open_image` decodes one file (EXIF orientation applied, first frame of animations) and turns every
failure into an `InputError` that names the input. `ImagePreprocessor` is the reference's PIL recipe
(transformers' `CLIPImageProcessorPil`), bit for bit: RGB, shortest-edge bicubic resize on uint8,
centre crop with zero padding, rescale, normalise, CHW float32. numpy and PIL only.
"""

from __future__ import annotations

import io
import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, InputError
from .files import open_regular

# PIL's own refusal threshold: twice Image.MAX_IMAGE_PIXELS (1 GiB / 4 bytes / 3), about 179 million.
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)

PREPROCESSOR_CONFIG = "preprocessor_config.json"


# --- opening -----------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """The reason a decode failed, in plain words, keeping PIL's own text for the curious."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (UnidentifiedImageError, struct.error)):  # struct: a file of a few bytes
        return "not an image, or in a format Pillow cannot read"
    if "truncated" in text.lower():
        return f"the file is truncated or damaged ({text})"
    return f"cannot decode the image ({text})"


def _bomb_error(label: str, pixels: int, max_pixels: int) -> InputError:
    return InputError(
        f"{label}: image has {pixels:,} pixels, over the limit of {max_pixels:,} pixels "
        "that guards against decompression bombs; if you trust this file, raise the limit "
        "(max_pixels=, or --max-pixels on the command line)",
        hint=f"pass a max_pixels above {pixels:,} (or None to disable the check)",
    )


def _open_unchecked(fp) -> Image.Image:
    """Image.open without its decompression-bomb check, which reads the process-wide
    Image.MAX_IMAGE_PIXELS and warns through the process-wide warnings filters (neither can be
    set for one call, and changing them would reach every thread). The same format plugins are
    tried in the same order (the common ones, then all); `max_pixels` takes the check's place."""
    fp.seek(0)
    prefix = fp.read(16)
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            verdict = not accept or accept(prefix)
            if verdict and not isinstance(verdict, str):  # a str is a plugin declining, with a reason
                fp.seek(0)
                try:
                    return factory(fp, "")
                except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all
                    continue
    raise UnidentifiedImageError("cannot identify image file")


def _decode(fp, label: str, max_pixels: int | None, draft_min_side: int | None = None,
            on_header: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """Open, check the size, and load the first frame from a binary file object."""
    image = _open_unchecked(fp)
    width, height = image.size
    pixels = max(1, width) * max(1, height)
    if max_pixels is not None and pixels > max_pixels:
        raise _bomb_error(label, pixels, max_pixels)
    if on_header is not None:
        on_header(image)
    if draft_min_side and image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT domain: several times faster on
        # large photos, keeping the shortest side >= draft_min_side (see docs/models.md, Correctness).
        image.draft(image.mode, (draft_min_side, draft_min_side))
    image.load()  # the file is at frame 0; load decodes only that frame
    try:
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to rotate
    except Exception:  # noqa: BLE001 - a malformed EXIF block leaves good pixels; keep them unrotated
        pass
    return image


def _open_file(fp, label: str, max_pixels: int | None, draft_min_side: int | None = None,
               on_bytes: Callable[[bytes], None] | None = None,
               on_header: Callable[[Image.Image], None] | None = None) -> Image.Image:
    try:
        if on_bytes is not None:  # the file read once, whole: on_bytes sees the very bytes decoded
            data = fp.read()
            on_bytes(data)
            fp = io.BytesIO(data)
        return _decode(fp, label, max_pixels, draft_min_side, on_header)
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        # A few plugins (TIFF, ICO, ICNS, GIF frames larger than their canvas) check PIL's own
        # process-wide limit again while decoding; altclip leaves that limit to the application.
        raise InputError(
            f"{label}: Pillow refuses to decode this image ({exc}); its limit is process-wide "
            "(PIL.Image.MAX_IMAGE_PIXELS) and altclip does not change it",
            hint="raise PIL.Image.MAX_IMAGE_PIXELS in your program (the command line's --max-pixels does)",
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError, MemoryError,
            struct.error) as exc:
        # PIL's plugins raise a zoo of exception types on damaged files.
        raise InputError(f"{label}: {_describe(exc)}") from exc


def open_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_min_side: int | None = None,
    on_bytes: Callable[[bytes], None] | None = None,
    on_header: Callable[[Image.Image], None] | None = None,
) -> Image.Image:
    """Open and fully decode one image.

    EXIF orientation is applied and animations (GIF, WebP, APNG, multi-page TIFF) give their first
    frame. The mode is left as decoded; `ImagePreprocessor` converts to RGB as the reference does.
    Images with more than `max_pixels` pixels are refused (None: no limit), checked before
    decoding; Pillow's process-wide PIL.Image.MAX_IMAGE_PIXELS is left alone, and only the few
    plugins that check it again while decoding (TIFF, ICO, ICNS) still apply it. Every failure raises
    `InputError` whose message starts with `name` (or the path) and says why. Only regular files
    are opened (inputs.files.open_regular): a FIFO, a device or a folder is refused unread.
    draft_min_side: decode large JPEGs at a reduced scale whose shortest side stays at least
    this (None: full size, bit-exact with the reference's preprocessing).
    on_bytes: for a file, read it whole first and call on_bytes(its bytes) before decoding them,
    so a caller can hash exactly what was decoded without reading the file twice.
    on_header: called with the opened image before its pixels are decoded (its EXIF and its
    stored size readable, before a draft scale shrinks it): search.facts reads metadata there.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<image bytes>"
        if len(source) == 0:
            raise InputError(f"{label}: no data (zero bytes)")
        return _open_file(io.BytesIO(source), label, max_pixels, draft_min_side, on_header=on_header)

    path = os.fspath(source)
    label = name or str(path)
    with open_regular(path, name=label) as fp:  # a FIFO, a device or a folder is refused here
        # We own the file handle, so PIL never closes the image core; the loaded frame outlives `fp`.
        return _open_file(fp, label, max_pixels, draft_min_side, on_bytes, on_header)


# --- preprocessing -----------------------------------------------------------------------------------


def _to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: transparency is composited onto white, everything else converted."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image  # the reference's convert("RGB") would only copy
    return image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB as the model sees it: transparency composited onto white."""
    return _to_rgb(image)


def _pair(value, what: str) -> tuple[int, int]:
    """A size given as an int, [h, w] or {"height", "width"} -> (h, w)."""
    if isinstance(value, bool):
        raise ConfigError(f"{PREPROCESSOR_CONFIG}: {what} must be a size, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return int(value["height"]), int(value["width"])
    extra = ", {'shortest_edge'}" if what == "size" else ""
    raise ConfigError(f"{PREPROCESSOR_CONFIG}: {what} must be an int, [height, width]{extra} or "
                      f"{{'height', 'width'}}, got {value!r}")


def _triple(value, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)
    raise ConfigError(f"{PREPROCESSOR_CONFIG}: {what} must be one number or three, got {value!r}")


@dataclass(frozen=True)
class ImagePreprocessor:
    """The reference's PIL preprocessing, bit-exact with transformers' `CLIPImageProcessorPil`.

    Resize: shortest side to `shortest_edge` (long side truncated, not rounded), or to exactly
    `resize_height` x `resize_width` when `shortest_edge` is None. `resample` is a PIL filter number
    (3 = bicubic). Calling it on a PIL image gives a (3, crop_height, crop_width) float32 array.
    """

    shortest_edge: int | None = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255
    resize_height: int | None = None
    resize_width: int | None = None
    resample: int = Image.Resampling.BICUBIC.value
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    # (3, 256) float32: the value each uint8 level ends up as after rescale and normalise, per channel.
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"image mean and std need 3 values each, got {self.mean} and {self.std}")
        if self.do_resize:
            if self.shortest_edge is None and (self.resize_height is None or self.resize_width is None):
                raise ConfigError("image resize needs shortest_edge, or resize_height and resize_width")
            if self.shortest_edge is not None:
                sizes = [self.shortest_edge]
            else:
                sizes = [self.resize_height, self.resize_width]
            if any(s <= 0 for s in sizes):
                raise ConfigError(f"image resize size must be positive, got {sizes}")
        if self.do_center_crop and (self.crop_height <= 0 or self.crop_width <= 0):
            raise ConfigError(f"crop size must be positive, got {self.crop_height}x{self.crop_width}")
        try:
            Image.Resampling(self.resample)
        except ValueError as exc:
            raise ConfigError(f"unknown resample filter {self.resample!r} (PIL numbers 0-5)") from exc
        object.__setattr__(self, "_lut", self._levels())

    def _levels(self) -> np.ndarray:
        """Run the reference's rescale and normalise, with its dtypes, on the 256 possible levels.

        transformers rescales in float64 then casts to float32, and normalises in float32 as
        (x - mean) / std (a true division, not a multiply by 1/std). Every step is elementwise, so
        a per-level table gives the identical bits at the cost of one gather per pixel.
        """
        x = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)  # (3, 256), like a CHW image
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            mean = np.array(self.mean, dtype=x.dtype)
            std = np.array(self.std, dtype=x.dtype)
            x = ((x.T - mean) / std).T
        return np.ascontiguousarray(x, dtype=np.float32)

    @classmethod
    def from_dict(cls, d: dict) -> ImagePreprocessor:
        """Build from a `preprocessor_config.json` dict (old feature-extractor or new image-processor form).

        Keys that are absent or null keep the defaults, as in transformers.
        """
        d = {k: v for k, v in d.items() if v is not None}
        kw: dict = {}
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if key in d:
                kw[key] = bool(d[key])
        if "rescale_factor" in d:
            kw["rescale_factor"] = float(d["rescale_factor"])
        if "resample" in d:
            kw["resample"] = int(d["resample"])
        if "image_mean" in d:
            kw["mean"] = _triple(d["image_mean"], "image_mean")
        if "image_std" in d:
            kw["std"] = _triple(d["image_std"], "image_std")
        if "crop_size" in d:
            kw["crop_height"], kw["crop_width"] = _pair(d["crop_size"], "crop_size")
        size = d.get("size")
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            kw["shortest_edge"] = int(size["shortest_edge"])
        elif isinstance(size, int) and not isinstance(size, bool):
            kw["shortest_edge"] = size  # legacy `size: 224` means the shortest edge for CLIP
        elif size is not None:
            kw["shortest_edge"] = None
            kw["resize_height"], kw["resize_width"] = _pair(size, "size")
        if d.get("use_square_size"):  # KOSMOS-2's switch: a square resize of the shortest edge
            edge = kw.get("shortest_edge") or cls.shortest_edge
            kw.update(shortest_edge=None, resize_height=edge, resize_width=edge)
        return cls(**kw)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> ImagePreprocessor:
        """Read `preprocessor_config.json` from a model folder; the defaults when it is absent."""
        path = Path(model_dir) / PREPROCESSOR_CONFIG
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc})") from exc
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the resize step produces for a `width` x `height` image."""
        if not self.do_resize:
            return width, height
        if self.shortest_edge is None:
            return self.resize_width, self.resize_height
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)  # float division then truncation, as the reference
        return (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> (3, H, W) float32 pixel values."""
        if self.do_convert_rgb:
            try:
                image = _to_rgb(image)
            except (ValueError, OSError) as exc:
                raise InputError(f"cannot convert an image of mode {image.mode} to RGB ({exc})") from exc
        elif image.mode != "RGB":
            raise InputError(f"image has mode {image.mode}, but the preprocessor config turns "
                             "do_convert_rgb off and the model needs RGB")
        if self.do_resize:
            size = self.output_size(*image.size)
            if size != image.size:  # PIL would only copy
                image = image.resize(size, resample=Image.Resampling(self.resample))
        if self.do_center_crop:
            width, height = image.size
            # Floor division: negative offsets make PIL pad with zeros exactly where the reference does.
            left = (width - self.crop_width) // 2
            top = (height - self.crop_height) // 2
            if (left, top, self.crop_width, self.crop_height) != (0, 0, width, height):
                image = image.crop((left, top, left + self.crop_width, top + self.crop_height))
        pixels = np.asarray(image)  # (H, W, 3) uint8
        out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)  # (3, H, W)
        for c in range(3):
            np.take(self._lut[c], pixels[:, :, c], out=out[c])
        return out


# --- the command line's pixel limit ------------------------------------------------------------


@contextmanager
def pil_pixel_limit(max_pixels):
    """For one run of the application, Pillow's process-wide pixel limit raised to `max_pixels`
    (--max-pixels; 0 lifts it) and restored afterwards. The library never changes
    PIL.Image.MAX_IMAGE_PIXELS (a caller's other threads use it); an application (the command
    line, a Ray actor of its run) may, and the
    few Pillow plugins that check that limit again while decoding (TIFF, ICO) then agree with
    --max-pixels. The limit is never lowered: Pillow checks it on crops too (the preprocessor's
    224 x 224 crop), and altclip's own check already refuses images above a lower cap."""
    if max_pixels is None:  # nothing to change
        yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    if max_pixels == 0:
        Image.MAX_IMAGE_PIXELS = None
    elif max_pixels is not None and saved is not None and max_pixels > saved:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
