"""Search's metadata filters (--after, --before, --near/--within, --camera, --sort date) against a
brute-force Python reference over the same photos: in the index's SQL (a snapshot), on one photo's
facts (SearchFilter.accepts), in the ranking (-k and --min-score first, then the date order),
through `altclip search`, `altclip classify --index` and POST /v1/search; bad values named."""
from __future__ import annotations

import math
import os
import random
import sqlite3
from datetime import datetime, timedelta

import numpy as np
import pytest

from altclip_cli.search.facts import local_seconds
from altclip_cli.search.filters import FilterError, SearchFilter, parse_filter
from altclip_cli.search.store import IndexStore

DIM = 16
IDENTITY = {"model": "test", "weights": "test-weights", "dim": DIM}
CAMERAS = ["Canon EOS R5", "Canon EOS 5D Mark IV", "NIKON CORPORATION NIKON D750", "Apple iPhone 12",
           "Apple iPhone 12 Pro", "SONY ILCE-7M3", "FUJIFILM X-T3"]
PLACES = [(48.8566, 2.3522), (43.2965, 5.3698), (-33.8688, 151.2093), (64.1466, -21.9426), (0.0, 179.99),
          (0.0, -179.99), (89.99, 10.0), (-89.995, -120.0)]


# --- photos and their facts ------------------------------------------------------------------------

def random_photos(n: int, seed: int = 17) -> list[dict]:
    """Photos as the reference sees them: {"key", "read", "taken" (ISO text), "local" (naive
    datetime), "gps", "camera"}; about a tenth without a date, a third without a place, a fifth
    without a camera, a twentieth never read (an index made before facts)."""
    rng = random.Random(seed)
    photos = []
    for i in range(n):
        read = rng.random() > 0.05
        local = datetime(2021, 11, 1) + timedelta(seconds=rng.randrange(0, 900 * 86400))
        if rng.random() < 0.03:  # on the edges of the periods the tests name
            local = rng.choice([datetime(2023, 7, 1), datetime(2023, 7, 31, 23, 59, 59), datetime(2023, 8, 1),
                                datetime(2023, 6, 30, 23, 59, 59), datetime(2024, 2, 29, 12)])
        has_date = read and rng.random() > 0.1
        offset = rng.choice(["", "+02:00", "-11:00", "+14:00", "Z"])
        place = None
        if read and rng.random() > 0.33:
            lat0, lon0 = rng.choice(PLACES)
            lat = max(-90.0, min(90.0, lat0 + rng.gauss(0, 0.05)))
            lon = lon0 + rng.gauss(0, 0.05)
            lon = (lon + 180) % 360 - 180
            place = (lat, lon)
        camera = rng.choice(CAMERAS) if read and rng.random() > 0.2 else None
        photos.append({"key": f"/photos/{i // 100:03d}/p{i:05d}.jpg", "read": read,
                       "taken": local.isoformat() + offset if has_date else None,
                       "local": local if has_date else None, "gps": place, "camera": camera})
    return photos


def facts_of(photo: dict):
    """The index's PhotoFacts of a reference photo (None: never read)."""
    from altclip_cli.search.facts import PhotoFacts

    if not photo["read"]:
        return None
    lat, lon = photo["gps"] or (None, None)
    taken_local = local_seconds(photo["local"].isoformat()) if photo["local"] is not None else None
    return PhotoFacts(taken=photo["taken"], taken_local=taken_local,
                      taken_source="exif-original" if taken_local is not None else None, lat=lat, lon=lon,
                      camera=photo["camera"], width=100, height=80, phash=None, phash_low=False)


def put_facts(folder, facts_by_key: dict) -> None:
    """Give files of an index these facts (stored path -> PhotoFacts, or None: never read, as in
    an index made before altclip read them)."""
    from altclip_cli.search.facts import FACT_COLUMNS

    with IndexStore.open(folder, write=True) as store:
        store.commit(facts={key: f for key, f in facts_by_key.items() if f is not None})
    unread = [key for key, f in facts_by_key.items() if f is None]
    db = sqlite3.connect(folder / "index.sqlite3", isolation_level=None)
    try:
        db.executemany(f"UPDATE files SET facts = NULL, {', '.join(f'{c} = NULL' for c in FACT_COLUMNS)} "
                       "WHERE path = ?", [(key,) for key in unread])
    finally:
        db.close()


def build_index(folder, photos, seed: int = 3) -> np.ndarray:
    """An index of the photos (a random unit vector each, two photos sharing one now and then, as
    copies do) with their facts; returns the vectors by photo."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((len(photos), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with IndexStore.open(folder, identity=IDENTITY, write=True, create=True) as store:
        first = store.append_vectors(vectors)
        rows = [first + i if i % 50 != 49 else first + i - 1 for i in range(len(photos))]  # every 50th: a copy
        store.commit(upserts=[(p["key"], 1000, 1, None, row, None) for p, row in zip(photos, rows)],
                     facts={p["key"]: facts_of(p) for p in photos if p["read"]})
    return vectors[[r - first for r in rows]]


# --- the reference ---------------------------------------------------------------------------------

def _chord_km(a, b) -> float:
    """An independent distance: the angle between the points' unit vectors, from their chord."""
    def unit(p):
        lat, lon = map(math.radians, p)
        return (math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat))
    return 2 * math.asin(min(1.0, math.dist(unit(a), unit(b)) / 2)) * 6371.0


def reference_keeps(photo: dict, after=None, before=None, near=None, within_km=None, camera=None) -> bool:
    """The filters' meaning, by hand: dates as prefixes of the ISO text, distances along a chord,
    the camera as a substring of its lower-case text with runs of spaces made one."""
    if (after or before) and photo["taken"] is None:
        return False
    if after and photo["taken"][:len(after)] < after:
        return False
    if before and photo["taken"][:len(before)] > before:
        return False
    if near:
        if photo["gps"] is None or _chord_km(near, photo["gps"]) > within_km:
            return False
    if camera:
        if photo["camera"] is None or " ".join(camera.split()).lower() not in " ".join(photo["camera"].split()).lower():
            return False
    return True


def reference_missing(photos, **filters) -> dict:
    out = {}
    if filters.get("after") or filters.get("before"):
        out["date"] = sum(p["taken"] is None for p in photos)
    if filters.get("near"):
        out["place"] = sum(p["gps"] is None for p in photos)
    if filters.get("camera"):
        out["camera"] = sum(p["camera"] is None for p in photos)
    return out


CASES = [
    dict(after="2023"),
    dict(before="2022-12"),
    dict(after="2023-07", before="2023-07"),
    dict(after="2023-07-01", before="2023-07-31"),
    dict(after="2024-02-29", before="2024-02-29"),
    dict(after="2022-06-15", before="2023-01"),
    dict(near=(48.8566, 2.3522), within_km=5),
    dict(near=(43.3, 5.37), within_km=0.5),
    dict(near=(0.0, 180.0), within_km=8),  # across the antimeridian
    dict(near=(90.0, 0.0), within_km=20),  # the pole: every longitude
    dict(near=(-89.99, 60.0), within_km=5),
    dict(near=(48.0, 2.0), within_km=20_000),  # the whole earth
    dict(camera="canon"),
    dict(camera="  iPhone   12 "),
    dict(camera="iphone 12 pro"),
    dict(camera="nikon d7"),
    dict(camera="leica"),
    dict(after="2023", camera="EOS", near=(48.8566, 2.3522), within_km=10),
    dict(before="2023-06", near=(-33.87, 151.21), within_km=12),
]


def make_filter(after=None, before=None, near=None, within_km=None, camera=None, sort=None) -> SearchFilter:
    return parse_filter(after=after, before=before, near=f"{near[0]},{near[1]}" if near else None,
                        within=f"{within_km}km" if within_km is not None else None, camera=camera, sort=sort)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("filters") / "index"
    photos = random_photos(3000)
    vectors = build_index(folder, photos)
    return folder, photos, vectors


@pytest.fixture(scope="module")
def long_lived():
    """A server's SnapshotCache, kept over the tests of the module (filters over its columns)."""
    from altclip_cli.search.store import SnapshotCache

    cache = SnapshotCache()
    yield cache
    cache.close()


@pytest.mark.parametrize("reader", ["command", "server"])
@pytest.mark.parametrize("case", CASES, ids=[" ".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_a_snapshot_keeps_what_the_reference_keeps(indexed, long_lived, case, reader):
    """In SQL (each command's snapshot), and over the columns a server's cache keeps."""
    folder, photos, _ = indexed
    where = make_filter(**case)
    want = {p["key"] for p in photos if reference_keeps(p, **case)}
    cache = long_lived if reader == "server" else None
    with IndexStore.open(folder) as store, store.snapshot(where=where, cache=cache) as snap:
        got = set(snap.paths_of(snap.file_ids))
        assert got == want
        assert snap.count == len(want) and snap.total == len(photos)
        assert snap.missing == reference_missing(photos, **case)
        assert snap.unread == sum(not p["read"] for p in photos)
        assert all(where.accepts(f) == (p["key"] in want) for p, f in zip(photos, snap.facts_of(
            [snap.ids_of([p["key"]])[p["key"]] for p in photos])))


def test_a_folder_and_a_filter_together(indexed):
    folder, photos, _ = indexed
    case = dict(after="2023", camera="apple")
    below = [p for p in photos if p["key"].startswith("/photos/007/")]
    with IndexStore.open(folder) as store, store.snapshot("/photos/007", where=make_filter(**case)) as snap:
        assert set(snap.paths_of(snap.file_ids)) == {p["key"] for p in below if reference_keeps(p, **case)}
        assert snap.total == len(below) and snap.missing == reference_missing(below, **case)


def test_a_sort_alone_filters_nothing(indexed):
    folder, photos, _ = indexed
    with IndexStore.open(folder) as store, store.snapshot(where=parse_filter(sort="date")) as snap:
        assert snap.count == snap.total == len(photos) and snap.missing == {}


def test_the_snapshot_cache_keys_each_filter_apart(indexed):
    """A long-lived reader's cache keeps each folder and filter's rows apart; another process's
    commit makes them read again."""
    from altclip_cli.search.store import SnapshotCache

    folder, photos, _ = indexed
    cache = SnapshotCache()
    try:
        with IndexStore.open(folder) as store:
            def kept(**case):
                with store.snapshot(cache=cache, where=make_filter(**case) if case else None) as snap:
                    return set(snap.paths_of(snap.file_ids)), snap.missing
            for _ in range(2):  # the second time from the cache
                assert kept(camera="canon")[0] == {p["key"] for p in photos if reference_keeps(p, camera="canon")}
                assert kept(camera="sony")[0] == {p["key"] for p in photos if reference_keeps(p, camera="sony")}
                assert kept(camera="sony", sort="date")[0] == kept(camera="sony")[0]
                assert len(kept()[0]) == len(photos)
            moved = next(p for p in photos if p["camera"] and "Canon" in p["camera"])
            put_facts(folder, {moved["key"]: facts_of({**moved, "camera": "SONY ILCE-7M3"})})
            assert moved["key"] in kept(camera="sony")[0] and moved["key"] not in kept(camera="canon")[0]
    finally:
        put_facts(folder, {moved["key"]: facts_of(moved)})
        cache.close()


# --- ranking: the filter first, -k and --min-score, then the date order ------------------------------

def _brute_ranking(photos, vectors, query, k, min_score, **case):
    scores = vectors @ query
    kept = [i for i, p in enumerate(photos) if reference_keeps(p, **case)]
    kept.sort(key=lambda i: (-scores[i], i))
    best = [i for i in kept[:k] if min_score is None or scores[i] >= min_score]
    return best, scores


@pytest.mark.parametrize("case", [dict(after="2023", camera="canon"), dict(near=(48.8566, 2.3522), within_km=6),
                                  dict(before="2022-06"), {}])
@pytest.mark.parametrize("sort", ["score", "date"])
def test_ranking_keeps_the_best_of_the_kept_then_orders_them(indexed, case, sort):
    from altclip_cli.search.run import rank_below

    folder, photos, vectors = indexed
    query = np.random.default_rng(5).standard_normal(DIM).astype(np.float32)
    query /= np.linalg.norm(query)
    for k, min_score in ((15, None), (1000, 0.3)):
        best, scores = _brute_ranking(photos, vectors, query, k, min_score, **case)
        ranked = rank_below(IDENTITY, folder, "/photos", query, k, min_score, where=make_filter(**case, sort=sort))
        want = best
        if sort == "date":  # oldest first, no date last; equal dates in score order
            want = sorted(best, key=lambda i: (photos[i]["local"] is None, photos[i]["local"] or datetime.min,
                                               best.index(i)))
        assert [h[1] for h in ranked.hits] == [photos[i]["key"] for i in want]
        assert [h[0] for h in ranked.hits] == [best.index(i) + 1 for i in want]  # the rank is the score's
        assert [h[2] for h in ranked.hits] == pytest.approx([float(scores[i]) for i in want], abs=1e-5)
        for (_rank, _path, _score, facts), i in zip(ranked.hits, want):
            p = photos[i]
            assert facts.get("taken") == p["taken"] and facts.get("camera") == p["camera"]
            assert facts.get("gps") == (list(p["gps"]) if p["gps"] else None)
        if sort == "date":
            dated = [photos[i]["local"] for i in want if photos[i]["local"] is not None]
            assert dated == sorted(dated)


# --- the parser: one for the command line and requests ----------------------------------------------

@pytest.mark.parametrize("fields,field,words", [
    (dict(after="2023-13"), "after", "'2023-13' is not a date of the calendar"),
    (dict(before="23"), "before", "'23' is not a date"),
    (dict(near="91,0"), "near", "latitude 91 is outside -90..90"),
    (dict(near="48.85"), "near", "LAT,LON"),
    (dict(near=[91, 0]), "near", "latitude 91 is outside"),
    (dict(near=[1, 2, 3]), "near", "[LAT, LON]"),
    (dict(near="1,2", within="5"), "within", "'5' is not a distance"),
    (dict(near="1,2", within="-1km"), "within", "'-1km'"),
    (dict(within="5km"), "within", "within 5km needs near"),
    (dict(after="2024", before="2023-12"), "after", "after 2024 is after before 2023-12"),
    (dict(camera="   "), "camera", "names no camera"),
    (dict(sort="newest"), "sort", "'newest' is not an order"),
])
def test_bad_filters_name_the_field_and_the_value(fields, field, words):
    with pytest.raises(FilterError) as err:
        parse_filter(**fields)
    assert err.value.field == field and words in err.value.message_for("")
    assert err.value.message_for("--").startswith(f"--{field}")


def test_a_filter_goes_to_a_server_and_back_unchanged():
    for case in CASES:
        for sort in ("score", "date"):
            where = make_filter(**case, sort=sort)
            assert parse_filter(**where.as_request()) == where
    assert parse_filter(near=[1e-7, -0.5]).near == (1e-7, -0.5)
    assert parse_filter(near="1,2").within_m == 1000  # the default distance


# --- through the command line ----------------------------------------------------------------------

@pytest.fixture
def photo_index(tmp_path, monkeypatch, model):
    """cwd = tmp_path: photos/ (16 images), their index in idx/ made by `altclip search`, and facts
    written into it: (photos as the reference sees them, keyed by real path; the unfiltered ranking
    of QUERY as {path: -rank})."""
    from test_cli import invoke, jsonl, write_image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    paths = [str(write_image(tmp_path / "photos" / f"p{i:02d}.png", 40 + i, size=(30 + i, 24 + i)).resolve())
             for i in range(16)]
    result = invoke("search", QUERY, "--dir", "photos", "--index", "idx", "-k", "100", "-m", model)
    assert result.exit_code == 0, result.stderr
    scores = {r["path"]: -r["rank"] for r in jsonl(result.stdout)}  # the unfiltered order (rounded scores may tie)
    assert sorted(scores) == sorted(paths)
    photos = random_photos(16, seed=9)
    for photo, path in zip(photos, paths):
        photo["key"] = path
    photos[0].update(taken=None, local=None)  # one without a date, one without a place, one never read
    photos[1].update(gps=None)
    photos[2].update(read=False, taken=None, local=None, gps=None, camera=None)
    photos[3].update(taken="2023-07-14T10:20:30+02:00", local=datetime(2023, 7, 14, 10, 20, 30), camera="Canon EOS R5",
                     gps=(48.8566, 2.3522))
    put_facts(tmp_path / "idx", {p["key"]: facts_of(p) for p in photos})
    return photos, scores


QUERY = "a red car"


def _search(model, *args):
    from test_cli import invoke

    return invoke("search", QUERY, "--dir", "photos", "--index", "idx", "--no-index", "-m", model, *args)


def _want(photos, scores, k=100, sort="score", **case):
    kept = [p for p in photos if reference_keeps(p, **case)]
    kept.sort(key=lambda p: -scores[p["key"]])
    kept = kept[:k]
    if sort == "date":
        kept.sort(key=lambda p: (p["local"] is None, p["local"] or datetime.min))  # stable: score order kept
    return kept


@pytest.mark.parametrize("args,case", [
    (["--after", "2023"], dict(after="2023")),
    (["--after", "2022-03", "--before", "2023-07-14"], dict(after="2022-03", before="2023-07-14")),
    (["--near", "48.8566,2.3522", "--within", "30 km"], dict(near=(48.8566, 2.3522), within_km=30)),
    (["--near=-33.87,151.21", "--within", "12000m"], dict(near=(-33.87, 151.21), within_km=12)),
    (["--camera", "CANON eos"], dict(camera="CANON eos")),
    (["--camera", "apple", "--after", "2022"], dict(camera="apple", after="2022")),
])
def test_search_filters_as_the_reference(photo_index, model, args, case):
    from test_cli import jsonl

    photos, scores = photo_index
    result = _search(model, *args, "-k", "100")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    want = _want(photos, scores, **case)
    assert [r["path"] for r in records] == [p["key"] for p in want]
    for r, p in zip(records, want):
        assert r.get("taken") == p["taken"] and r.get("camera") == p["camera"]
        assert r.get("gps") == (pytest.approx(list(p["gps"])) if p["gps"] else None)
    assert f"{len(want)} of 16 indexed images below the folder match" in result.stderr
    for fact, n in reference_missing(photos, **case).items():
        words = {"date": "no date", "place": "no place (GPS position)", "camera": "no camera"}[fact]
        assert f"{n} photo{'s have' if n != 1 else ' has'} {words}: left out by the filter" in result.stderr
    assert "1 of them was indexed before altclip read dates" in result.stderr  # photos[2]


def test_date_sort_orders_what_k_kept(photo_index, model):
    from test_cli import jsonl

    photos, scores = photo_index
    for args, k in ((["-k", "5"], 5), (["-k", "100"], 100)):
        result = _search(model, "--sort", "date", *args)
        assert result.exit_code == 0, result.stderr
        records = jsonl(result.stdout)
        want = _want(photos, scores, k=k, sort="date")
        assert [r["path"] for r in records] == [p["key"] for p in want]
        by_score = sorted(scores, key=lambda path: -scores[path])
        assert [r["rank"] for r in records] == [by_score.index(p["key"]) + 1 for p in want]
        if k == 100:
            oldest = min((p for p in photos if p["local"]), key=lambda p: p["local"])
            assert records[0]["taken"] == oldest["taken"] and records[-1].get("taken") is None
    table = _search(model, "--sort", "date", "-k", "3", "-f", "table")
    assert table.exit_code == 0 and "taken" in table.stdout.splitlines()[0]


def test_every_format_takes_the_filtered_results(photo_index, model):
    photos, scores = photo_index
    want = [p["key"] for p in _want(photos, scores, camera="canon")]
    paths = _search(model, "--camera", "canon", "-f", "paths", "-k", "100")
    assert paths.exit_code == 0 and paths.stdout.splitlines() == want
    page = _search(model, "--camera", "canon", "--sort", "date", "-o", "page.html")
    assert page.exit_code == 0, page.stderr
    html = open("page.html", encoding="utf-8").read()
    assert html.count('class="card"') == len(want) and f"{len(want)} of 16 images match the filters" in html
    dated = [p for p in photos if p["key"] in want and p["taken"]]
    assert all(p["taken"][:16].replace("T", " ") in html for p in dated)


@pytest.mark.parametrize("args,words", [
    (["--after", "2023-13"], "--after: '2023-13' is not a date of the calendar"),
    (["--before", "2023/07"], "--before: '2023/07' is not a date"),
    (["--near", "91,0"], "--near: '91,0': latitude 91 is outside -90..90"),
    (["--near", "48.85,2.35", "--within", "5"], "--within: '5' is not a distance"),
    (["--within", "5km"], "--within 5km needs --near LAT,LON"),
    (["--after", "2024", "--before", "2023"], "--after 2024 is after --before 2023"),
    (["--camera", " "], "--camera: ' ' names no camera"),
    (["--sort", "newest"], "'newest' is not one of 'score', 'date'"),
])
def test_bad_filters_are_usage_errors_naming_the_value(photo_index, model, args, words):
    result = _search(model, *args)
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert result.stdout == ""


def test_the_library_search_takes_the_same_filters(photo_index, tiny_loaded):
    from altclip_cli.search import search as library_search

    photos, scores = photo_index
    hits = library_search(tiny_loaded[1], QUERY, "photos", index="idx", update=False, top=100, after="2022",
                          camera="canon", sort="date")
    want = _want(photos, scores, after="2022", camera="canon", sort="date")
    assert [h.path for h in hits] == [p["key"] for p in want]
    assert [(h.taken, h.camera, h.gps) for h in hits] == [(p["taken"], p["camera"], p["gps"]) for p in want]
    with pytest.raises(FilterError, match="latitude 91"):
        library_search(tiny_loaded[1], QUERY, "photos", index="idx", near="91,0")


def test_classify_index_classifies_only_what_the_filters_keep(photo_index, model):
    from test_cli import invoke, jsonl

    photos, _ = photo_index
    (open("new.png", "wb")).write(open(photos[5]["key"], "rb").read() + b"")  # a copy the index has not seen
    result = invoke("classify", "photos", "new.png", "-l", "cat", "-l", "dog", "--index", "idx", "--camera", "canon",
                    "--after", "2022", "-m", model)
    assert result.exit_code == 0, result.stderr
    want = sorted(p["key"] for p in photos if reference_keeps(p, camera="canon", after="2022"))
    assert want and sorted(os.path.realpath(r["image"]) for r in jsonl(result.stdout)) == want
    assert f"{len(want)} of 17 images match the filters" in result.stderr
    assert "1 image is not in the index as it is now" in result.stderr
    missing = reference_missing(photos, camera="canon", after="2022")
    assert f"{missing['camera']} photo{'s have' if missing['camera'] != 1 else ' has'} no camera" in result.stderr
    plain = invoke("classify", "photos", "-l", "cat", "-l", "dog", "--index", "idx", "-m", model)
    assert plain.exit_code == 0 and len(jsonl(plain.stdout)) == 16  # no filter: every image


@pytest.mark.parametrize("args,words", [
    (["--after", "2023"], "--after 2023 filters by what the index holds of each image: it needs --index"),
    (["--index", "idx", "--near", "0,200"], "--near: '0,200': longitude 200 is outside"),
    (["--index", "idx", "--within", "2km"], "--within 2km needs --near"),
])
def test_classify_filter_errors(photo_index, model, args, words):
    from test_cli import invoke

    result = invoke("classify", "photos", "-l", "cat", *args, "-m", model)
    assert result.exit_code == 2 and words in result.stderr, result.stderr


# --- through the server: POST /v1/search, and `altclip search --server` -----------------------------

def test_the_server_filters_as_the_command_does(photo_index, model, tmp_path):
    """POST /v1/search takes the same fields (bad ones 400 naming the field), answers the same
    records with their facts and the counts; `altclip search --server SOCKET` passes the options on
    and prints what an in-process run prints."""
    pytest.importorskip("fastapi")
    from test_cli import invoke, jsonl
    from test_serve import start_server

    from altclip_cli.serve import client
    from altclip_cli.serve.client import RequestFailed

    photos, scores = photo_index
    server = start_server(model)
    try:
        base = {"query": [{"text": QUERY}], "dir": str(tmp_path / "photos"), "index": str(tmp_path / "idx"),
                "update": False, "top_k": 100}
        paris = (48.8566, 2.3522)
        for fields, case in (({"after": "2022-03", "before": "2023-07-14"}, dict(after="2022-03", before="2023-07-14")),
                             ({"near": list(paris), "within": "30km"}, dict(near=paris, within_km=30)),
                             ({"near": "48.8566,2.3522", "within": "30km", "camera": "canon", "sort": "date"},
                              dict(near=paris, within_km=30, camera="canon", sort="date"))):
            answer = client.post_json(server.target, "/v1/search", {**base, **fields})
            want = _want(photos, scores, **case)
            assert [r["path"] for r in answer["results"]] == [p["key"] for p in want]
            assert [r.get("camera") for r in answer["results"]] == [p["camera"] for p in want]
            assert answer["searched"] == len(want) and answer["total"] == 16 and answer["unread"] == 1
            assert answer["missing"] == reference_missing(photos, **case)
        plain = client.post_json(server.target, "/v1/search", base)
        assert "total" not in plain and len(plain["results"]) == 16
        assert {r["path"]: r.get("taken") for r in plain["results"]} == {p["key"]: p["taken"] for p in photos}

        for fields, field, words in (({"after": "2023-13"}, "after", "after: '2023-13' is not a date of the calendar"),
                                     ({"near": "91,0"}, "near", "near: '91,0': latitude 91 is outside"),
                                     ({"near": [0, 200]}, "near", "longitude 200.0 is outside"),
                                     ({"near": "1,2", "within": "5"}, "within", "within: '5' is not a distance"),
                                     ({"within": "5km"}, "within", "within 5km needs near"),
                                     ({"sort": "newest"}, "sort", "'newest' is not an order"),
                                     ({"camera": 5}, "camera", "camera")):
            with pytest.raises(RequestFailed) as err:
                client.post_json(server.target, "/v1/search", {**base, **fields})
            assert err.value.status == 400 and words in err.value.message, err.value.message
            assert err.value.error["param"] == field

        args = ("--dir", "photos", "--index", "idx", "--no-index", "-m", model, "-k", "100", "--after", "2022",
                "--camera", "apple", "--sort", "date")
        remote = invoke("search", QUERY, *args, "--server", server.target)
        here = invoke("search", QUERY, *args, "--server", "off")
        assert remote.exit_code == here.exit_code == 0, (remote.stderr, here.stderr)
        assert remote.stderr == here.stderr and "of 16 indexed images below the folder match" in here.stderr
        want = _want(photos, scores, after="2022", camera="apple", sort="date")
        for run in (remote, here):
            assert [r["path"] for r in jsonl(run.stdout)] == [p["key"] for p in want]
        assert client.health(server.target)["requests"] >= 1
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.parametrize("reader", ["command", "server"])
def test_an_index_older_than_the_facts_keeps_nothing_and_says_why(tmp_path, reader):
    """An index a reader opens before any writer upgraded it (no fact columns): a filter keeps
    no photo, and every one is counted as lacking what it asks about, and as unread."""
    from altclip_cli.search.database import FACT_COLUMN_TYPES
    from altclip_cli.search.store import SnapshotCache

    photos = random_photos(40)
    build_index(tmp_path / "index", photos)
    db = sqlite3.connect(tmp_path / "index" / "index.sqlite3", isolation_level=None)
    for column, _kind in FACT_COLUMN_TYPES:
        db.execute(f"ALTER TABLE files DROP COLUMN {column}")
    db.close()
    cache = SnapshotCache() if reader == "server" else None
    try:
        with IndexStore.open(tmp_path / "index") as store, \
                store.snapshot(where=make_filter(after="2020", camera="canon"), cache=cache) as snap:
            assert snap.count == 0 and snap.total == 40 and snap.unread == 40
            assert snap.missing == {"date": 40, "camera": 40}
    finally:
        if cache is not None:
            cache.close()


def test_filters_on_what_indexing_read_from_the_photos_exif(tmp_path, monkeypatch, model):
    """End to end, nothing injected: photos written with EXIF (dates with and without an offset,
    GPS in both hemispheres, make and model), indexed by `altclip search`, filtered by it."""
    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational as R
    from test_cli import invoke, jsonl

    def dms(x):
        x = abs(x)
        return (R(int(x), 1), R(int(x * 60 % 60), 1), R(round(x * 3600 % 60 * 100), 100))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    photos = {"paris.jpg": ((48.8566, 2.3522), "2023:07:14 10:00:00", "+02:00", "Canon", "Canon EOS R5"),
              "sydney.jpg": ((-33.8688, 151.2093), "2023:01:02 23:30:00", None, "Apple", "iPhone 12"),
              "london.jpg": ((51.5074, -0.1278), "2023:06:30 23:59:59", "+01:00", "Canon", "Canon EOS 5D")}
    rng = np.random.default_rng(4)
    for name, ((lat, lon), date, offset, make, camera) in photos.items():
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = make, camera
        exif.get_ifd(0x8769)[0x9003] = date
        if offset:
            exif.get_ifd(0x8769)[0x9011] = offset
        exif.get_ifd(0x8825).update({1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W",
                                     4: dms(lon)})
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "photos" / name, exif=exif)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "photos" / "scan.png")
    when = datetime(2020, 1, 1, 12).timestamp()  # no EXIF: its date is the file's (local) time
    os.utime(tmp_path / "photos" / "scan.png", (when, when))

    def found(*args):
        result = invoke("search", QUERY, "--dir", "photos", "--index", "idx", "-k", "10", "-m", model, *args)
        assert result.exit_code == 0, result.stderr
        return result, sorted(os.path.basename(r["path"]) for r in jsonl(result.stdout))

    _, every = found()
    assert every == ["london.jpg", "paris.jpg", "scan.png", "sydney.jpg"]
    assert found("--camera", "canon eos")[1] == ["london.jpg", "paris.jpg"]
    assert found("--after", "2023-07")[1] == ["paris.jpg"]
    assert found("--before", "2023-06")[1] == ["london.jpg", "scan.png", "sydney.jpg"]  # June 30th, 23:59:59 is in June
    assert found("--after", "2020-01-01", "--before", "2020-01-01")[1] == ["scan.png"]
    assert found("--near", "-33.87,151.21", "--within", "5km")[1] == ["sydney.jpg"]
    result, near_paris = found("--near", "48.85,2.35", "--within", "400km")
    assert near_paris == ["london.jpg", "paris.jpg"]
    assert "1 photo has no place (GPS position): left out by the filter" in result.stderr  # the scan
    records = {os.path.basename(r["path"]): r for r in jsonl(found("--camera", "canon")[0].stdout)}
    assert records["paris.jpg"]["taken"] == "2023-07-14T10:00:00+02:00"
    assert records["paris.jpg"]["camera"] == "Canon EOS R5"
    assert records["paris.jpg"]["gps"] == pytest.approx([48.8566, 2.3522], abs=1e-4)
