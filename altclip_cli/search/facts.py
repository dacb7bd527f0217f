"""Stand-in for the photo facts of index schema 3 (replaced by the index's own module)."""
from __future__ import annotations

from dataclasses import dataclass

FACT_COLUMNS = ("taken", "taken_local", "taken_source", "lat", "lon", "camera", "width", "height", "phash",
                "phash_low")


@dataclass(frozen=True)
class PhotoFacts:
    taken: str | None = None
    taken_local: int | None = None
    taken_source: str | None = None
    lat: float | None = None
    lon: float | None = None
    camera: str | None = None
    width: int | None = None
    height: int | None = None
    phash: int | None = None
    phash_low: bool = False

    @property
    def gps(self):
        return (self.lat, self.lon) if self.lat is not None and self.lon is not None else None

    def record(self) -> dict:
        out = {}
        if self.taken is not None:
            out["taken"] = self.taken
        if self.gps is not None:
            out["gps"] = [self.lat, self.lon]
        if self.camera:
            out["camera"] = self.camera
        return out
