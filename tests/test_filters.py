"""The metadata filters' pieces against hand-computed values and brute-force references: date
bounds (against prefixes of the ISO text), places and distances (against known distances and an
independent formula), camera text (against a plain substring test); bad input named in a ValueError."""
from __future__ import annotations

import math
import random
from datetime import datetime, timedelta

import pytest

from altclip_cli.search.filters import (EARTH_RADIUS_M, camera_matches, haversine_m, local_time, parse_date_bound,
                                        parse_distance, parse_near)


# --- dates ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,end,want", [
    ("2023", False, datetime(2023, 1, 1)),
    ("2023", True, datetime(2024, 1, 1)),
    ("2023-07", False, datetime(2023, 7, 1)),
    ("2023-07", True, datetime(2023, 8, 1)),
    ("2023-12", True, datetime(2024, 1, 1)),
    ("2023-07-14", False, datetime(2023, 7, 14)),
    ("2023-07-14", True, datetime(2023, 7, 15)),
    ("2023-02-28", True, datetime(2023, 3, 1)),
    ("2024-02-29", True, datetime(2024, 3, 1)),
    ("2023-12-31", True, datetime(2024, 1, 1)),
    (" 2023-07 ", True, datetime(2023, 8, 1)),
])
def test_date_bounds(text, end, want):
    assert parse_date_bound(text, end=end) == want


def test_date_bounds_keep_what_a_prefix_of_the_date_keeps():
    """Brute force: a photo is within --after A --before B exactly when its date text, cut to the
    length of each bound, is at or after A and at or before B."""
    rng = random.Random(17)
    start = datetime(2022, 11, 1)
    taken = [start + timedelta(seconds=rng.randrange(0, 500 * 86400)) for _ in range(2000)]
    taken += [datetime(2023, 7, 1), datetime(2023, 7, 31, 23, 59, 59), datetime(2023, 8, 1), datetime(2024, 2, 29, 12)]
    offsets = ["", "+02:00", "-11:00", "+14:00"]
    records = [t.isoformat() + rng.choice(offsets) for t in taken]
    bounds = ["2022", "2023", "2024", "2023-07", "2023-12", "2024-02", "2023-07-14", "2023-07-31", "2024-02-29",
              "2023-01-01", "2024-03-01"]
    for after in bounds:
        for before in bounds:
            low, high = parse_date_bound(after, end=False), parse_date_bound(before, end=True)
            got = [r for r in records if low <= local_time(r) < high]
            want = [r for r in records if after <= r[:len(after)] and r[:len(before)] <= before]
            assert got == want, (after, before)


def test_local_time_is_the_wall_clock_where_the_photo_was_taken():
    assert local_time("2023-07-14T23:30:00-05:00") == datetime(2023, 7, 14, 23, 30)
    assert local_time("2023-07-14T23:30:00") == datetime(2023, 7, 14, 23, 30)


@pytest.mark.parametrize("text", ["", "23", "2023-7", "2023/07", "2023-00", "2023-13", "2023-02-30",
                                  "2023-07-14T10:00", "July 2023", "2023-07-", "0000"])
def test_a_bad_date_is_named_with_the_forms_expected(text):
    with pytest.raises(ValueError) as err:
        parse_date_bound(text, end=False)
    assert repr(text) in str(err.value) and "YYYY-MM-DD" in str(err.value)


def test_the_last_year_has_no_end():
    assert parse_date_bound("9999-12-31", end=False) == datetime(9999, 12, 31)
    with pytest.raises(ValueError, match="'9999-12'"):
        parse_date_bound("9999-12", end=True)


# --- places and distances ------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("48.85,2.35", (48.85, 2.35)),
    (" -33.87 , -151.2 ", (-33.87, -151.2)),
    ("+10,-0.5", (10.0, -0.5)),
    (".5,1.", (0.5, 1.0)),
    ("90,180", (90.0, 180.0)),
    ("-90,-180", (-90.0, -180.0)),
])
def test_near(text, want):
    assert parse_near(text) == want


@pytest.mark.parametrize("text,words", [
    ("48.85", "LAT,LON"), ("a,b", "LAT,LON"), ("48.85;2.35", "LAT,LON"), ("48.85,2.35,1", "LAT,LON"),
    ("nan,0", "LAT,LON"), ("inf,0", "LAT,LON"), ("", "LAT,LON"), ("48°51'N,2°21'E", "LAT,LON"),
    ("91,0", "latitude 91 is outside -90..90"), ("-90.5,0", "latitude"), ("0,181", "longitude 181 is outside"),
    ("2.35,200", "longitude"),
])
def test_a_bad_place_is_named(text, words):
    with pytest.raises(ValueError) as err:
        parse_near(text)
    assert repr(text) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("text,metres", [
    ("5km", 5000), ("500m", 500), ("2.5 km", 2500), ("1.5KM", 1500), ("0.5 m", 0.5), (" 12 Km ", 12000), (".5km", 500),
])
def test_distance(text, metres):
    assert parse_distance(text) == metres


@pytest.mark.parametrize("text", ["5", "km", "5 miles", "-5km", "0m", "5 k m", "5kmm", "", "1e3m", "five km"])
def test_a_bad_distance_is_named(text):
    with pytest.raises(ValueError) as err:
        parse_distance(text)
    assert repr(text) in str(err.value)
    assert "km" in str(err.value) or "above zero" in str(err.value)


PARIS, LONDON = (48.8566, 2.3522), (51.5074, -0.1278)


def test_known_distances():
    assert abs(haversine_m(PARIS, LONDON) - 343_500) < 1000  # Paris-London, 343.5 km
    assert haversine_m(PARIS, PARIS) == 0
    quarter = math.pi / 2 * EARTH_RADIUS_M  # equator to pole, 10,007.5 km on a 6,371 km sphere
    assert haversine_m((0, 0), (90, 0)) == pytest.approx(quarter, rel=1e-12)
    assert haversine_m((0, 0), (0, 180)) == pytest.approx(2 * quarter, rel=1e-12)
    assert haversine_m((0, 179.5), (0, -179.5)) == pytest.approx(quarter / 90, rel=1e-9)  # across the date line
    assert haversine_m((-33.87, 151.2), (33.87, -28.8)) == pytest.approx(2 * quarter, rel=1e-9)  # antipodes


def _chord_distance(a, b) -> float:
    """An independent formula: the angle between the two points' unit vectors, from their chord."""
    def unit(p):
        lat, lon = map(math.radians, p)
        return (math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat))
    chord = math.dist(unit(a), unit(b))
    return 2 * math.asin(min(1.0, chord / 2)) * 6_371_000


def test_haversine_agrees_with_the_chord_formula():
    rng = random.Random(5)
    for _ in range(2000):
        a = (rng.uniform(-90, 90), rng.uniform(-180, 180))
        b = (a[0] + rng.uniform(-0.1, 0.1), a[1] + rng.uniform(-0.1, 0.1)) if rng.random() < 0.5 else (
            rng.uniform(-90, 90), rng.uniform(-180, 180))
        assert haversine_m(a, b) == pytest.approx(_chord_distance(a, b), rel=1e-6, abs=1e-3)
        assert haversine_m(a, b) == haversine_m(b, a)


# --- cameras --------------------------------------------------------------------------------------

CAMERAS = [("Canon", "EOS R5"), ("NIKON CORPORATION", "D750"), ("Apple", "iPhone 12"), ("SONY", "ILCE-7M3"),
           (None, "EOS R5"), ("Canon", None), (None, None), ("FUJIFILM", "X-T3")]


@pytest.mark.parametrize("text", ["canon", "EOS", "eos r5", "Canon EOS R5", "non eo", "nikon", "corporation d7",
                                  "IPHONE", "x-t3", "7m3", "r6", "canon eos r6", "fuji film", "n"])
def test_camera_is_a_case_blind_substring_of_make_and_model(text):
    for make, model in CAMERAS:
        want = make is not None or model is not None
        want = want and text.lower() in " ".join(p for p in (make, model) if p).lower()
        assert camera_matches(text, make, model) is want, (text, make, model)


def test_camera_text_ignores_runs_of_spaces():
    assert camera_matches("  canon   eos ", "Canon", "EOS  R5")
    assert not camera_matches("canoneos", "Canon", "EOS R5")


@pytest.mark.parametrize("text", ["", "   "])
def test_blank_camera_text_is_named(text):
    with pytest.raises(ValueError) as err:
        camera_matches(text, "Canon", "EOS R5")
    assert repr(text) in str(err.value)


# --- on photos ------------------------------------------------------------------------------------

def test_the_pieces_filter_photos_read_from_their_exif(tmp_path):
    """Photos written with EXIF, read by read_meta, kept by the filters as a search would keep them."""
    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational as R

    from altclip_cli.inputs.photometa import read_meta

    def dms(x):
        x = abs(x)
        return (R(int(x), 1), R(int(x * 60 % 60), 1), R(round(x * 3600 % 60 * 100), 100))

    photos = {"paris.jpg": (PARIS, "2023:07:14 10:00:00", "Canon", "Canon EOS R5"),
              "versailles.jpg": ((48.8049, 2.1204), "2023:08:01 00:00:00", "Apple", "iPhone 12"),
              "london.jpg": (LONDON, "2023:06:30 23:59:59", "Canon", "Canon EOS 5D")}
    metas = {}
    for name, ((lat, lon), date, make, model) in photos.items():
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = make, model
        exif.get_ifd(0x8769)[0x9003] = date
        exif.get_ifd(0x8825).update({1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W",
                                     4: dms(lon)})
        Image.new("RGB", (8, 8)).save(tmp_path / name, exif=exif)
        with Image.open(tmp_path / name) as image:
            metas[name] = read_meta(image)

    def kept(near=None, within=None, after=None, before=None, camera=None):
        out = []
        for name, m in metas.items():
            if near and haversine_m(parse_near(near), m.gps) > parse_distance(within):
                continue
            if after and local_time(m.taken) < parse_date_bound(after, end=False):
                continue
            if before and local_time(m.taken) >= parse_date_bound(before, end=True):
                continue
            if camera and not camera_matches(camera, m.make, m.model):
                continue
            out.append(name)
        return sorted(out)

    assert kept(near="48.8566,2.3522", within="5km") == ["paris.jpg"]
    assert kept(near="48.8566,2.3522", within="20 km") == ["paris.jpg", "versailles.jpg"]
    assert kept(near="51.5,-0.13", within="1km") == ["london.jpg"]
    assert kept(after="2023-07", before="2023-07") == ["paris.jpg"]
    assert kept(after="2023-07") == ["paris.jpg", "versailles.jpg"]
    assert kept(before="2023-06") == ["london.jpg"]  # June 30th is in June
    assert kept(before="2023-06-29") == []
    assert kept(before="2023-06-30") == ["london.jpg"]
    assert kept(camera="canon eos") == ["london.jpg", "paris.jpg"]
    assert kept(camera="EOS R5", near="48.85,2.35", within="10km") == ["paris.jpg"]
