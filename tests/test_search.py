"""`altclip search`: query parsing and the query vector, exact chunked top-k, and the command end to
end on the tiny model (ranking against the reference implementation, --dir, formats, bad input,
a real pipeline)."""
from __future__ import annotations

import numpy as np
import pytest

from altclip_cli.search.query import (QueryError, QueryPart, combine, describe, is_image_query, parse_part,
                                      parse_query, split_weight)
from altclip_cli.search.rank import ExactRanker, top_k


# --- query parsing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, weight, rest", [
    ("2:sunset", 2.0, "sunset"),
    ("0.5:a cat", 0.5, "a cat"),
    (".5:a cat", 0.5, "a cat"),
    ("2.:a cat", 2.0, "a cat"),
    ("10:x", 10.0, "x"),
    ("sunset", 1.0, "sunset"),
    ("1:2:00 pm", 1.0, "2:00 pm"),   # the way to search for a text that starts with W:
    ("a:b", 1.0, "a:b"),
    ("-2:x", 1.0, "-2:x"),           # no sign in a weight: --subtract says minus
    (" 2:x", 1.0, " 2:x"),           # the weight is at the very start
    ("2 :x", 1.0, "2 :x"),
    ("1.2.3:x", 1.0, "1.2.3:x"),
    (".:x", 1.0, ".:x"),
    ("2:", 2.0, ""),
])
def test_weights_follow_rclips_syntax(given, weight, rest):
    assert split_weight(given) == (weight, rest)


@pytest.mark.parametrize("value, image", [
    ("a dog on a beach", False),
    ("./dog.jpg", True),
    ("photos/dog.jpg", True),
    ("/abs/dog.png", True),
    ("~/dog.jpg", True),
    ("~dog", True),
    ("https://example.org/dog.jpg", True),
    ("HTTP://example.org/dog.jpg", True),
    ("dog.jpg", False),                 # no slash: text (a file in cwd is ./dog.jpg)
    ("AC/DC", True),                    # the rule is the rule: a slash means a path
    ("a ~ b", False),
    ("ftp:dog", False),
    ("猫", False),
])
def test_image_detection(value, image):
    assert is_image_query(value) is image
    assert parse_part(value).is_image is image


def test_parse_query_orders_parts_and_signs_weights():
    parts = parse_query("2:golden retriever", add=["./pool.jpg"], subtract=[".5:fruit", "~/x.png"])
    assert parts == [
        QueryPart("golden retriever", 2.0, False, "2:golden retriever", "QUERY"),
        QueryPart("./pool.jpg", 1.0, True, "./pool.jpg", "-a"),
        QueryPart("fruit", -0.5, False, ".5:fruit", "-s"),
        QueryPart("~/x.png", -1.0, True, "~/x.png", "-s"),
    ]
    assert describe(parts) == "2:golden retriever + ./pool.jpg - 0.5:fruit - ~/x.png"
    assert parse_query("https://h/x.jpg")[0].is_url and not parse_query("./x.jpg")[0].is_url


@pytest.mark.parametrize("query, add, subtract, expect", [
    ("", (), (), "the query '' is empty"),
    ("   ", (), (), "the query '   ' is empty"),
    ("2:", (), (), "the query '2:' has a weight but nothing after it"),
    ("cat", ("",), (), "-a '' is empty"),
    ("cat", (), (" \t",), "-s ' \\t' is empty"),
    ("cat", ("1.5: ",), (), "-a '1.5: ' has a weight but nothing after it"),
])
def test_empty_parts_are_usage_errors(query, add, subtract, expect):
    with pytest.raises(QueryError) as info:
        parse_query(query, add, subtract)
    assert info.value.usage and info.value.message == expect and info.value.hint


# --- the query vector ------------------------------------------------------------------------------------

def test_query_vector_is_the_normalised_weighted_sum_of_normalised_parts():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((3, 16)) * np.array([[3.0], [0.1], [7.0]])  # norms that must not matter
    got = combine(v.astype(np.float32), [2.0, 1.0, -0.5])
    units = v / np.linalg.norm(v, axis=1, keepdims=True)
    want = 2 * units[0] + units[1] - 0.5 * units[2]
    want /= np.linalg.norm(want)
    assert got.dtype == np.float32 and got.shape == (16,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert abs(np.linalg.norm(got) - 1) < 1e-6
    # One part: its own direction, whatever the weight.
    np.testing.assert_allclose(combine(v[:1], [5.0]), units[0], atol=1e-6)
    # A subtracted part moves the query away from it.
    assert combine(v[:2], [1, -1]) @ units[1] < combine(v[:1], [1]) @ units[1]


def test_parts_that_cancel_out_are_a_usage_error():
    v = np.ones((2, 4), np.float32)
    with pytest.raises(QueryError) as info:
        combine(v, [1.0, -1.0])
    assert info.value.usage and "cancel out" in info.value.message
    with pytest.raises(QueryError):
        combine(v[:1], [0.0])


# --- exact chunked top-k ---------------------------------------------------------------------------------

def _full_sort(vectors, q, k, rows=None):
    """The obvious answer: every entry's score, sorted by (-score, vector row, entry)."""
    rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
    s = vectors[rows] @ q
    order = np.lexsort((np.arange(len(rows)), rows, -s))[:k]
    return order, rows[order], s[order]


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 101, 5000])
@pytest.mark.parametrize("k", [1, 3, 50, 99, 100, 101, 1000])
def test_chunked_top_k_equals_a_full_sort_with_ties(chunk, k):
    # Small integers: every dot product is exact in float32, so there are many exact ties and the
    # tie order (lowest row first) is tested, not just the set.
    rng = np.random.default_rng(chunk * 1000 + k)
    vectors = rng.integers(-2, 3, (100, 6)).astype(np.float32)
    queries = rng.integers(-2, 3, (3, 6)).astype(np.float32)
    hits = ExactRanker(vectors, chunk_rows=chunk).top_k(queries, k)
    assert hits.rows.shape == hits.scores.shape == hits.positions.shape == (3, min(k, 100))
    assert hits.rows.dtype == np.int64 and hits.scores.dtype == np.float32
    for j in range(3):
        _, rows, scores = _full_sort(vectors, queries[j], k)
        assert np.array_equal(hits.rows[j], rows)
        assert np.array_equal(hits.positions[j], rows)
        assert np.array_equal(hits.scores[j], scores)
    assert len(np.unique(vectors @ queries[0])) < 30  # the data really has ties


@pytest.mark.parametrize("chunk", [1, 5, 16, 17, 64])
def test_top_k_over_some_entries_in_any_order_with_repeats(chunk):
    """`rows` as an index snapshot gives them: one entry per file, in no particular order, and
    files with the same content sharing a vector row."""
    rng = np.random.default_rng(chunk)
    vectors = rng.integers(-2, 3, (64, 5)).astype(np.float32)
    q = rng.integers(-2, 3, 5).astype(np.float32)
    subsets = [rng.choice(64, 20, replace=False),                 # scattered, unsorted
               np.arange(16, 48),                                  # one run: a view, no copy
               np.arange(0, 64, 10),                               # sparse: gathered
               rng.permutation(np.arange(40)),                     # dense, unsorted: scored in place
               np.array([5, 9, 5, 30, 9, 9, 63, 0]),               # repeats (duplicate files)
               rng.integers(0, 64, 100),                           # more entries than vectors
               np.array([63]), np.array([0, 63])]
    for rows in subsets:
        for k in (1, 5, len(rows), len(rows) + 3):
            hits = top_k(vectors, q, k, rows, chunk_rows=chunk)
            positions, want_rows, want_scores = _full_sort(vectors, q, k, rows)
            assert np.array_equal(hits.positions[0], positions)
            assert np.array_equal(hits.rows[0], want_rows)
            assert np.array_equal(hits.scores[0], want_scores)
            assert np.array_equal(rows[hits.positions[0]], hits.rows[0])


def test_top_k_on_float_data_and_a_memmap(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((1000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    path = tmp_path / "vectors.f32"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(1000, 32))
    q = rng.standard_normal((4, 32)).astype(np.float32)
    hits = ExactRanker(mm, chunk_rows=128).top_k(q, 10)
    for j in range(4):
        full = data @ q[j]
        order = np.argsort(-full, kind="stable")[:10]
        assert np.array_equal(hits.rows[j], order)
        np.testing.assert_allclose(hits.scores[j], full[order], rtol=0, atol=1e-5)


def test_top_k_edge_cases():
    vectors = np.eye(4, dtype=np.float32)
    q = np.array([0, 1, 0, 0], np.float32)
    hits = top_k(vectors, q, 10, rows=np.array([], np.int64))
    assert hits.rows.shape == hits.positions.shape == hits.scores.shape == (1, 0)
    hits = top_k(np.zeros((0, 4), np.float32), q, 3)
    assert hits.rows.shape == (1, 0)
    # NaN (a damaged vector) ranks last, not first.
    bad = vectors.copy()
    bad[0] = np.nan
    assert top_k(bad, np.ones(4, np.float32), 4).rows[0].tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError):
        top_k(vectors, q, 0)
    with pytest.raises(ValueError):
        top_k(vectors, np.ones(3, np.float32), 1)
    for outside in ([4], [0, -1]):
        with pytest.raises(IndexError):
            top_k(vectors, q, 1, rows=np.array(outside))


# --- the command, end to end on the tiny model -----------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from test_cli import SAFE_ENV, _altclip_cmd, invoke, jsonl, write_image  # noqa: E402

# Sizes and formats of a small gallery: PNGs and JPEGs, portrait and landscape, tiny to 640 px.
GALLERY = [("beach.png", (64, 48)), ("dog.jpg", (320, 240)), ("cat.png", (100, 100)), ("car.jpg", (640, 480)),
           ("tree.png", (37, 91)), ("house.jpg", (480, 640)), ("cake.png", (200, 120)), ("boat.jpg", (90, 60)),
           ("river.png", (300, 299)), ("bike.jpg", (123, 321)), ("moon.png", (16, 16)), ("hill.jpg", (500, 250))]


@pytest.fixture(scope="module")
def reference(tiny_loaded):
    from oracle import Reference

    return Reference(tiny_loaded[0])


@pytest.fixture
def gallery(tmp_path, monkeypatch):
    """cwd = tmp_path with photos/ (the 12 GALLERY images, random pixels and shapes)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(7)
    for i, (name, (w, h)) in enumerate(GALLERY):
        base = rng.integers(0, 256, (1, 1, 3))
        noise = rng.integers(-60, 61, (h, w, 3))
        pixels = np.clip(base + noise + np.linspace(0, 80 * (i % 3), w)[None, :, None], 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    return root


def real(path) -> str:
    return os.path.realpath(path)


def search(*args, model, env=None):
    return invoke("search", *args, "-m", model, env=env)


def ok(result) -> list[dict]:
    assert result.exit_code == 0, result.stderr
    return jsonl(result.stdout)


def test_ranking_equals_the_reference_implementation(gallery, model, reference):
    """Index and search through the command line; rank again by cosine with transformers'
    AltCLIPModel's own embeddings of the same files and of the query text."""
    records = ok(search("a red car on a road", "--dir", "photos", "-k", "50", "--exact-decode", model=model))
    paths = [real(gallery / name) for name, _ in GALLERY]
    want = (reference.image_embeddings(paths) @ reference.text_embeddings(["a red car on a road"])[0])
    _same_ranking(records, paths, want)


def test_a_weighted_query_with_an_image_equals_the_reference(gallery, model, reference):
    """2:text + image - 0.5:text, as the reference computes each part, summed and normalised."""
    records = ok(search("2:a red car", "-a", "./photos/cake.png", "-s", ".5:a cat", "--dir", "photos", "-k", "12",
                        "--exact-decode", model=model))
    paths = [real(gallery / name) for name, _ in GALLERY]
    texts = reference.text_embeddings(["a red car", "a cat"])
    image = reference.image_embeddings([str(gallery / "cake.png")])[0]
    q = 2 * texts[0] + image - 0.5 * texts[1]
    q /= np.linalg.norm(q)
    _same_ranking(records, paths, reference.image_embeddings(paths) @ q)
    assert records[0]["path"] == real(gallery / "cake.png")  # the image itself is the best match here


def test_the_library_search_is_the_commands(gallery, tiny_loaded):
    """altclip_cli.search.search: the same index (kept up to date first) and the same ranking as
    `altclip search` at the same precision."""
    from altclip_cli.search import search as library_search

    folder, loaded = tiny_loaded
    records = ok(invoke("search", "2:a red car", "-s", "a cat", "--dir", "photos", "-k", "50", "-m", folder,
                        "--precision", "fp32", "--index", "by-command"))
    hits = library_search(loaded, "2:a red car", "photos", subtract=["a cat"], top=50, index="by-library")
    assert [h.path for h in hits] == [r["path"] for r in records] and len(hits) == len(GALLERY)
    assert [h.rank for h in hits] == [r["rank"] for r in records]
    assert [h.score for h in hits] == pytest.approx([r["score"] for r in records], abs=6e-5)  # records: 4 decimals
    again = library_search(loaded, "2:a red car", "photos", subtract=["a cat"], top=3, index="by-command",
                           update=False)  # the command's index, as it is
    assert [h.path for h in again] == [r["path"] for r in records[:3]]


def _same_ranking(records, paths, want_scores):
    """Every image once, each score within 1e-4 of the reference's, and in the reference's order
    (where two reference scores are closer than 1e-4 either order is right)."""
    assert [r["rank"] for r in records] == list(range(1, len(paths) + 1))
    assert sorted(r["path"] for r in records) == sorted(paths)
    ref = dict(zip(paths, want_scores.tolist()))
    for r in records:
        assert abs(r["score"] - ref[r["path"]]) <= 1e-4 + 5e-5  # + rounding to 4 decimals
    in_order = [ref[r["path"]] for r in records]
    np.testing.assert_allclose(in_order, sorted(want_scores.tolist(), reverse=True), atol=1e-4, rtol=0)
    assert len(set(np.round(want_scores, 4))) > 6  # the scores really differ: the order is tested


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """cwd with photos/{a,b}.png, photos/sub/c.png, photos2/d.png (a sibling with a common name
    prefix) and other/e.png."""
    monkeypatch.chdir(tmp_path)
    for i, rel in enumerate(["photos/a.png", "photos/b.png", "photos/sub/c.png", "photos2/d.png", "other/e.png"]):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_image(tmp_path / rel, i + 10)
    return tmp_path


def test_dir_restricts_the_search_to_its_subtree(folders, model):
    everything = ok(search("a dog", "-k", "100", model=model))  # --dir . indexes all five
    assert len(everything) == 5
    for args in (["--dir", "photos"], ["--dir", "photos", "--no-index"], ["--dir", "./photos/", "--no-index"]):
        got = {r["path"] for r in ok(search("a dog", "-k", "100", *args, model=model))}
        assert got == {real(folders / p) for p in ("photos/a.png", "photos/b.png", "photos/sub/c.png")}, args
    got = [r["path"] for r in ok(search("a dog", "-k", "100", "--dir", "photos2", "--no-index", model=model))]
    assert got == [real(folders / "photos2/d.png")]
    # The same scores as the search over everything: one index, one ranking, restricted.
    scores = {r["path"]: r["score"] for r in everything}
    for r in ok(search("a dog", "-k", "100", "--dir", "photos/sub", model=model)):
        assert r["score"] == scores[r["path"]]


def test_min_score_and_top(gallery, model):
    full = ok(search("a boat", "-k", "50", "--dir", "photos", model=model))
    cut = (full[2]["score"] + full[3]["score"]) / 2
    assert full[2]["score"] > full[3]["score"]
    got = ok(search("a boat", "-k", "50", "--min-score", str(cut), "--dir", "photos", model=model))
    assert got == full[:3]
    assert ok(search("a boat", "-k", "2", "--dir", "photos", model=model)) == full[:2]
    result = search("a boat", "--min-score", "0.99", "--dir", "photos", model=model)
    assert (result.exit_code, result.stdout) == (0, "")
    assert "no image scores 0.99 or more" in result.stderr


def test_scores_are_cosines_and_a_copy_ranks_with_its_original(gallery, model):
    shutil.copy(gallery / "dog.jpg", gallery / "dog copy.jpg")
    records = ok(search("./photos/dog.jpg", "-k", "50", "--dir", "photos", model=model))
    assert [r["score"] for r in records[:2]] == [1.0, 1.0]  # the query image and its copy
    assert {r["path"] for r in records[:2]} == {real(gallery / "dog.jpg"), real(gallery / "dog copy.jpg")}
    assert all(-1 <= r["score"] <= 1 for r in records) and len(records) == 13


def test_every_format(gallery, model, monkeypatch):
    args = ("a dog", "--dir", "photos", "-k", "5")
    lines = search(*args, "-f", "jsonl", model=model).stdout.splitlines()
    assert len(lines) == 5
    records = [json.loads(line) for line in lines]
    for i, (line, r) in enumerate(zip(lines, records), start=1):
        assert list(r) == ["rank", "path", "score", "taken"] and r["rank"] == i  # no EXIF: the file's time
        assert re.fullmatch(r'\{"rank": \d+, "path": "[^"]+", "score": -?\d\.\d{1,4}, "taken": "[^"]+"\}', line), line
        assert os.path.isabs(r["path"]) and os.path.isfile(r["path"])
        assert r["score"] == round(r["score"], 4)
    assert search(*args, model=model).stdout.splitlines() == lines  # jsonl when piped

    result = search(*args, "-f", "json", model=model)
    assert json.loads(result.stdout) == records and result.stdout.startswith("[\n{")
    assert search(*args, "-f", "tsv", model=model).stdout == "".join(
        f"{r['score']:.4f}\t{r['path']}\n" for r in records)
    assert search(*args, "-f", "paths", model=model).stdout == "".join(f"{r['path']}\n" for r in records)
    assert search(*args, "-0", model=model).stdout == "".join(f"{r['path']}\0" for r in records)
    assert search(*args, "-0", "-f", "paths", model=model).stdout == "".join(f"{r['path']}\0" for r in records)

    from altclip_cli.cli import terminal

    monkeypatch.setattr(terminal, "isatty", lambda stream: True)
    table = search(*args, model=model).stdout.splitlines()
    assert table[0].split() == ["rank", "score", "path"]
    rows = [line.split() for line in table[2:]]
    assert rows == [[str(r["rank"]), f"{r['score']:.4f}", os.path.relpath(r["path"], real("."))] for r in records]


def test_output_file_and_tsv_escapes(gallery, model):
    odd = gallery / "tab\there.png"
    shutil.copy(gallery / "moon.png", odd)
    result = search("./photos/moon.png", "--dir", "photos", "-k", "2", "-f", "tsv", "-o", "out.tsv", model=model)
    assert (result.exit_code, result.stdout) == (0, "")
    lines = Path("out.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[1] for line in lines) == sorted(
        [real(gallery / "moon.png"), real(gallery).replace("\\", "\\\\") + "/tab\\there.png"])
    assert all(line.count("\t") == 1 for line in lines)
    result = search("a dog", "--dir", "photos", "-o", "out.jsonl", model=model)
    assert result.stdout == "" and len(jsonl(Path("out.jsonl").read_text())) == 10


@pytest.mark.parametrize("fmt", ["jsonl", "html"])
def test_an_output_into_a_missing_folder_fails_before_any_indexing(gallery, model, tmp_path, fmt):
    from altclip_cli.paths import default_index_folder
    from altclip_cli.search.update import model_identity

    out = f"missing/out.{fmt}"
    result = search("a dog", "--dir", "photos", "-o", out, model=model)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: cannot write {out}: the folder missing does not exist",
                                          "hint: create it first (mkdir -p missing)"]
    assert not default_index_folder(model_identity(str(model))["weights"]).exists()  # nothing was indexed


def test_an_unchanged_tree_needs_only_the_text_tower(gallery, model, monkeypatch):
    from altclip_cli.runtime.altclip import AltCLIP

    assert ok(search("a dog", "--dir", "photos", model=model))
    images = []
    real_encode = AltCLIP.encode_pixel_batch
    monkeypatch.setattr(AltCLIP, "encode_pixel_batch", lambda self, px: images.append(len(px)) or real_encode(self, px))
    first = search("a dog", "--dir", "photos", model=model)
    assert images == [] and first.stderr == ""  # nothing indexed, nothing said
    write_image(gallery / "new.png", 99)
    result = search("a dog", "--dir", "photos", "-k", "50", model=model)
    assert images == [1] and "indexed photos: 1 added" in result.stderr
    assert real(gallery / "new.png") in {r["path"] for r in ok(result)}
    os.unlink(gallery / "new.png")
    assert real(gallery / "new.png") in {r["path"] for r in ok(search("a dog", "--dir", "photos", "-k", "50",
                                                                   "--no-index", model=model))}
    assert real(gallery / "new.png") not in {r["path"] for r in ok(search("a dog", "--dir", "photos", "-k", "50",
                                                                       model=model))}


def test_an_index_inside_the_folder_still_gives_absolute_paths(gallery, model):
    records = ok(search("a dog", "--dir", "photos", "--index", "photos/.index", "-k", "50", model=model))
    assert len(records) == 12 and all(os.path.isfile(r["path"]) and os.path.isabs(r["path"]) for r in records)
    from altclip_cli.search.store import IndexStore

    with IndexStore.open(gallery / ".index") as store:
        assert store.relative  # stored relative to the index, shown absolute
    os.chdir("photos")
    again = ok(search("a dog", "--dir", ".", "--index", ".index", "-k", "50", "--no-index", model=model))
    assert again == records


@pytest.mark.parametrize("args, code, error, hint", [
    (["", "--dir", "photos"], 2, "error: the query '' is empty", "hint: give a text"),
    (["  ", "--dir", "photos"], 2, "error: the query '  ' is empty", "hint: give a text"),
    (["dog", "-a", "3:"], 2, "error: -a '3:' has a weight but nothing after it", "hint: give a text"),
    (["dog", "-k", "0"], 2, "error: Invalid value for '-k' / '--top': 0 is not in the range x>=1.",
     "hint: see 'altclip search --help'"),
    (["dog", "--dir", "nowhere"], 2, "error: --dir nowhere: no such folder", "hint: give --dir an existing folder"),
    (["dog", "--dir", "photos/dog.jpg"], 2, "error: --dir photos/dog.jpg: is not a folder", "hint: give --dir"),
    (["dog", "-0", "-f", "json"], 2, "error: -0 prints NUL-separated paths; it does not go with -f json",
     "hint: leave out -f"),
    (["./photos/missing.jpg", "--dir", "photos"], 1, "error: query image ./photos/missing.jpg: no such file",
     "hint: a query that contains a / or starts with ~ is an image"),
    (["dog", "-s", "./photos/notes.png", "--dir", "photos"], 1,
     "error: query image ./photos/notes.png: not an image, or in a format Pillow cannot read",
     "hint: a query that contains a / or starts with ~ is an image"),
    (["dog", "-s", "dog", "--dir", "photos"], 2, "error: the query's parts cancel out (their weighted sum is zero)",
     "hint: change a weight"),
    (["dog", "--dir", "photos", "--no-index", "--index", "noindex"], 1, "error: there is no index in",
     "hint: leave out --no-index to build it now"),
])
def test_bad_input(gallery, model, args, code, error, hint):
    (gallery / "notes.png").write_text("these are my notes, not a picture")
    result = search(*args, model=model)
    assert result.exit_code == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-2].startswith(error) and lines[-1].startswith(hint), lines


def test_html_needs_a_file_on_a_terminal(gallery, model, monkeypatch):
    from altclip_cli.cli import terminal

    monkeypatch.setattr(terminal, "isatty", lambda stream: True)
    result = search("a dog", "--dir", "photos", "-f", "html", model=model)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: -f html writes a page: give it a file",
                                          "hint: add -o results.html (or pipe the output)"]


def test_paths_through_xargs_0_in_a_real_pipeline(gallery, tmp_path, model):
    """altclip search ... -f paths -0 | xargs -0 cp -t picked/ : names with spaces, quotes and a
    newline arrive whole."""
    odd = ["with space.png", "new\nline.png", "quote's \"x\".png"]
    for i, name in enumerate(odd):
        write_image(gallery / name, 50 + i)
    (tmp_path / "picked").mkdir()
    env = {**os.environ, **SAFE_ENV}
    cmd = " ".join(_altclip_cmd())
    script = (f'set -o pipefail; {cmd} search "a dog" --dir photos -k 100 -f paths -0 -q -m "$MODEL" '
              f'| xargs -0 cp -t picked --')
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**env, "MODEL": str(model)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert sorted(os.listdir(tmp_path / "picked")) == sorted([name for name, _ in GALLERY] + odd)
    for name in odd:
        assert (tmp_path / "picked" / name).read_bytes() == (gallery / name).read_bytes()


def test_another_writer_holding_the_index(gallery, model, tiny_loaded):
    """An `altclip index` run holding the index: search says so (exit 1); --no-index searches what
    is committed."""
    from altclip_cli.paths import default_index_folder
    from altclip_cli.search.store import IndexStore
    from altclip_cli.search.update import index_identity

    first = ok(search("a dog", "--dir", "photos", model=model))
    loaded = tiny_loaded[1]
    folder = default_index_folder(loaded.weights_id)
    with IndexStore.open(folder, identity=index_identity(loaded), write=True, writer="altclip index"):
        for extra in ([], ["--wait", "0.2"]):
            result = search("a dog", "--dir", "photos", *extra, model=model)
            assert result.exit_code == 1 and result.stdout == ""
            assert re.match(r"error: another altclip index \(pid \d+\) is updating ", result.stderr)
        assert ok(search("a dog", "--dir", "photos", "--no-index", model=model)) == first  # readers go on


def test_interrupted_while_indexing(gallery, model, monkeypatch):
    import altclip_cli.search.run as run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "update_index", interrupted)
    result = search("a dog", "--dir", "photos", model=model)
    assert (result.exit_code, result.stdout) == (130, "")
    assert result.stderr.splitlines() == ["error: interrupted; the index keeps what was done",
                                          "hint: run the same command again to go on"]
