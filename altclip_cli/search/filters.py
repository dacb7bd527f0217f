"""Search's metadata filters: date bounds, a place and a distance, a camera, and the order of
the results; one SearchFilter made by one parser (parse_filter) for `altclip search`,
`altclip classify --index` and POST /v1/search.

    where = parse_filter(after="2023-06", before="2023-08", near="43.3,5.4", within="5km", camera="canon")
    snap = store.snapshot(root, where=where)     # only the files it keeps, in SQL (SearchFilter.sql)
    where.select(columns)                        # the same over a server's cached FactColumns, in numpy
    where.accepts(facts)                         # the same rule on one search.facts.PhotoFacts

The parsers raise ValueError with a message naming the text given and the form expected;
parse_filter raises FilterError, which also names the field (the command line's option, the
request's field). Cheap to import: numpy is imported inside the functions that need it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime

from .facts import TAKEN_UNKNOWN, local_datetime, local_seconds

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
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large a distance: expected a number and km or m, e.g. 5km, 500m")
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
    needle = camera_needle(text)
    hay = camera_text(" ".join(p for p in (make, model) if p))
    return bool(hay) and needle in hay


def camera_needle(text: str) -> str:
    """What a camera filter looks for: `text` in lower case, runs of spaces made one."""
    needle = camera_text(text)
    if not needle:
        raise ValueError(f"{text!r} names no camera: expected part of a make or model, e.g. 'canon' or 'EOS R5'")
    return needle


def camera_text(text: str) -> str:
    """A camera's make and model as compared: lower case (ASCII letters only, as SQLite's lower()
    does: the index stores cameras in ASCII), runs of spaces made one."""
    return " ".join(text.split()).translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def local_time(taken: str) -> datetime:
    """A stored capture time ("2023-07-14T10:20:30+02:00" or naive) as the naive wall-clock time
    where the photo was taken: what date bounds compare with ("summer 2023" is local summer)."""
    return datetime.fromisoformat(taken).replace(tzinfo=None)


# --- one filter for search, classify --index and POST /v1/search ------------------------------------

DEFAULT_WITHIN = "1km"  # --near without --within: the size of a neighbourhood, a beach, a park
SORTS = ("score", "date")
FIELDS = ("after", "before", "near", "within", "camera", "sort")  # the options' names, the request's fields
FACT_NAMES = {"date": "date", "place": "place (GPS position)", "camera": "camera"}  # what a filter needs
_BOX_MARGIN_DEG = 1e-6  # the bounding box is widened by this much, so that rounding never loses a photo in it




@dataclass
class FactColumns:
    """The facts of the files of a folder with a vector, as columns in one order (read by
    snapshot.py, kept by a long-lived reader so that any filter runs again without SQL). ids,
    rows int64; read bool (the facts were read); taken_local int64 (TAKEN_UNKNOWN: unknown);
    lat, lon float64 (NaN: unknown); camera int32, an index into cameras (-1: unknown)."""

    ids: object
    rows: object
    read: object
    taken_local: object
    lat: object
    lon: object
    camera: object
    cameras: list


class FilterError(ValueError):
    """A filter that cannot be used. `field` names it (one of FIELDS); message_for(prefix) names
    every field with that prefix: "--" for the command line, "" for a request."""

    def __init__(self, field: str, template: str):
        self.field, self.template = field, template
        super().__init__(self.message_for("--"))

    def message_for(self, prefix: str) -> str:
        return self.template.format(**{f: prefix + f for f in FIELDS})


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


@dataclass(frozen=True)
class SearchFilter:
    """Which photos a search keeps, by the facts the index holds about them (search/facts.py),
    and the order of its results. Made by parse_filter.

    taken_from, taken_to: taken_local seconds, from (included) and to (excluded), or None;
    near: (lat, lon) in degrees and within_m metres (a great circle), or None;
    camera: lower-case text that the camera's make and model must contain, or None;
    sort: "score" (best first) or "date" (the photos kept by -k / --min-score, oldest first,
    those without a date last). A photo without a fact that a filter asks about is left out."""

    taken_from: int | None = None
    taken_to: int | None = None
    near: tuple[float, float] | None = None
    within_m: float | None = None
    camera: str | None = None
    sort: str = "score"

    @property
    def active(self) -> bool:
        """Whether it leaves any photo out."""
        return bool(self.needs)

    @property
    def needs_dates(self) -> bool:
        """Whether dates matter to it (a date filter, or the date order): what a table then shows."""
        return self.sort == "date" or "date" in self.needs

    @property
    def needs(self) -> tuple[str, ...]:
        """The facts its filters ask about, among "date", "place", "camera"."""
        return tuple(name for name, used in (("date", self.taken_from is not None or self.taken_to is not None),
                                             ("place", self.near is not None), ("camera", self.camera is not None))
                     if used)

    # --- in SQL, over the index's files table -------------------------------------------------------

    def sql(self) -> tuple[str, list]:
        """SQL (for WHERE, over the files table) and its parameters: the date range, the camera,
        and a bounding box around the place (exact() then keeps the photos within the circle)."""
        terms, params = [], []
        if self.taken_from is not None:
            terms.append("taken_local >= ?")
            params.append(self.taken_from)
        if self.taken_to is not None:
            terms.append("taken_local < ?")
            params.append(self.taken_to)
        if self.near is not None:
            (lat_lo, lat_hi), lons = self.box()
            terms.append("lat BETWEEN ? AND ?")
            params += [lat_lo, lat_hi]
            if lons is None:
                terms.append("lon IS NOT NULL")
            else:
                lon_lo, lon_hi = lons
                if lon_lo <= lon_hi:
                    terms.append("lon BETWEEN ? AND ?")
                else:  # across the antimeridian: from lon_lo up to 180, and from -180 up to lon_hi
                    terms.append("(lon >= ? OR lon <= ?)")
                params += [lon_lo, lon_hi]
        if self.camera is not None:
            terms.append("instr(lower(camera), ?) > 0")
            params.append(self.camera)
        return " AND ".join(terms) or "1", params

    def box(self) -> tuple[tuple[float, float], tuple[float, float] | None]:
        """((lat_lo, lat_hi), (lon_lo, lon_hi) or None: every longitude) around the circle of
        `near` and `within_m`; lon_lo > lon_hi when it crosses the antimeridian."""
        lat, lon = self.near
        angle = self.within_m / EARTH_RADIUS_M  # radians of arc
        dlat = math.degrees(angle) + _BOX_MARGIN_DEG
        lats = (max(-90.0, lat - dlat), min(90.0, lat + dlat))
        if lat - dlat <= -90 or lat + dlat >= 90 or angle >= math.pi / 2:
            return lats, None  # the circle holds a pole (or a hemisphere): any longitude
        ratio = math.sin(angle) / math.cos(math.radians(lat))  # the widest longitude on the circle
        if ratio >= 1:
            return lats, None
        dlon = math.degrees(math.asin(ratio)) + _BOX_MARGIN_DEG
        if dlon >= 180:
            return lats, None
        lo, hi = lon - dlon, lon + dlon
        return lats, (lo + 360 if lo < -180 else lo, hi - 360 if hi > 180 else hi)

    @property
    def exact_columns(self) -> tuple[str, ...]:
        """The columns exact() needs of the rows sql() kept."""
        return ("lat", "lon") if self.near is not None else ()

    def exact(self, lat, lon):
        """A bool array: which of the rows sql() kept (their lat and lon, float arrays) are within
        within_m of near."""
        import numpy as np

        return distances_m(self.near, np.asarray(lat, np.float64), np.asarray(lon, np.float64)) <= self.within_m

    def missing_sql(self) -> list[tuple[str, str]]:
        """(fact, SQL true for a file without it) for each fact the filters ask about."""
        column = {"date": "taken_local IS NULL", "place": "lat IS NULL OR lon IS NULL", "camera": "camera IS NULL"}
        return [(name, column[name]) for name in self.needs]

    # --- in numpy, on a folder's facts kept as columns (a long-lived reader's) ---------------------

    def select(self, columns: "FactColumns"):
        """((2, N) int64: the file ids and vector rows it keeps, counts as Snapshot has them) from
        a folder's FactColumns holding the facts it needs: what sql() and exact() select."""
        import numpy as np

        keep = np.ones(len(columns.ids), bool)
        counts = {"total": len(columns.ids), "unread": int((~columns.read).sum())}
        if "date" in self.needs:
            taken = columns.taken_local
            known = taken != TAKEN_UNKNOWN
            counts["date"] = int((~known).sum())
            keep &= known
            if self.taken_from is not None:
                keep &= taken >= self.taken_from
            if self.taken_to is not None:
                keep &= taken < self.taken_to
        if self.near is not None:
            known = ~np.isnan(columns.lat)
            counts["place"] = int((~known).sum())
            (lat_lo, lat_hi), lons = self.box()
            keep &= known & (columns.lat >= lat_lo) & (columns.lat <= lat_hi)
            if lons is not None:
                lon = columns.lon
                keep &= ((lon >= lons[0]) & (lon <= lons[1])) if lons[0] <= lons[1] else \
                    ((lon >= lons[0]) | (lon <= lons[1]))
            inside = np.flatnonzero(keep)
            keep[inside] = self.exact(columns.lat[inside], columns.lon[inside])
        if self.camera is not None:
            counts["camera"] = int((columns.camera < 0).sum())
            matching = [code for code, text in enumerate(columns.cameras) if self.camera in camera_text(text)]
            keep &= np.isin(columns.camera, np.asarray(matching, np.int32))
        return np.stack([columns.ids[keep], columns.rows[keep]]), counts

    # --- in Python, on one photo's facts ------------------------------------------------------------

    def lacks(self, facts) -> list[str]:
        """The facts the filters ask about that `facts` (a PhotoFacts, or None: not read) lacks."""
        have = {"date": facts is not None and facts.taken_local is not None,
                "place": facts is not None and facts.lat is not None and facts.lon is not None,
                "camera": facts is not None and bool(facts.camera)}
        return [name for name in self.needs if not have[name]]

    def accepts(self, facts) -> bool:
        """Whether the photo with these facts (a PhotoFacts, or None) is kept: what sql() and
        exact() keep, for one photo."""
        if self.lacks(facts):
            return False
        if self.taken_from is not None and facts.taken_local < self.taken_from:
            return False
        if self.taken_to is not None and facts.taken_local >= self.taken_to:
            return False
        if self.near is not None and not haversine_m(self.near, (facts.lat, facts.lon)) <= self.within_m:
            return False
        return self.camera is None or self.camera in camera_text(facts.camera)

    def as_request(self) -> dict:
        """The request fields (POST /v1/search) that parse_filter makes this filter of again."""
        out: dict = {}
        if self.taken_from is not None:
            out["after"] = local_datetime(self.taken_from).date().isoformat()
        if self.taken_to is not None:  # the day before the first instant after the range
            out["before"] = local_datetime(self.taken_to - 1).date().isoformat()
        if self.near is not None:
            out["near"] = list(self.near)
            out["within"] = _plain(self.within_m) + "m"
        if self.camera is not None:
            out["camera"] = self.camera
        if self.sort != "score":
            out["sort"] = self.sort
        return out

    # --- the order of the results -------------------------------------------------------------------

    def order(self, hits: list, taken_local: list) -> list:
        """`hits` (best first) in the order asked for: as they are for "score"; for "date" by
        taken_local (seconds, None: unknown) oldest first, those without a date last, equal
        dates in score order."""
        if self.sort != "date":
            return list(hits)
        keyed = sorted(range(len(hits)), key=lambda i: (taken_local[i] is None, taken_local[i] or 0, i))
        return [hits[i] for i in keyed]


def parse_filter(after: str | None = None, before: str | None = None, near=None, within: str | None = None,
                 camera: str | None = None, sort: str | None = None) -> SearchFilter:
    """The SearchFilter of the command line's --after, --before, --near, --within, --camera and
    --sort (or a request's fields of the same names; near may also be a [lat, lon] pair).
    FilterError naming the field for a bad value, --within without --near, or --after past
    --before."""
    def parsed(field, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except ValueError as exc:
            raise FilterError(field, "{" + field + "}: " + _literal(str(exc))) from None

    low = parsed("after", parse_date_bound, after, end=False) if after is not None else None
    high = parsed("before", parse_date_bound, before, end=True) if before is not None else None
    if low is not None and high is not None and low >= high:
        raise FilterError("after", f"{{after}} {_literal(after)} is after {{before}} {_literal(before)}: "
                                   "no date is in both (both include the period they name)")
    if isinstance(near, (list, tuple)):
        if len(near) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in near):
            raise FilterError("near", "{near}: " + _literal(repr(list(near))) + " is not a place: expected "
                                      "[LAT, LON] in decimal degrees, e.g. [48.85, 2.35]")
        near = ",".join(_plain(x) for x in near)
    place = parsed("near", parse_near, near) if near is not None else None
    if within is not None and place is None:
        raise FilterError("within", "{within} " + _literal(within) + " needs {near} LAT,LON: the place to measure "
                                    "the distance from")
    metres = parsed("within", parse_distance, within if within is not None else DEFAULT_WITHIN) if place else None
    needle = parsed("camera", camera_needle, camera) if camera is not None else None
    sort = "score" if sort is None else sort
    if sort not in SORTS:
        raise FilterError("sort", "{sort}: " + _literal(repr(sort)) + " is not an order: expected score or date")
    return SearchFilter(taken_from=local_seconds(low.isoformat()) if low is not None else None,
                        taken_to=local_seconds(high.isoformat()) if high is not None else None,
                        near=place, within_m=metres, camera=needle, sort=sort)


def _plain(x: float) -> str:
    """A number as parse_near reads it (no exponent)."""
    from decimal import Decimal

    text = repr(x) if isinstance(x, int) else repr(float(x))
    return format(Decimal(text), "f") if "e" in text else text


def distances_m(center: tuple[float, float], lat, lon):
    """haversine_m from `center` to each point of the float arrays lat, lon (degrees), in numpy."""
    import numpy as np

    lat1, lon1 = math.radians(center[0]), math.radians(center[1])
    lat2, lon2 = np.radians(lat), np.radians(lon)
    h = np.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(h)))


def missing_lines(missing: dict, unread: int = 0) -> list[str]:
    """What a summary says of the photos a filter left out for lack of a fact: "12 photos have
    no date" per fact (missing: {fact: count}), and those whose facts the index has not read."""
    lines = [f"{n:,} photo{'' if n == 1 else 's'} {'has' if n == 1 else 'have'} no {FACT_NAMES[name]}: "
             "left out by the filter" for name, n in missing.items() if n]
    if unread:
        lines.append(f"{unread:,} of them {'was' if unread == 1 else 'were'} indexed before altclip read dates, "
                     "places and cameras: `altclip index` reads them")
    return lines
