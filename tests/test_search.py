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
