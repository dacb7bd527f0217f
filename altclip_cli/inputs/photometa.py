"""What a photo carries besides its pixels: capture time, GPS position, camera, oriented size.

`read_meta` reads them from an already-open PIL image's EXIF (IFD0, the Exif IFD 0x8769 and the
GPS IFD 0x8825) without decoding pixels. A malformed value (a zero denominator, the blank date
"0000:00:00 00:00:00", bytes that are not ASCII, a value of the wrong type) leaves its field None
and never raises: one camera's odd EXIF must not stop an index of 50,000 photos.

Cheap to import: PIL is not imported here (the caller's image brings it).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# EXIF tags (Exif 2.32): IFD0, the Exif IFD, the GPS IFD.
IMAGE_WIDTH, IMAGE_LENGTH, MAKE, MODEL, ORIENTATION = 0x0100, 0x0101, 0x010F, 0x0110, 0x0112
EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATE_ORIGINAL, DATE_DIGITIZED = 0x9003, 0x9004
OFFSET_ORIGINAL, OFFSET_DIGITIZED = 0x9011, 0x9012
GPS_LAT_REF, GPS_LAT, GPS_LON_REF, GPS_LON = 1, 2, 3, 4

# "YYYY:MM:DD HH:MM:SS" (EXIF); "-" or "T" from writers that follow ISO instead; subseconds ignored.
_DATE = re.compile(r"(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
# "+HH:MM" / "-HH:MM" (OffsetTime*); real offsets run from -12:00 to +14:00.
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")


@dataclass(frozen=True)
class PhotoMeta:
    """One photo's metadata; each field None where the photo does not carry it (or carries it
    malformed)."""

    taken: str | None = None  # ISO 8601: "2023-07-14T10:20:30+02:00", or naive local time without offset
    taken_source: str | None = None  # "exif-original" | "exif-digitized" | "file-mtime"
    gps: tuple[float, float] | None = None  # (lat, lon) in degrees, S and W negative
    make: str | None = None
    model: str | None = None  # without the make repeated in front ("Canon EOS R5" -> "EOS R5")
    width: int | None = None  # after EXIF orientation: orientations 5-8 swap width and height
    height: int | None = None
    orientation: int | None = None  # 1-8 as stored, None when absent or out of range

    @property
    def camera(self) -> str | None:
        """Make and model in one text ("Canon EOS R5"), what a camera filter matches against."""
        parts = [p for p in (self.make, self.model) if p]
        return " ".join(parts) or None


def read_meta(image: Image.Image, *, file_mtime_ns: int | None = None) -> PhotoMeta:
    """The metadata of an open image, read from its EXIF without decoding pixels. file_mtime_ns:
    the file's modification time, used as the capture time (marked "file-mtime", in local time with
    its offset) when the EXIF has no usable date."""
    ifd0, exif, gps = _ifds(image)
    taken, source = _taken(exif, file_mtime_ns)
    make = _text(ifd0.get(MAKE))
    model = _model_without_make(make, _text(ifd0.get(MODEL)))
    orientation = ifd0.get(ORIENTATION)
    if not (isinstance(orientation, int) and 1 <= orientation <= 8):
        orientation = None
    width, height = _stored_size(image, ifd0)
    if orientation is not None and orientation >= 5:  # 5-8 turn the picture a quarter
        width, height = height, width
    return PhotoMeta(taken=taken, taken_source=source, gps=_position(gps), make=make, model=model,
                     width=width, height=height, orientation=orientation)


def _ifds(image) -> tuple[dict, dict, dict]:
    """(IFD0, Exif IFD, GPS IFD) as plain dicts, empty where missing or unreadable."""
    # A PNG whose eXIf chunk was not seen before the pixel data would be decoded by getexif() to
    # find it; an unloaded PNG without the chunk in its header is read as carrying no EXIF.
    if getattr(image, "format", None) == "PNG" and "exif" not in image.info:
        return {}, {}, {}
    try:  # Pillow raises many kinds of errors on damaged EXIF blocks; none of them may stop a run
        exif = image.getexif()
        ifd0 = dict(exif)
    except Exception:
        return {}, {}, {}
    found = []
    for tag in (EXIF_IFD, GPS_IFD):
        try:
            found.append(dict(exif.get_ifd(tag)))
        except Exception:
            found.append({})
    return ifd0, found[0], found[1]


def _stored_size(image, ifd0: dict) -> tuple[int, int]:
    """The pixel grid's size as the file stores it, before orientation. Pillow reports a TIFF's size
    already turned by its orientation; the TIFF's own ImageWidth and ImageLength tags are the
    stored size."""
    if getattr(image, "format", None) == "TIFF":
        width, length = ifd0.get(IMAGE_WIDTH), ifd0.get(IMAGE_LENGTH)
        if isinstance(width, int) and isinstance(length, int) and {width, length} == set(image.size):
            return width, length
    return image.size


# --- text --------------------------------------------------------------------------------------------

def _text(value) -> str | None:
    """An EXIF ASCII value, stripped, cut at its first NUL; None when blank, not text or not ASCII."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    value = value.split("\0", 1)[0].strip()
    if not value or not value.isascii() or not value.isprintable():
        return None
    return value


def _model_without_make(make: str | None, model: str | None) -> str | None:
    """The model with the make (or the make's first word) removed from its front: "Canon EOS R5"
    by "Canon" -> "EOS R5", "NIKON D750" by "NIKON CORPORATION" -> "D750". A model that is nothing
    but the make is kept whole."""
    if not make or not model:
        return model
    for prefix in dict.fromkeys((make, make.split()[0])):
        if model.casefold().startswith(prefix.casefold() + " "):
            return model[len(prefix):].strip()
    return model


# --- time --------------------------------------------------------------------------------------------

def _taken(exif: dict, file_mtime_ns: int | None) -> tuple[str | None, str | None]:
    for date_tag, offset_tag, source in ((DATE_ORIGINAL, OFFSET_ORIGINAL, "exif-original"),
                                         (DATE_DIGITIZED, OFFSET_DIGITIZED, "exif-digitized")):
        when = _exif_datetime(_text(exif.get(date_tag)))
        if when is not None:
            offset = _exif_offset(_text(exif.get(offset_tag)))
            return (when.replace(tzinfo=offset) if offset else when).isoformat(), source
    taken = file_time(file_mtime_ns) if file_mtime_ns is not None else None
    return (taken, "file-mtime") if taken is not None else (None, None)


def file_time(mtime_ns: int) -> str | None:
    """A file's modification time as a capture time: ISO 8601 in this machine's local time, with
    its offset; None when the clock value cannot be a date."""
    try:
        when = datetime.fromtimestamp(mtime_ns // 1_000_000_000, tz=timezone.utc).astimezone()
    except (OverflowError, OSError, ValueError):
        return None
    return when.isoformat()


def _exif_datetime(text: str | None) -> datetime | None:
    """A naive datetime from "YYYY:MM:DD HH:MM:SS"; None for blanks and impossible dates."""
    match = _DATE.match(text or "")
    if match is None:
        return None
    try:
        return datetime(*map(int, match.groups()))
    except ValueError:  # "0000:00:00 00:00:00", February 30th, hour 24
        return None


def _exif_offset(text: str | None) -> timezone | None:
    match = _OFFSET.fullmatch(text or "")
    if match is None:
        return None
    sign, hours, minutes = match[1], int(match[2]), int(match[3])
    delta = timedelta(hours=hours, minutes=minutes) * (-1 if sign == "-" else 1)
    if minutes >= 60 or not timedelta(hours=-12) <= delta <= timedelta(hours=14):
        return None
    return timezone(delta)


# --- position ----------------------------------------------------------------------------------------

def _position(gps: dict) -> tuple[float, float] | None:
    lat = _degrees(gps.get(GPS_LAT), _text(gps.get(GPS_LAT_REF)), "N", "S", 90.0)
    lon = _degrees(gps.get(GPS_LON), _text(gps.get(GPS_LON_REF)), "E", "W", 180.0)
    return None if lat is None or lon is None else (lat, lon)


def _degrees(value, ref: str | None, positive: str, negative: str, limit: float) -> float | None:
    """Signed degrees from EXIF's (degrees, minutes, seconds) rationals and a hemisphere letter;
    None for a missing or unknown hemisphere, a zero denominator, or an out-of-range part."""
    ref = (ref or "").upper()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)  # one rational, decimal degrees, reads as a single value
    if ref not in (positive, negative) or not isinstance(value, (tuple, list)) or not 1 <= len(value) <= 3:
        return None
    try:
        parts = [float(v) for v in value]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(p) and p >= 0 for p in parts) or any(p >= 60 for p in parts[1:]):
        return None  # Pillow reads a zero denominator as nan
    degrees = sum(p / 60 ** i for i, p in enumerate(parts))
    if degrees > limit:
        return None
    return -degrees if ref == negative else degrees
