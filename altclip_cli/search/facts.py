"""A photo's facts as the index holds them: capture time, place, camera, oriented size and
perceptual hash, read while the file is open for its vector (or, for an index made before they
were kept, by decoding it again without the image tower: `read_facts`).

They are columns of the index's `files` table (database.py, FACT_COLUMNS); filters, the date sort,
records and the duplicate finder read them from there.

Cheap to import: PIL and numpy are imported by the functions that decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ..inputs.photometa import PhotoMeta

# The `files` columns that hold them, in PhotoFacts' field order (the flag `facts` comes first in
# the table: 1 once they were read).
FACT_COLUMNS = ("taken", "taken_local", "taken_source", "lat", "lon", "camera", "width", "height", "phash",
                "phash_low")

_EPOCH = datetime(1970, 1, 1)

# taken_local where a column of many photos (Snapshot.table, filters.FactColumns) holds no date.
TAKEN_UNKNOWN = -(1 << 63)


@dataclass(frozen=True)
class PhotoFacts:
    """What the index knows of one photo besides its vector; None where unknown."""

    taken: str | None = None  # ISO 8601, with the offset when the photo gives one
    taken_local: int | None = None  # the wall-clock capture time, seconds since 1970-01-01T00:00:00
    taken_source: str | None = None  # "exif-original" | "exif-digitized" | "file-mtime"
    lat: float | None = None
    lon: float | None = None
    camera: str | None = None  # make and model, "Canon EOS R5"
    width: int | None = None  # after EXIF orientation
    height: int | None = None
    phash: int | None = None  # the 64-bit perceptual hash, in [0, 2**64); None when not decoded
    phash_low: bool = False  # a blank frame: its hash says nothing

    @property
    def gps(self) -> tuple[float, float] | None:
        return None if self.lat is None or self.lon is None else (self.lat, self.lon)

    def record(self) -> dict:
        """The known ones among "taken", "gps" ([lat, lon]) and "camera": what a search result's
        record adds."""
        out: dict = {}
        if self.taken is not None:
            out["taken"] = self.taken
        if self.gps is not None:
            out["gps"] = [self.lat, self.lon]
        if self.camera is not None:
            out["camera"] = self.camera
        return out

    def row(self) -> tuple:
        """The values of FACT_COLUMNS, as stored (the hash as a signed 64-bit integer)."""
        from ..inputs.perceptual import to_int64

        phash = None if self.phash is None else to_int64(self.phash)
        return (self.taken, self.taken_local, self.taken_source, self.lat, self.lon, self.camera, self.width,
                self.height, phash, int(self.phash_low))

    @classmethod
    def from_row(cls, values) -> "PhotoFacts":
        """The inverse of `row`."""
        from ..inputs.perceptual import from_int64

        taken, local, source, lat, lon, camera, width, height, phash, low = values
        return cls(taken, local, source, lat, lon, camera, width, height,
                   None if phash is None else from_int64(phash), bool(low))

    def with_file_time(self, mtime_ns: int) -> "PhotoFacts":
        """These facts for a copy of the photo modified at `mtime_ns`: the same, except a
        capture time that was the file's own (no date in the photo) is the copy's."""
        if self.taken_source not in (None, "file-mtime"):
            return self
        from ..inputs.photometa import file_time

        taken = file_time(mtime_ns)
        return PhotoFacts(**{**self.__dict__, "taken": taken, "taken_local": local_seconds(taken),
                             "taken_source": None if taken is None else "file-mtime"})


def local_seconds(taken: str | None) -> int | None:
    """An ISO 8601 capture time as the naive wall-clock time where it was taken, in seconds since
    1970-01-01T00:00:00 (what date filters and the date sort compare); None when unreadable."""
    if not taken:
        return None
    try:
        when = datetime.fromisoformat(taken).replace(tzinfo=None)
    except ValueError:
        return None
    return int((when - _EPOCH).total_seconds())


def local_datetime(seconds: int) -> datetime:
    """The inverse of `local_seconds`: the naive wall-clock time."""
    return _EPOCH + timedelta(seconds=int(seconds))


def facts_of(meta: PhotoMeta | None, phash) -> PhotoFacts:
    """PhotoFacts from a photo's metadata (inputs.photometa.read_meta; None when its header
    could not be read) and its perceptual hash (inputs.perceptual.PerceptualHash; None when its
    pixels could not be decoded)."""
    meta = meta or PhotoMeta()
    camera = " ".join(meta.camera.split()) if meta.camera else None
    lat, lon = meta.gps if meta.gps is not None else (None, None)
    return PhotoFacts(taken=meta.taken, taken_local=local_seconds(meta.taken), taken_source=meta.taken_source,
                      lat=lat, lon=lon, camera=camera, width=meta.width, height=meta.height,
                      phash=None if phash is None else phash.value,
                      phash_low=bool(phash is not None and phash.low_information))


def read_facts_by_id(db, file_ids) -> dict[int, PhotoFacts]:
    """{file id: PhotoFacts} of the files among `file_ids` whose facts were read, from an index
    database connection (an index older than the facts holds none)."""
    from .database import SQL_CHUNK

    ids = list(dict.fromkeys(int(i) for i in file_ids))
    if not ids or not has_fact_columns(db):
        return {}
    out = {}
    columns = ", ".join(FACT_COLUMNS)
    for start in range(0, len(ids), SQL_CHUNK):
        chunk = ids[start:start + SQL_CHUNK]
        cur = db.execute(f"SELECT id, {columns} FROM files WHERE facts = 1 AND id IN ({','.join('?' * len(chunk))})",
                         chunk)
        out.update((int(row[0]), PhotoFacts.from_row(row[1:])) for row in cur)
    return out


def has_fact_columns(db) -> bool:
    """Whether the database's files table has the fact columns (a reader may open an index that
    no writer of this altclip has upgraded yet)."""
    return any(row[1] == "facts" for row in db.execute("PRAGMA table_info(files)"))


class FactsReader:
    """Reads one file's facts from the image as it is decoded: pass `header` as open_image's
    on_header (it reads the EXIF and the stored size before a draft decode shrinks the picture),
    then `done(image)` with the decoded image. Used in the decoding thread."""

    def __init__(self, mtime_ns: int | None):
        self.mtime_ns = mtime_ns
        self.meta: PhotoMeta | None = None

    def header(self, image) -> None:
        from ..inputs.photometa import read_meta

        try:
            self.meta = read_meta(image, file_mtime_ns=self.mtime_ns)
        except Exception:  # noqa: BLE001 - a photo's metadata never fails its vector
            self.meta = None

    def done(self, image) -> PhotoFacts:
        from ..inputs.perceptual import perceptual_hash

        try:
            phash = perceptual_hash(image)
        except Exception:  # noqa: BLE001 - an odd mode or a decoder quirk: the facts without a hash
            phash = None
        return facts_of(self.meta, phash)


# The shortest side facts are decoded at when the model does not decode the file anyway (a JPEG's
# draft scale): the perceptual hash looks at a 32x32 thumbnail, so a draft loses nothing it uses.
FACTS_DRAFT_SIDE = 256


def read_facts(path: str, mtime_ns: int | None, max_pixels: int | None | bool = False) -> PhotoFacts | None:
    """The facts of the image file at `path`, decoded without the model; None when it cannot
    be decoded (inputs.images says why; the caller records no facts for it)."""
    from ..errors import InputError
    from ..inputs.images import open_image

    reader = FactsReader(mtime_ns)
    kw = {} if max_pixels is False else {"max_pixels": max_pixels}
    try:
        image = open_image(path, draft_min_side=FACTS_DRAFT_SIDE, on_header=reader.header, **kw)
    except InputError:
        return None
    return reader.done(image)
