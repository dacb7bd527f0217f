"""The index keeps each photo's facts (capture time, place, camera, oriented size, perceptual
hash), read while the file is decoded for its vector; copies take them with the vector; an index
made before facts were kept gains them on the next update without the image tower."""
from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from altclip_cli.inputs.images import open_image
from altclip_cli.inputs.perceptual import perceptual_hash
from altclip_cli.search.database import FACT_COLUMN_TYPES
from altclip_cli.search.facts import local_seconds
from altclip_cli.search.store import INDEX_DB, IndexStore
from altclip_cli.search.update import update_index
from test_index import folder_of, index, loads, summary_line, tower  # noqa: F401 - fixtures
from test_photometa import CASES, exiftool

BIG = (960, 640)  # above the model's draft size: a draft decode must not change the stored size


def photo(path, case: str | None, seed: int, size=BIG):
    """A JPEG of smooth random shapes (a perceptual hash with something to say) carrying the
    tags of test_photometa.CASES[case] (none when case is None)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, size[0]), rng.integers(0, size[1])
        draw.ellipse([x0, y0, x0 + rng.integers(50, 400), y0 + rng.integers(50, 400)],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    tags = Image.Exif()
    if case is not None:
        ifd0, exif, gps, _want = CASES[case]
        for tag, value in ifd0.items():
            tags[tag] = value
        tags.get_ifd(0x8769).update(exif)
        tags.get_ifd(0x8825).update(gps)
    image.save(path, quality=90, exif=tags)
    return path


def stored(model) -> dict[str, dict]:
    """{stored path: {column: value}} of the fact columns, straight from the database."""
    db = sqlite3.connect(folder_of(model) / INDEX_DB)
    try:
        names = [c for c, _ in FACT_COLUMN_TYPES]
        return {row[0]: dict(zip(names, row[1:]))
                for row in db.execute(f"SELECT path, {', '.join(names)} FROM files")}
    finally:
        db.close()


@pytest.fixture
def tagged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    root.mkdir()
    for k, case in enumerate(CASES):
        photo(root / f"{case}.jpg", case, k)
    photo(root / "plain.jpg", None, 99)
    return root


def test_indexing_stores_what_exiftool_reads(tagged, model):
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    facts = stored(model)
    for case in CASES:
        path = tagged / f"{case}.jpg"
        row, ref = facts[str(path)], exiftool(path)
        assert row["facts"] == 1
        assert row["lat"] == pytest.approx(ref["GPSLatitude"], abs=1e-6)
        assert row["lon"] == pytest.approx(ref["GPSLongitude"], abs=1e-6)
        assert ref["DateTimeOriginal"].replace(":", "-", 2).replace(" ", "T") == row["taken"][:19]
        if "OffsetTimeOriginal" in ref:
            assert row["taken"].endswith(ref["OffsetTimeOriginal"])
        assert row["taken_source"] == "exif-original"
        assert row["taken_local"] == local_seconds(row["taken"][:19])
        turned = ref.get("Orientation", 1) >= 5
        assert (row["width"], row["height"]) == ((ref["ImageHeight"], ref["ImageWidth"]) if turned
                                                 else (ref["ImageWidth"], ref["ImageHeight"]))
        assert row["camera"].split()[0].casefold() == ref["Make"].split()[0].casefold()
        assert row["camera"].casefold().endswith(ref["Model"].split()[-1].casefold())


def test_the_stored_hash_is_the_hash_of_the_decoded_photo(tagged, model):
    assert index(model, "photos").exit_code == 0
    facts = stored(model)
    for name in ("plain.jpg", "naive-nikon-sydney-turned-6.jpg"):
        want = perceptual_hash(open_image(tagged / name))  # full size, turned upright
        got = facts[str(tagged / name)]["phash"] % (1 << 64)
        assert bin(got ^ want.value).count("1") <= 4  # a draft decode moves a few bits at most
        assert facts[str(tagged / name)]["phash_low"] == 0


def test_a_photo_without_a_date_is_dated_by_its_file_and_a_copy_by_its_own(tagged, model):
    plain = tagged / "plain.jpg"
    os.utime(plain, ns=(1_600_000_000_000_000_000,) * 2)
    assert index(model, "photos").exit_code == 0
    copy = tagged / "copy.jpg"
    shutil.copyfile(plain, copy)  # same bytes, another mtime: takes the vector without the model
    os.utime(copy, ns=(1_700_000_000_000_000_000,) * 2)
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    facts = stored(model)
    a, b = facts[str(plain)], facts[str(copy)]
    assert a["taken_source"] == b["taken_source"] == "file-mtime"
    assert b["taken_local"] - a["taken_local"] == pytest.approx(100_000_000, abs=2 * 3600)  # a DST change at most
    assert (a["phash"], a["width"], a["camera"]) == (b["phash"], b["width"], b["camera"])


def test_a_copy_of_a_tagged_photo_takes_its_facts_without_the_model(tagged, model, tower):
    assert index(model, "photos").exit_code == 0
    seen = len(tower)
    shutil.copy2(tagged / "offset-canon-paris.jpg", tagged / "again.jpg")
    assert index(model, "photos").exit_code == 0
    assert len(tower) == seen
    facts = stored(model)
    assert facts[str(tagged / "again.jpg")] == facts[str(tagged / "offset-canon-paris.jpg")]


def test_a_changed_photo_gets_its_new_facts(tagged, model):
    assert index(model, "photos").exit_code == 0
    path = tagged / "plain.jpg"
    photo(path, "offset-canon-paris", 5)
    assert index(model, "photos").exit_code == 0
    assert stored(model)[str(path)]["camera"] == "Canon EOS R5"


def test_an_index_made_before_facts_gains_them_without_the_model(tagged, model, tower, loads):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    db = sqlite3.connect(folder / INDEX_DB)  # as an index written by schema 2 was
    with db:
        for name, _kind in FACT_COLUMN_TYPES:
            db.execute(f"ALTER TABLE files DROP COLUMN {name}")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()
    before, loaded = len(tower), len(loads)
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith(
        f"indexed photos: no changes; dates, places and cameras read from {len(CASES) + 1} photos (")
    assert (len(tower), len(loads)) == (before, loaded)  # no image tower, no model loaded
    facts = stored(model)
    assert all(row["facts"] == 1 for row in facts.values())
    assert facts[str(tagged / "offset-canon-paris.jpg")]["camera"] == "Canon EOS R5"
    with IndexStore.open(folder) as store:
        assert store.meta["schema_version"] == "3"
    again = index(model, "photos")  # read once: the next run reads nothing
    assert summary_line(again).startswith("indexed photos: no changes (")


def test_a_file_that_cannot_be_decoded_any_more_is_marked_read_without_facts(tagged, model):
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    db = sqlite3.connect(folder / INDEX_DB)
    with db:
        db.execute("UPDATE files SET facts = NULL")
    db.close()
    path = tagged / "plain.jpg"
    st = path.stat()
    path.write_bytes(b"\xff\xd8" + b"\0" * (st.st_size - 2))  # same size and time, bytes broken
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with IndexStore.open(folder, write=True) as store:
        update_index(lambda: pytest.fail("the model is not needed"), store, [tagged])
    facts = stored(model)
    assert facts[str(path)]["facts"] == 1 and facts[str(path)]["phash"] is None
    assert facts[str(tagged / "offset-canon-paris.jpg")]["camera"] == "Canon EOS R5"


def test_snapshot_facts_and_table(tagged, model):
    assert index(model, "photos").exit_code == 0
    with IndexStore.open(folder_of(model)) as store, store.snapshot() as snap:
        paths = snap.paths_of(snap.file_ids)
        facts = dict(zip(paths, snap.facts_of(snap.file_ids)))
        table = snap.table()
    paris = facts[str(tagged / "offset-canon-paris.jpg")]
    assert paris.record() == {"taken": "2023-07-14T10:20:30+02:00", "gps": [pytest.approx(48.85670, abs=1e-4),
                                                                            pytest.approx(2.35222, abs=1e-4)],
                              "camera": "Canon EOS R5"}
    assert "gps" not in facts[str(tagged / "plain.jpg")].record()
    k = paths.index(str(tagged / "naive-nikon-sydney-turned-6.jpg"))
    assert (table["width"][k], table["height"][k]) == (BIG[1], BIG[0])
    assert table["has_phash"].all() and table["size"][k] == (tagged / "naive-nikon-sydney-turned-6.jpg").stat().st_size
    assert table["content_key"][k].startswith("sha256:")


def test_metadata_that_breaks_the_reader_never_fails_the_photo(tagged, model, monkeypatch):
    import altclip_cli.inputs.photometa as photometa

    def broken(image, **kwargs):
        raise RuntimeError("an EXIF block no reader expected")

    monkeypatch.setattr(photometa, "read_meta", broken)
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    facts = stored(model)
    assert len(facts) == len(CASES) + 1
    for row in facts.values():
        assert row["facts"] == 1 and row["camera"] is None and row["phash"] is not None
