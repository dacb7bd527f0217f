"""Photo metadata read from EXIF: capture time (with and without its UTC offset, and the fallbacks
to the digitised time and the file's time), GPS in every hemisphere, make and model, size after
orientation; each compared with exiftool, an independent reader; malformed values read as None
and never raise; no pixel is decoded."""
from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageOps
from PIL.TiffImagePlugin import IFDRational as R

from test_tag import _need  # exiftool: skipped where missing, a failure in CI

from altclip_cli.inputs.photometa import PhotoMeta, read_meta

SIZE = (40, 24)  # not square, so that a quarter turn shows


def dms(degrees: float, minutes: float, seconds: float) -> tuple:
    """EXIF's three rationals, seconds to the hundredth."""
    return (R(int(degrees), 1), R(int(minutes), 1), R(round(seconds * 100), 100))


def write_photo(path, *, ifd0: dict | None = None, exif: dict | None = None, gps: dict | None = None, size=SIZE):
    """A photo with the given tags in IFD0, the Exif IFD and the GPS IFD (saved by Pillow)."""
    tags = Image.Exif()
    for tag, value in (ifd0 or {}).items():
        tags[tag] = value
    for ifd, values in ((0x8769, exif), (0x8825, gps)):
        if values:
            tags.get_ifd(ifd).update(values)
    Image.new("RGB", size, (200, 120, 40)).save(path, exif=tags)
    return path


def meta_of(path, **kwargs) -> PhotoMeta:
    with Image.open(path) as image:
        return read_meta(image, **kwargs)


def exiftool(path) -> dict:
    out = subprocess.run([_need("exiftool"), "-j", "-n", str(path)], capture_output=True, check=True, text=True)
    return json.loads(out.stdout)[0]


# Photos as cameras write them: (name, IFD0, Exif IFD, GPS IFD) and what read_meta must find,
# computed by hand.
PARIS = {1: "N", 2: dms(48, 51, 24.12), 3: "E", 4: dms(2, 21, 7.99)}
SYDNEY = {1: "S", 2: dms(33, 52, 7.2), 3: "E", 4: dms(151, 12, 36)}
SANTIAGO = {1: "S", 2: dms(33, 26, 56.4), 3: "W", 4: dms(70, 39, 0)}
NEW_YORK = {1: "N", 2: dms(40, 42, 46), 3: "W", 4: dms(74, 0, 22)}
CASES = {
    "offset-canon-paris": (
        {0x010F: "Canon", 0x0110: "Canon EOS R5", 0x0112: 1},
        {0x9003: "2023:07:14 10:20:30", 0x9011: "+02:00"}, PARIS,
        dict(taken="2023-07-14T10:20:30+02:00", taken_source="exif-original",
             gps=(48 + 51 / 60 + 24.12 / 3600, 2 + 21 / 60 + 7.99 / 3600), make="Canon", model="EOS R5",
             width=40, height=24, orientation=1)),
    "naive-nikon-sydney-turned-6": (
        {0x010F: "NIKON CORPORATION", 0x0110: "NIKON D750", 0x0112: 6},
        {0x9003: "2021:12:31 23:59:59"}, SYDNEY,
        dict(taken="2021-12-31T23:59:59", taken_source="exif-original",
             gps=(-(33 + 52 / 60 + 7.2 / 3600), 151 + 12 / 60 + 36 / 3600), make="NIKON CORPORATION",
             model="D750", width=24, height=40, orientation=6)),
    "negative-offset-apple-santiago-turned-8": (
        {0x010F: "Apple", 0x0110: "iPhone 12", 0x0112: 8},
        {0x9003: "2019:03:01 07:00:00", 0x9011: "-03:00"}, SANTIAGO,
        dict(taken="2019-03-01T07:00:00-03:00", taken_source="exif-original",
             gps=(-(33 + 26 / 60 + 56.4 / 3600), -(70 + 39 / 60)), make="Apple", model="iPhone 12",
             width=24, height=40, orientation=8)),
    "padded-sony-new-york": (
        {0x010F: "SONY  ", 0x0110: " ILCE-7M3\0\0"},
        {0x9003: "2020:02:29 12:00:00", 0x9011: "+00:00"}, NEW_YORK,
        dict(taken="2020-02-29T12:00:00+00:00", taken_source="exif-original",
             gps=(40 + 42 / 60 + 46 / 3600, -(74 + 22 / 3600)), make="SONY", model="ILCE-7M3",
             width=40, height=24, orientation=None)),
}


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize("case", CASES)
def test_read_meta_finds_what_was_written(tmp_path, case, suffix):
    ifd0, exif, gps, want = CASES[case]
    meta = meta_of(write_photo(tmp_path / f"p{suffix}", ifd0=ifd0, exif=exif, gps=gps))
    want = dict(want)
    got = {k: getattr(meta, k) for k in want}
    assert got.pop("gps") == pytest.approx(want.pop("gps"), abs=1e-9)
    assert got == want


@pytest.mark.parametrize("case", CASES)
def test_exiftool_reads_the_same(tmp_path, case):
    ifd0, exif, gps, _ = CASES[case]
    path = write_photo(tmp_path / "p.jpg", ifd0=ifd0, exif=exif, gps=gps)
    meta, ref = meta_of(path), exiftool(path)
    date = ref["DateTimeOriginal"]  # "YYYY:MM:DD HH:MM:SS", the offset apart
    assert meta.taken == f"{date[:4]}-{date[5:7]}-{date[8:10]}T{date[11:]}" + ref.get("OffsetTimeOriginal", "")
    assert meta.gps == pytest.approx((ref["GPSLatitude"], ref["GPSLongitude"]), abs=1e-9)
    make, model = str(ref["Make"]).strip(), str(ref["Model"]).strip()
    assert meta.make == make
    assert meta.camera == f"{make} {meta.model}" and model.endswith(meta.model)
    dropped = model[:len(model) - len(meta.model)].lower().split()  # only words of the make, from its start
    assert dropped == make.lower().split()[:len(dropped)]
    assert meta.orientation == ref.get("Orientation")
    turned = ref.get("Orientation", 1) >= 5
    size = (ref["ImageWidth"], ref["ImageHeight"])
    assert (meta.width, meta.height) == (size[::-1] if turned else size)
    with Image.open(path) as image:  # Pillow's own transposition agrees
        assert (meta.width, meta.height) == ImageOps.exif_transpose(image).size


@pytest.mark.parametrize("lat,lon,want", [
    ((R(48, 1), R(5124, 100)), (R(2, 1), R(21, 1)), (48 + 51.24 / 60, 2 + 21 / 60)),  # degrees, decimal minutes
    ((R(488540, 10000),), (R(23522, 10000),), (48.854, 2.3522)),  # decimal degrees
])
def test_gps_in_fewer_parts(tmp_path, lat, lon, want):
    path = write_photo(tmp_path / "p.jpg", gps={1: "N", 2: lat, 3: "E", 4: lon})
    ref = exiftool(path)
    assert meta_of(path).gps == pytest.approx(want, abs=1e-9)
    assert meta_of(path).gps == pytest.approx((ref["GPSLatitude"], ref["GPSLongitude"]), abs=1e-9)


def test_the_size_of_an_image_already_turned_is_its_size(tmp_path):
    path = write_photo(tmp_path / "p.jpg", ifd0={0x0112: 6})
    with Image.open(path) as image:
        turned = ImageOps.exif_transpose(image)
    meta = read_meta(turned)
    assert (meta.width, meta.height, meta.orientation) == (24, 40, None)


def test_a_tiff_is_measured_by_its_own_tags(tmp_path):
    path = tmp_path / "p.tiff"
    tags = Image.Exif()
    tags[0x0112] = 6
    Image.new("RGB", SIZE).save(path, exif=tags)
    ref = exiftool(path)
    assert (ref["ImageWidth"], ref["ImageHeight"], ref["Orientation"]) == (40, 24, 6)
    assert (meta_of(path).width, meta_of(path).height) == (24, 40)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_no_pixel_is_decoded(tmp_path, suffix):
    ifd0, exif, gps, want = CASES["offset-canon-paris"]
    path = write_photo(tmp_path / f"p{suffix}", ifd0=ifd0, exif=exif, gps=gps)
    with Image.open(path) as image:
        def refuse():
            raise AssertionError("pixels decoded")
        image.load = refuse
        assert read_meta(image).taken == want["taken"]


def test_a_png_without_exif_before_its_pixels_is_not_decoded_to_look(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", SIZE).save(path)
    with Image.open(path) as image:
        loads = []
        image.load = lambda: loads.append(1)
        assert read_meta(image) == PhotoMeta(width=40, height=24)
        assert loads == []


# --- which time -----------------------------------------------------------------------------------

@pytest.fixture
def plus_one_hour(monkeypatch):
    """Local time one hour east of UTC, all year (a POSIX TZ string: no tz database needed)."""
    monkeypatch.setenv("TZ", "XXX-1")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


MTIME_NS = calendar.timegm((2023, 7, 14, 10, 20, 30)) * 10**9 + 999_999_999  # 10:20:30.999... UTC


@pytest.mark.parametrize("exif,want", [
    ({0x9003: "2023:07:14 10:20:30", 0x9004: "2023:07:15 08:00:00", 0x9012: "+01:00"},
     ("2023-07-14T10:20:30", "exif-original")),
    ({0x9004: "2023:07:15 08:00:00", 0x9012: "+01:00", 0x9011: "+05:00"},
     ("2023-07-15T08:00:00+01:00", "exif-digitized")),
    ({0x9003: "0000:00:00 00:00:00", 0x9004: "2023:07:15 08:00:00"}, ("2023-07-15T08:00:00", "exif-digitized")),
    ({0x9003: "    :  :     :  :  ", 0x9011: "+02:00"}, ("2023-07-14T11:20:30+01:00", "file-mtime")),
    ({}, ("2023-07-14T11:20:30+01:00", "file-mtime")),
])
def test_the_capture_time_falls_back_in_order_and_says_which(tmp_path, plus_one_hour, exif, want):
    path = write_photo(tmp_path / "p.jpg", exif=exif)
    meta = meta_of(path, file_mtime_ns=MTIME_NS)
    assert (meta.taken, meta.taken_source) == want
    if want[1].startswith("exif"):
        ref = exiftool(path)
        key = {"exif-original": "DateTimeOriginal", "exif-digitized": "CreateDate"}[want[1]]
        assert ref[key].replace(":", "-", 2).replace(" ", "T") == want[0][:19]


def test_no_date_and_no_file_time_is_no_date(tmp_path):
    meta = meta_of(write_photo(tmp_path / "p.jpg"))
    assert (meta.taken, meta.taken_source) == (None, None)


# --- malformed ------------------------------------------------------------------------------------

NOT_ASCII = b"Can\xffon"


@pytest.mark.parametrize("ifd0,exif,gps,field,want", [
    ({}, {0x9003: "2023:02:30 10:00:00"}, {}, "taken", None),
    ({}, {0x9003: "2023:07:14 24:00:00"}, {}, "taken", None),
    ({}, {0x9003: "last summer"}, {}, "taken", None),
    ({}, {0x9003: "2023:07:14 10:20:30", 0x9011: "+25:00"}, {}, "taken", "2023-07-14T10:20:30"),
    ({}, {0x9003: "2023:07:14 10:20:30", 0x9011: "  :  "}, {}, "taken", "2023-07-14T10:20:30"),
    ({}, {}, {**PARIS, 2: (R(48, 0), R(51, 1), R(24, 1))}, "gps", None),  # zero denominator
    ({}, {}, {**PARIS, 4: (R(2, 1), R(0, 0), R(0, 1))}, "gps", None),
    ({}, {}, {k: v for k, v in PARIS.items() if k != 1}, "gps", None),  # no hemisphere
    ({}, {}, {**PARIS, 3: "Q"}, "gps", None),
    ({}, {}, {**PARIS, 2: dms(95, 0, 0)}, "gps", None),
    ({}, {}, {**PARIS, 4: dms(2, 75, 0)}, "gps", None),
    ({}, {}, {k: v for k, v in PARIS.items() if k != 4}, "gps", None),
    ({0x010F: NOT_ASCII, 0x0110: "Canon EOS R5"}, {}, {}, "make", None),
    ({0x010F: NOT_ASCII, 0x0110: "Canon EOS R5"}, {}, {}, "camera", "Canon EOS R5"),
    ({0x010F: "Canon", 0x0110: b"EOS \xe9"}, {}, {}, "camera", "Canon"),
    ({0x010F: "   ", 0x0110: "\0"}, {}, {}, "camera", None),
    ({0x0112: 9}, {}, {}, "orientation", None),
    ({0x0112: 9}, {}, {}, "width", 40),
    ({0x0112: 0}, {}, {}, "orientation", None),
])
def test_a_malformed_value_is_none_and_the_rest_is_read(tmp_path, ifd0, exif, gps, field, want):
    good = {0x010F: "Canon", 0x0110: "Canon EOS R5"}
    meta = meta_of(write_photo(tmp_path / "p.jpg", ifd0={**good, **ifd0}, exif=exif, gps=gps))
    assert getattr(meta, field) == want
    if field not in ("make", "camera"):
        assert meta.camera == "Canon EOS R5"  # one bad field spoils no other


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("blob", [b"Exif\x00\x00garbage", b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0",
                                  b"Exif\x00\x00II\x2a\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 6,
                                  # a GPS IFD that points at IFD0 again
                                  b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x88\x25\x00\x04\x00\x00\x00\x01"
                                  b"\x00\x00\x00\x08"])
def test_a_damaged_exif_block_is_no_metadata_not_an_error(tmp_path, blob):
    path = tmp_path / "p.jpg"
    Image.new("RGB", SIZE).save(path, exif=blob)
    meta = meta_of(path, file_mtime_ns=0)
    assert (meta.make, meta.gps, meta.orientation, meta.taken_source) == (None, None, None, "file-mtime")
    assert (meta.width, meta.height) == SIZE


@pytest.mark.parametrize("where", ["getexif", "get_ifd"])
def test_pillow_raising_on_exif_is_no_metadata_not_an_error(tmp_path, where):
    ifd0, exif, gps, _ = CASES["offset-canon-paris"]
    with Image.open(write_photo(tmp_path / "p.jpg", ifd0=ifd0, exif=exif, gps=gps)) as image:
        def damaged(*args):
            raise SyntaxError("not a TIFF file")
        if where == "getexif":
            image.getexif = damaged
        else:
            image.getexif().get_ifd = damaged
        meta = read_meta(image)
    assert (meta.taken, meta.gps, meta.width, meta.height) == (None, None, 40, 24)
    assert meta.camera == (None if where == "getexif" else "Canon EOS R5")


@pytest.mark.parametrize("make,model,want_model", [
    ("Canon", "Canon EOS R5", "EOS R5"),
    ("CANON", "Canon EOS 5D", "EOS 5D"),
    ("NIKON CORPORATION", "NIKON D750", "D750"),
    ("Apple", "iPhone 12", "iPhone 12"),
    ("Canon", "Canon", "Canon"),
    ("Leica", "Leicaflex SL", "Leicaflex SL"),
    (None, "Canon EOS R5", "Canon EOS R5"),
])
def test_the_model_drops_the_make_repeated_in_front(tmp_path, make, model, want_model):
    ifd0 = {0x0110: model} | ({0x010F: make} if make else {})
    meta = meta_of(write_photo(tmp_path / "p.jpg", ifd0=ifd0))
    assert meta.model == want_model
    assert meta.camera == " ".join(p for p in (make, want_model) if p)


def test_importing_the_module_does_not_import_pil():
    code = ("import sys, altclip_cli.inputs.photometa, altclip_cli.search.filters; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('PIL', 'numpy', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ}).stdout
    assert out.strip() == "[]"
