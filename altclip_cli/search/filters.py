"""The pieces of search's metadata filters: date bounds, a place and a distance, a camera.

Pure functions over the values inputs/photometa.py reads. Parsers raise ValueError with a message
naming the text given and the form expected; the command line turns it into a usage error.
"""
from __future__ import annotations

import math
import re
from datetime import datetime

EARTH_RADIUS_M = 6_371_000.0  # a sphere: within 0.5% of the ellipsoid, plenty for "within 5 km"

_DATE_FORMS = "YYYY, YYYY-MM or YYYY-MM-DD"
_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_NEAR = re.compile(rf"\s*({_NUMBER})\s*,\s*({_NUMBER})\s*")
_DISTANCE = re.compile(rf"\s*({_NUMBER})\s*(km|m)\s*", re.IGNORECASE)


def parse_date_bound(text: str, *, end: bool) -> datetime:
    """The boundary of a date range, a naive datetime compared with local capture times
    (`local_time`): the first instant of the period named by "2023", "2023-07" or "2023-07-14", or
    with end=True the first instant after it. Both bounds take the named period in: --after 2023-07
    is from 2023-07-01 on (end=False), --before 2023-07 is before 2023-08-01 (end=True)."""
    match = _DATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a date: expected {_DATE_FORMS}")
    year, month, day = int(match[1]), int(match[2] or 1), int(match[3] or 1)
    try:
        start = datetime(year, month, day)
    except ValueError:
        raise ValueError(f"{text!r} is not a date of the calendar: expected {_DATE_FORMS}") from None
    if not end:
        return start
    try:
        if match[3]:
            return datetime.fromordinal(start.toordinal() + 1)
        if match[2]:
            return datetime(year + month // 12, month % 12 + 1, 1)
        return datetime(year + 1, 1, 1)
    except (ValueError, OverflowError):
        raise ValueError(f"{text!r} is past the last date a computer clock can hold") from None


def parse_near(text: str) -> tuple[float, float]:
    """(lat, lon) in degrees from "48.85,2.35" (south and west negative)."""
    match = _NEAR.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a place: expected LAT,LON in decimal degrees, e.g. 48.85,2.35")
    lat, lon = float(match[1]), float(match[2])
    if not -90 <= lat <= 90:
        raise ValueError(f"{text!r}: latitude {match[1]} is outside -90..90 (expected LAT,LON, latitude first)")
    if not -180 <= lon <= 180:
        raise ValueError(f"{text!r}: longitude {match[2]} is outside -180..180 (expected LAT,LON)")
    return lat, lon


def parse_distance(text: str) -> float:
    """Metres from "5km", "500m" or "2.5 km" (a unit is required: a bare number is ambiguous)."""
    match = _DISTANCE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a distance: expected a number and km or m, e.g. 5km, 500m, 2.5 km")
    value = float(match[1]) * (1000.0 if match[2].lower() == "km" else 1.0)
    if value <= 0:
        raise ValueError(f"{text!r}: a distance must be above zero")
    return value


def haversine_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in metres between two (lat, lon) points in degrees."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def camera_matches(text: str, make: str | None, model: str | None) -> bool:
    """Whether `text` is in "make model", ignoring case and runs of spaces ("eos r5" matches
    Canon's "EOS R5"). A photo without make and model matches nothing."""
    needle = " ".join(text.split()).casefold()
    if not needle:
        raise ValueError(f"{text!r} names no camera: expected part of a make or model, e.g. 'canon' or 'EOS R5'")
    hay = " ".join(" ".join(p for p in (make, model) if p).split()).casefold()
    return bool(hay) and needle in hay


def local_time(taken: str) -> datetime:
    """A stored capture time ("2023-07-14T10:20:30+02:00" or naive) as the naive wall-clock time
    where the photo was taken: what date bounds compare with ("summer 2023" is local summer)."""
    return datetime.fromisoformat(taken).replace(tzinfo=None)
