"""`altclip dupes` and search/dupes.py: identical copies, near copies (the same picture saved again)
and, when asked, similar photos, grouped with the photo to keep and why each other lost; distinct
photos (blank margins alike, two different near-black frames) in no group.

The engine is checked on controlled vectors against brute-force references written here. The
command runs on generated photos and their variants, indexed with the tiny random model, whose
vectors carry no meaning: the vectors that matter are injected into the index (inject), so the
perceptual hashes the index computed from the real files decide, as they would with real weights.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from altclip_cli.search.dupes import (DEFAULT_SIMILAR_THRESHOLD, NEAR_MIN_COSINE, Photos, components, find_groups,
                                      similar_pairs)
from altclip_cli.search.store import INDEX_DB, IndexStore
from test_cli import invoke, jsonl
from test_index import folder_of
from test_perceptual import MAKERS, _exif, _on_page, _save, _variants

FP32 = ["--precision", "fp32"]


def unit(rng, n, dim=32):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def toward(v, rng, cosine: float):
    """A unit vector whose cosine with unit vector v is `cosine`."""
    noise = rng.standard_normal(v.shape).astype(np.float64)
    noise -= noise @ v * v
    noise /= np.linalg.norm(noise)
    return (cosine * v + np.sqrt(1 - cosine ** 2) * noise).astype(np.float32)


def bruteforce_components(n, pairs) -> list[set]:
    """The groups (of two or more) of a graph, by a plain union-find."""
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[int, set] = {}
    for x in range(n):
        groups.setdefault(root(x), set()).add(x)
    return sorted((g for g in groups.values() if len(g) > 1), key=min)


def label_groups(labels) -> list[set]:
    groups: dict[int, set] = {}
    for x, label in enumerate(labels):
        groups.setdefault(int(label), set()).add(x)
    return sorted((g for g in groups.values() if len(g) > 1), key=min)


# --- the engine -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_components_equal_a_plain_union_find(seed):
    rng = np.random.default_rng(seed)
    n = 300
    pairs = rng.integers(0, n, (rng.integers(0, 400), 2))
    # a long chain too: labels must travel its whole length
    chain = np.stack([np.arange(100, 199), np.arange(101, 200)], axis=1)[::-1]
    pairs = np.concatenate([pairs, chain])
    labels = components(n, pairs[:, 0], pairs[:, 1])
    assert label_groups(labels) == bruteforce_components(n, pairs.tolist())
    # edges added in two steps give the same components
    half = len(pairs) // 2
    again = components(n, pairs[half:, 0], pairs[half:, 1], labels=components(n, pairs[:half, 0], pairs[:half, 1]))
    assert label_groups(again) == label_groups(labels)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("basis_sample", [None, 200])
def test_similar_pairs_are_every_pair_at_or_above_the_threshold(threshold, basis_sample, monkeypatch):
    """Against the full product in float64. basis_sample 200: the bound's directions come from a
    sample and its width is chosen on others, as for a large library."""
    import altclip_cli.search.dupes as engine

    if basis_sample is not None:
        monkeypatch.setattr(engine, "BASIS_SAMPLE", basis_sample)
        monkeypatch.setattr(engine, "CHOICE_SAMPLE", 150)
    rng = np.random.default_rng(3)
    n, dim = 900, 48
    v = unit(rng, n, dim)
    for a in range(0, 60, 3):  # planted close pairs, at cosines on both sides of the thresholds
        v[a + 1] = toward(v[a], rng, 0.95)
        v[a + 2] = toward(v[a], rng, 0.89)
    rows = rng.permutation(n + 10)[:n]  # photos point at rows of a larger file, in no order
    file = np.zeros((n + 10, dim), np.float32)
    file[rows] = v
    only = rng.random(n) > 0.1
    exact = v.astype(np.float64) @ v.astype(np.float64).T
    want = {(i, j) for i, j in zip(*np.nonzero(np.triu(exact >= threshold, 1))) if only[i] and only[j]}
    got = set()
    for i, j in similar_pairs(file, rows, threshold, only=only, block=128):  # 8 blocks a side
        got |= {tuple(sorted(p)) for p in zip(i.tolist(), j.tolist())}
    # float32 against float64: a pair within 1e-5 of the threshold may go either way
    unsure = {(i, j) for i, j in zip(*np.nonzero(np.triu(np.abs(exact - threshold) < 1e-5, 1)))}
    assert got - unsure == want - unsure and want


def photos_of(n, vectors, **columns):
    return Photos.from_lists([f"/p/{i:03d}.jpg" for i in range(n)], vectors, **columns)


def test_tiers_need_their_reason_and_combine_through_chains():
    rng = np.random.default_rng(0)
    v = unit(rng, 10)
    h = rng.integers(0, 2 ** 63, 10, dtype=np.uint64) | np.uint64(1)  # distinct hashes, far apart
    keys = [f"k{i}" for i in range(10)]
    keys[1] = keys[0]  # 0, 1: the same bytes (and so the same vector and hash)
    v[1], h[1] = v[0], h[0]
    h[2] = h[0] ^ np.uint64(0b111)  # 2: 3 bits from 0, cosine 0.97: near 0
    v[2] = toward(v[0], rng, 0.97)
    h[3] = h[4] ^ np.uint64(0b11)  # 3, 4: hashes 2 bits apart, cosine 0.80: not near
    v[3] = toward(v[4], rng, 0.80)
    h[6] = h[5]  # 5, 6: blank frames with equal hashes and equal-looking embeddings: nothing
    v[6] = toward(v[5], rng, 0.99)
    v[7] = toward(v[2], rng, 0.96)  # 7: a hash far from all, cosine 0.96 with 2: similar only
    low = np.zeros(10, bool)
    low[[5, 6]] = True
    photos = photos_of(10, v, content_key=keys, phash=h, has_phash=np.ones(10, bool), phash_low=low,
                       width=[400, 400, 200, 100, 100, 10, 10, 300, 5, 5], height=[300] * 10,
                       size=[1000, 1000, 500, 90, 80, 7, 7, 700, 1, 1])
    found = find_groups(photos)
    assert [(g.tier, sorted(m.position for m in g.members)) for g in found.groups] == [("near", [0, 1, 2])]
    group = found.groups[0]
    assert group.keep.path == "/p/000.jpg"  # 0 and 1 are alike but for the path
    tiers = {m.position: (m.tier, round(m.cosine, 2), m.hamming) for m in group.members}
    assert tiers == {0: ("keep", 1.0, 0), 1: ("identical", 1.0, 0), 2: ("near", 0.97, 3)}
    assert group.members[1].why == "its path sorts after the kept one's"
    assert group.members[2].why == "fewer pixels (200x300 < 400x300)"

    found = find_groups(photos, similar=True, threshold=0.95)
    assert [(g.tier, sorted(m.position for m in g.members)) for g in found.groups] == [("similar", [0, 1, 2, 7])]
    assert {m.position: m.tier for m in found.groups[0].members}[7] == "similar"
    assert find_groups(photos, max_distance=2).groups[0].tier == "identical"  # 2 is 3 bits away
    assert find_groups(photos, near_cosine=0.98).groups[0].tier == "identical"


def test_blank_frames_never_pair_by_hash_or_embedding_only_by_bytes():
    rng = np.random.default_rng(1)
    v = unit(rng, 3)
    v[1] = v[0]
    v[2] = v[0]
    photos = photos_of(3, v, content_key=["a", "a", "b"], phash=[5, 5, 5], has_phash=[True] * 3,
                       phash_low=[True] * 3)
    for found in (find_groups(photos), find_groups(photos, similar=True, threshold=0.5)):
        assert [(g.tier, sorted(m.position for m in g.members)) for g in found.groups] == [("identical", [0, 1])]


DAY = 86400


@pytest.mark.parametrize("rule, kept, why", [
    ("largest", 1, {0: "fewer pixels (100x100 < 200x100)", 2: "smaller file (10 < 20 bytes)",
                    3: "no capture time"}),
    ("oldest", 0, {1: "taken later (1970-01-03 00:00:00 > 1970-01-02 00:00:00)",
                   2: "taken later (1970-01-04 00:00:00 > 1970-01-02 00:00:00)", 3: "no capture time"}),
    ("newest", 2, {0: "taken earlier (1970-01-02 00:00:00 < 1970-01-04 00:00:00)",
                   1: "taken earlier (1970-01-03 00:00:00 < 1970-01-04 00:00:00)", 3: "no capture time"}),
    ("first", 3, {0: "found under a path given after the kept one's", 1: "found under a path given after the kept one's",
                  2: "its path sorts after the kept one's"}),
])
def test_the_keep_rules_and_why_each_other_lost(rule, kept, why):
    rng = np.random.default_rng(2)
    v = np.repeat(unit(rng, 1), 4, axis=0)
    photos = Photos.from_lists(["/b/0.jpg", "/b/1.jpg", "/a/2.jpg", "/a/1.jpg"], v, content_key=["k"] * 4,
                               width=[100, 200, 200, 200], height=[100] * 4, size=[10, 20, 10, 20],
                               taken_local=[DAY, 2 * DAY, 3 * DAY, -2 ** 63])
    group, = find_groups(photos, keep=rule, first_roots=["/a", "/b"]).groups
    assert group.keep.position == kept
    assert {m.position: m.why for m in group.others} == why


def test_largest_ties_go_to_the_older_then_the_path():
    v = np.ones((3, 4), np.float32) / 2
    photos = Photos.from_lists(["/z.jpg", "/y.jpg", "/x.jpg"], v, content_key=["k"] * 3, width=[10] * 3,
                               height=[10] * 3, size=[5] * 3, taken_local=[2 * DAY, DAY, DAY])
    group, = find_groups(photos).groups
    assert [m.path for m in group.members] == ["/x.jpg", "/y.jpg", "/z.jpg"]
    assert group.others[1].why.startswith("taken later")


def test_groups_come_strictest_first_and_numbered():
    rng = np.random.default_rng(4)
    v = unit(rng, 6)
    v[1], v[3] = v[0], toward(v[2], rng, 0.99)
    h = rng.integers(0, 2 ** 63, 6, dtype=np.uint64)
    h[3] = h[2]
    photos = photos_of(6, v, content_key=["a", "a", "c", "d", "e", "f"], phash=h, has_phash=[True] * 6)
    found = find_groups(photos)
    assert [(g.number, g.tier) for g in found.groups] == [(1, "identical"), (2, "near")]
    assert found.counts() == {"identical": 1, "near": 1, "similar": 0} and found.removable == 2


def test_the_command_line_states_the_engines_defaults():
    from altclip_cli.cli.commands import dupes as command
    from altclip_cli.inputs.perceptual import DEFAULT_MAX_DISTANCE
    from altclip_cli.search import dupes as engine

    assert command.DEFAULT_THRESHOLD == DEFAULT_SIMILAR_THRESHOLD
    assert command.DEFAULT_MAX_DISTANCE == DEFAULT_MAX_DISTANCE
    assert command.KEEP_RULES == engine.KEEP_RULES
    assert f"cosine of at least {NEAR_MIN_COSINE}" in command.dupes.help


# --- the command, on generated photos -----------------------------------------------------------------------

BASES = 3


def dark_frame(seed: int) -> Image.Image:
    """A near-black frame (a lens cap, a video's first frame): faint noise on black."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 4, (360, 480, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """photos/: BASES bases, each in its folder with its variants (re-encoded at quality 60,
    halved, EXIF-rotated, stripped, cropped 3%, a PNG) and a `cp` copy; a photo with only a
    copy; two photos on the same white page; two different near-black frames; a lone photo.
    Returns (root, {name: [paths]}) with every file's absolute path by role."""
    root = tmp_path_factory.mktemp("lib") / "photos"
    roles: dict[str, list] = {}
    for n in range(BASES):
        folder = root / f"set{n}"
        folder.mkdir(parents=True)
        base = MAKERS[n](np.random.default_rng(2000 + n), (640, 480))
        _save(base, folder / "base.jpg", quality=95, exif=_exif(t274=1))
        variants = _variants(base, folder)
        shutil.copy2(folder / "base.jpg", folder / "base copy.jpg")
        roles[f"set{n}"] = [folder / "base.jpg", folder / "base copy.jpg", *variants.values()]
    alone = root / "alone"
    alone.mkdir()
    _save(MAKERS[3](np.random.default_rng(3000), (500, 400)), alone / "twin.jpg", quality=90)
    shutil.copyfile(alone / "twin.jpg", alone / "twin (1).jpg")
    roles["twins"] = [alone / "twin.jpg", alone / "twin (1).jpg"]
    _save(MAKERS[4](np.random.default_rng(3001), (500, 400)), alone / "lone.jpg", quality=90)
    roles["lone"] = [alone / "lone.jpg"]
    pages = root / "pages"
    pages.mkdir()
    roles["pages"] = [_save(_on_page(np.random.default_rng(7 + k), (900, 900), "shapes"), pages / f"p{k}.jpg",
                            quality=90) for k in range(2)]
    roles["dark"] = [_save(dark_frame(k), root / f"dark{k}.png") for k in range(2)]
    return root, {k: [str(p) for p in v] for k, v in roles.items()}


@pytest.fixture
def photos(library, tmp_path, monkeypatch):
    """A fresh copy of the library in tmp_path/photos (cwd: tmp_path), its roles' paths there."""
    root, roles = library
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root, tmp_path / "photos", copy_function=shutil.copy2)
    moved = {k: [p.replace(str(root), str(tmp_path / "photos"), 1) for p in v] for k, v in roles.items()}
    return tmp_path / "photos", moved


def inject(model, vectors: dict) -> None:
    """Give the indexed files these vectors ({absolute path: (D,) unit vector}), as a model
    with meaning would have: new rows appended and the files pointed at them, nothing else
    changed (the same size, time and content key keep their facts)."""
    folder = folder_of(model)
    db = sqlite3.connect(folder / INDEX_DB)
    try:
        held = {p: (s, m, k) for p, s, m, k in db.execute("SELECT path, size, mtime_ns, content_key FROM files")}
    finally:
        db.close()
    with IndexStore.open(folder, write=True) as store:
        keys = [store.key_of(p) for p in vectors]
        first = store.append_vectors(np.stack(list(vectors.values())).astype(np.float32))
        store.commit(upserts=[(key, *held[key][:3], first + k, None) for k, key in enumerate(keys)])


def meaningful_vectors(roles, dim, seed=0, *, similar_pairs=()) -> dict:
    """Vectors as a model with meaning would give: a base's variants within a cosine of 0.97 to
    0.995 of it, byte copies equal; the two white pages at 0.97 and the two dark frames at 0.99
    (alike to a model: only the hash tells them apart); the rest unrelated. similar_pairs: role
    names whose first photos get a cosine of 0.95 (the same scene, another picture)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, paths in roles.items():
        v = unit(rng, 1, dim)[0]
        out[paths[0]] = v
        for k, p in enumerate(paths[1:]):
            if name.startswith("set") or name == "twins":
                out[p] = v if k == 0 else toward(v, rng, 0.97 + 0.005 * (k % 5))
            else:
                out[p] = toward(v, rng, 0.99 if name == "dark" else 0.97)
    for a, b in similar_pairs:
        out[roles[b][0]] = toward(out[roles[a][0]], rng, 0.95)
    return out


def dupes(model, *args):
    return invoke("dupes", *args, "-m", model, *FP32)


def groups_by_path(records) -> list[tuple[str, set]]:
    return sorted((r["tier"], {i["path"] for i in r["items"]}) for r in records)


def indexed_with_meaning(model, root, roles, **kw):
    result = invoke("index", root, "-m", model, *FP32)
    assert result.exit_code == 0, result.stderr
    with IndexStore.open(folder_of(model)) as store:
        dim = store.dim
    inject(model, meaningful_vectors(roles, dim, **kw))


def test_variants_are_near_their_base_copies_identical_distinct_photos_alone(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    result = dupes(model, "photos", "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    want = sorted([("near", set(roles[f"set{n}"])) for n in range(BASES)] + [("identical", set(roles["twins"]))])
    assert groups_by_path(records) == want
    for r in records:
        by_path = {i["path"]: i for i in r["items"]}
        # kept: the most pixels, then the largest file (here the PNG: the base's pixels, losslessly)
        assert r["keep"] == max(by_path, key=lambda p: (_pixels(p), os.path.getsize(p), -len(p)))
        kept = open(r["keep"], "rb").read()
        for item in r["items"][1:]:  # identical: the kept photo's very bytes; else near
            assert item["tier"] == ("identical" if open(item["path"], "rb").read() == kept else r["tier"])
            assert item["why"]
        assert r["items"][0]["why"] is None
        if r["tier"] == "near":  # the cp copy is identical to its base, whichever is kept
            base, copy = roles[f"set{int(r['keep'].split('/set')[1][0])}"][:2]
            assert by_path[copy]["hamming"] == by_path[base]["hamming"]
            assert "identical" in {by_path[base]["tier"], by_path[copy]["tier"]} or r["keep"] not in (base, copy)
    assert "no indexed images" not in result.stderr
    assert "4 groups of duplicates among" in result.stderr  # the summary, on stderr beside jsonl


def test_the_hash_alone_does_not_make_near_nor_the_embedding_alone(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    others = unit(np.random.default_rng(99), len(roles["set0"]) - 2, _dim(model))
    inject(model, dict(zip(roles["set0"][2:], others)))  # the variants' embeddings now say other pictures
    records = jsonl(dupes(model, "photos", "-f", "jsonl").stdout)
    assert ("identical", set(roles["set0"][:2])) in groups_by_path(records)
    assert not any(set(roles["set0"][2:]) & {i["path"] for i in r["items"]} for r in records)
    records = jsonl(dupes(model, "photos", "-f", "jsonl", "--max-distance", "0").stdout)
    tiers = {i["path"]: i["tier"] for r in records for i in r["items"]}
    assert tiers[roles["set1"][1]] == "identical" and not set(roles["set1"][2:]) <= set(tiers)


def _pixels(path) -> int:
    with Image.open(path) as im:
        return im.size[0] * im.size[1]


def _dim(model) -> int:
    with IndexStore.open(folder_of(model)) as store:
        return store.dim


def test_similar_only_when_asked_and_by_its_threshold(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles, similar_pairs=[("lone", "twins")])
    plain = groups_by_path(jsonl(dupes(model, "photos", "-f", "jsonl").stdout))
    result = dupes(model, "photos", "-f", "jsonl", "--similar")
    assert result.exit_code == 0, result.stderr
    similar = groups_by_path(jsonl(result.stdout))
    assert ("similar", set(roles["twins"]) | set(roles["lone"])) in similar
    assert ("similar", set(roles["pages"])) in similar  # two white pages at 0.97: the same scene to a model
    assert not any(set(roles["dark"]) & paths for _tier, paths in similar)  # blank frames: bytes only
    assert ("identical", set(roles["twins"])) in plain and ("identical", set(roles["twins"])) not in similar
    strict = groups_by_path(jsonl(dupes(model, "photos", "-f", "jsonl", "--threshold", "0.96").stdout))
    assert ("identical", set(roles["twins"])) in strict and ("similar", set(roles["pages"])) in strict
    record = [r for r in jsonl(result.stdout) if roles["lone"][0] in {i["path"] for i in r["items"]}][0]
    lone = [i for i in record["items"] if i["path"] == roles["lone"][0]][0]
    assert lone["tier"] == "similar" and lone["cosine"] == pytest.approx(0.95, abs=2e-4)


def test_jsonl_records_carry_the_documented_fields(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    records = jsonl(dupes(model, "photos").stdout)  # not a terminal: jsonl
    assert [r["group"] for r in records] == list(range(1, len(records) + 1))
    for r in records:
        assert list(r) == ["group", "tier", "keep", "items"] and r["tier"] in ("identical", "near")
        assert r["items"][0]["path"] == r["keep"] and r["items"][0]["tier"] == "keep"
        for item in r["items"]:
            assert list(item) == ["path", "tier", "cosine", "hamming", "width", "height", "bytes", "taken", "why"]
            assert os.path.isabs(item["path"]) and item["bytes"] == os.path.getsize(item["path"])
            with Image.open(item["path"]) as im:
                w, h = im.size
            turned = item["path"].endswith("rot6.jpg")
            assert (item["width"], item["height"]) == ((h, w) if turned else (w, h))
            assert -1 <= item["cosine"] <= 1 and 0 <= item["hamming"] <= 64


def test_null_output_lists_the_photos_not_kept(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    records = jsonl(dupes(model, "photos").stdout)
    result = dupes(model, "photos", "-0")
    assert result.exit_code == 0
    listed = result.stdout_bytes.split(b"\0")
    assert listed[-1] == b""
    want = [i["path"] for r in records for i in r["items"][1:]]
    assert [os.fsdecode(p) for p in listed[:-1]] == want
    assert not {r["keep"] for r in records} & set(want)
    usage = dupes(model, "photos", "-0", "-f", "jsonl")
    assert usage.exit_code == 2 and "-0 prints NUL-separated paths" in usage.stderr


def test_keep_first_keeps_the_photo_below_the_earliest_folder(photos, model):
    root, roles = photos
    backup = root / "backup"
    shutil.copytree(root / "set0", backup / "set0", copy_function=shutil.copy2)
    result = invoke("index", root, "-m", model, *FP32)
    assert result.exit_code == 0
    for order in (["photos/backup", "photos/set0"], ["photos/set0", "photos/backup"], ["photos/backup", "photos"]):
        records = jsonl(dupes(model, *order, "--keep", "first", "--no-index").stdout)
        first = os.path.realpath(order[0]) + os.sep
        keeps = [r["keep"] for r in records if any(i["path"].startswith(first) for i in r["items"])]
        assert keeps and all(k.startswith(first) for k in keeps)
        others = [i for r in records for i in r["items"][1:]]
        assert any(i["why"] == "found under a path given after the kept one's" for i in others)


def test_the_table_starts_with_the_summary_and_shows_each_group(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    result = dupes(model, "photos", "-f", "table")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("4 groups of duplicates among ") and "(1 identical, 3 near)" in lines[0]
    assert f"{sum(len(roles[f'set{n}']) - 1 for n in range(BASES)) + 1} photos to remove" in lines[0]
    assert [line for line in lines if line.startswith("#")] == [
        "#1 identical, 2 photos", "#2 near, 8 photos", "#3 near, 8 photos", "#4 near, 8 photos"]
    keep_lines = [line for line in lines if line.startswith("  keep ")]
    assert len(keep_lines) == 4 and "photos/alone/twin.jpg" in keep_lines[0]
    assert any("fewer pixels" in line and "half.jpg" in line for line in lines)


def test_the_html_page_shows_the_groups_side_by_side(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    result = dupes(model, "photos", "-o", "dupes.html")
    assert result.exit_code == 0, result.stderr
    page = open("dupes.html", encoding="utf-8").read()
    assert page.count('<section class="group"') == 4 and page.count('class="card kept"') == 4
    assert page.count("data:image/jpeg;base64,") == 2 + 8 * BASES
    assert "default-src 'none'" in page and "http://" not in page and "https://" not in page
    assert "fewer pixels" in page and "4 groups of duplicates among" in page


def test_no_duplicates_is_said_and_exits_zero(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "few").mkdir()
    for k in range(3):
        _save(MAKERS[k](np.random.default_rng(k), (200, 150)), tmp_path / "few" / f"{k}.jpg")
    result = dupes(model, "few", "-f", "table")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "no duplicates among 3 photos\n"
    assert jsonl(dupes(model, "few").stdout) == []


def test_bad_inputs_are_named(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    missing = dupes(model, "nowhere")
    assert missing.exit_code == 2 and "error: nowhere: no such file or folder" in missing.stderr
    none_yet = dupes(model, "empty", "--no-index")
    assert none_yet.exit_code == 1 and "error: there is no index in " in none_yet.stderr
    assert "hint: " in none_yet.stderr
    _save(MAKERS[0](np.random.default_rng(0), (200, 150)), tmp_path / "a.jpg")
    assert invoke("index", "a.jpg", "-m", model, *FP32).exit_code == 0
    elsewhere = dupes(model, "empty", "--no-index")
    assert elsewhere.exit_code == 0 and "warning: empty: no indexed images below this path" in elsewhere.stderr
    nowhere_to_write = dupes(model, "empty", "-o", "no/such/dupes.html")
    assert nowhere_to_write.exit_code == 1 and "the folder no/such does not exist" in nowhere_to_write.stderr
    too_far = dupes(model, "empty", "--threshold", "1.5")
    assert too_far.exit_code == 2 and "--threshold" in too_far.stderr


def test_an_unreadable_folder_is_named_and_the_rest_grouped(photos, model, monkeypatch):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    import altclip_cli.inputs.walk as walk

    real = os.scandir
    locked = str(root / "set1")

    def scandir(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(walk.os, "scandir", scandir)
    result = dupes(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert f"{locked}: cannot list this folder (Permission denied)" in result.stderr
    # what the index holds below it is kept, so its duplicates are still found
    assert len(jsonl(result.stdout)) == 4


# --- moving aside and back (outputs/dupemove.py does the moving; its own tests kill it) ------------------------


def tree(folder) -> dict[str, bytes]:
    """{path below folder: bytes} of every file below it, the aside records left out."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".altclip-dupes" not in p.parts}


def test_move_to_moves_every_photo_not_kept_and_restore_puts_them_back(photos, model, tmp_path):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    before = tree(root)
    records = jsonl(dupes(model, "photos").stdout)
    result = dupes(model, "photos", "--move-to", "aside")
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout) == records  # the groups are printed as without --move-to
    not_kept = {os.path.relpath(i["path"], root) for r in records for i in r["items"][1:]}
    assert set(tree(tmp_path / "aside")) == not_kept
    assert set(tree(root)) == set(before) - not_kept
    assert all(tree(tmp_path / "aside")[p] == before[p] for p in not_kept)
    assert f"moved {len(not_kept)} photos into aside" in result.stderr
    again = dupes(model, "photos", "-f", "jsonl")
    assert again.exit_code == 0 and jsonl(again.stdout) == []  # what is left has no duplicates
    restored = invoke("dupes", "--restore", "aside")
    assert restored.exit_code == 0, restored.stderr
    assert f"restored {len(not_kept)} photos from aside" in restored.stderr
    assert tree(root) == before and tree(tmp_path / "aside") == {}


def test_move_and_restore_refuse_what_would_go_wrong(photos, model):
    root, roles = photos
    inside = dupes(model, "photos", "--move-to", "photos/aside")
    assert inside.exit_code == 2 and "--move-to photos/aside: it is inside " in inside.stderr
    assert not (root / "aside").exists()
    both = invoke("dupes", "photos", "--restore", "aside")
    assert both.exit_code == 2 and "--restore puts photos back; it takes no PATHS" in both.stderr
    nothing = invoke("dupes", "--restore", "nowhere")
    assert nothing.exit_code == 1 and "--restore" in nothing.stderr and "nowhere: no such folder" in nothing.stderr


def test_photos_without_a_hash_are_counted_and_matched_by_bytes_only(photos, model):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    db = sqlite3.connect(folder_of(model) / INDEX_DB)
    try:  # as an index made before hashes were kept holds them
        with db:
            db.execute("UPDATE files SET facts = NULL, phash = NULL, phash_low = NULL WHERE path LIKE ?",
                       (str(root / "set0") + "/%",))
    finally:
        db.close()
    result = dupes(model, "photos", "--no-index")
    assert result.exit_code == 0, result.stderr
    assert "8 photos have no perceptual hash" in result.stderr
    tiers = groups_by_path(jsonl(result.stdout))
    assert ("identical", set(roles["set0"][:2])) in tiers and ("near", set(roles["set1"])) in tiers
    again = dupes(model, "photos")  # indexing reads the facts again
    assert "no perceptual hash" not in again.stderr
    assert ("near", set(roles["set0"])) in groups_by_path(jsonl(again.stdout))


def test_a_name_with_markup_is_shown_as_text_on_the_page(photos, model):
    root, roles = photos
    odd = root / "alone" / 'twin <b>&amp; "2".jpg'
    shutil.copyfile(roles["twins"][0], odd)
    indexed_with_meaning(model, root, roles)
    result = dupes(model, "photos", "-f", "html", "-o", "page.html")
    assert result.exit_code == 0, result.stderr
    page = open("page.html", encoding="utf-8").read()
    assert "<b>" not in page and "twin &lt;b&gt;&amp;amp; &quot;2&quot;.jpg" in page


def test_on_a_terminal_the_table_is_the_default_and_a_page_needs_a_file(photos, model, monkeypatch):
    import altclip_cli.cli.terminal as terminal

    root, roles = photos
    indexed_with_meaning(model, root, roles)
    monkeypatch.setattr(terminal, "isatty", lambda stream: True)
    table = dupes(model, "photos")
    assert table.exit_code == 0 and table.stdout.startswith("4 groups of duplicates among ")
    page = dupes(model, "photos", "-f", "html")
    assert page.exit_code == 2 and "-f html writes a page: give it a file" in page.stderr


def test_a_photo_changed_or_gone_since_it_was_grouped_is_not_moved(photos, model, tmp_path):
    root, roles = photos
    indexed_with_meaning(model, root, roles)
    records = jsonl(dupes(model, "photos").stdout)
    gone, changed = records[1]["items"][1]["path"], records[2]["items"][1]["path"]
    os.unlink(gone)
    with open(changed, "ab") as f:
        f.write(b"\0")
    result = dupes(model, "photos", "--no-index", "--move-to", "aside")  # the index still lists them as they were
    assert result.exit_code == 3, result.stderr
    assert "2 not moved (named above)" in result.stderr and changed in result.stderr and gone in result.stderr
    assert os.path.exists(changed) and not (tmp_path / "aside" / os.path.relpath(changed, root)).exists()


def test_another_run_updating_the_index_is_named_or_waited_for(photos, model):
    root, roles = photos
    assert invoke("index", root, "-m", model, *FP32).exit_code == 0
    with IndexStore.open(folder_of(model), write=True):
        busy = dupes(model, "photos")
        assert busy.exit_code == 1 and "error: another altclip" in busy.stderr
        assert dupes(model, "photos", "--no-index").exit_code == 0  # reading needs no lock


def test_a_folder_whose_name_is_not_utf8_is_named_and_skipped(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    odd = os.fsdecode(b"odd\xff")
    os.mkdir(odd)
    _save(MAKERS[0](np.random.default_rng(0), (200, 150)), os.path.join(odd, "a.jpg"))
    shutil.copyfile(os.path.join(odd, "a.jpg"), os.path.join(odd, "b.jpg"))
    result = dupes(model, odd)
    assert result.exit_code == 0, result.stderr
    assert "odd\ufffd: the folder name is not valid UTF-8" in result.stderr
    assert "no indexed images below this path" in result.stderr and result.stdout == ""


def test_links_to_a_photo_are_the_photo_itself_not_duplicates(photos, model):
    root, roles = photos
    twin = roles["twins"][0]
    os.symlink(twin, root / "link to twin.jpg")
    os.link(roles["lone"][0], root / "lone again.jpg")
    os.symlink(root / "alone", root / "linked folder")  # the same folder under another name
    indexed_with_meaning(model, root, roles)
    result = dupes(model, "photos")
    assert result.exit_code == 0, result.stderr
    listed = {os.path.relpath(i["path"], root) for r in jsonl(result.stdout) for i in r["items"]}
    assert not any("link" in p or "again" in p for p in listed)
    assert ("identical", set(roles["twins"])) in groups_by_path(jsonl(result.stdout))
    assert "paths are other names (a symlink or hard link) of a photo compared: left out" in result.stderr
