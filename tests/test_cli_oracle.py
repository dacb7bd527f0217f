"""The command line's numbers against the oracle (transformers' AltCLIPModel, XLMRobertaTokenizerFast and
CLIPImageProcessorPil, loaded from the same tiny checkpoint), not against altclip's own runtime.

fp32: embeddings within 1e-5; classify prints 6 significant digits, so its probs and logits are compared
with a relative 1e-5. Large JPEGs are read with --exact-decode (the default draft decoding is a deliberate
difference). bf16 is compared with the reference at fp32 with the bounds measured below.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oracle import Reference, require
from test_cli import invoke, jsonl, write_image

require("transformers")

TOL = 1e-5
LABELS = ["a photo of a cat", "一张狗的照片", "une voiture rouge", "صورة قطة"]
TEXTS = ["a cat", "", "一只猫", "une voiture rouge", "фотография кошки 😀"]
LONG = "cat " * 1000  # about 1000 tokens: the model takes 512


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(model folder, Reference) for one tiny random checkpoint written by tests/tiny.py."""
    from tiny import write_model

    folder = write_model(tmp_path_factory.mktemp("oracle") / "tiny")
    return folder, Reference(folder)


@pytest.fixture
def folder(oracle):
    return oracle[0]


@pytest.fixture
def ref(oracle):
    return oracle[1]


@pytest.fixture
def images(tmp_path, monkeypatch):
    """cwd with two PNGs and a JPEG large enough (1000x900) that the default decoding would draft it."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "c.png", 3, size=(37, 90))
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (900, 1000, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    return ["a.png", "c.png", "big.jpg"]


def by_label(record, labels):
    """(probs, logits) of one classify record, in the order of `labels` (the CLI sorts by prob)."""
    scores = {s["label"]: s for s in record["scores"]}
    assert sorted(scores) == sorted(labels)
    return [scores[lab]["prob"] for lab in labels], [scores[lab]["logit"] for lab in labels]


def assert_classify_matches(records, paths, labels, probs, logits):
    assert [r["image"] for r in records] == paths
    for record, p_ref, l_ref in zip(records, probs, logits):
        p, lg = by_label(record, labels)
        assert p == pytest.approx(p_ref.tolist(), rel=TOL, abs=1e-6)
        assert lg == pytest.approx(l_ref.tolist(), rel=TOL, abs=TOL)


# --- classify --------------------------------------------------------------------------------------------

def test_classify_json_probs_and_logits_match_reference(images, folder, ref):
    args = [x for label in LABELS for x in ("-l", label)]
    result = invoke("classify", *images, *args, "-f", "json", "--exact-decode", "-m", folder)
    assert result.exit_code == 0, result.stderr
    probs, logits = ref.classify(images, LABELS)
    assert np.ptp(logits) > 0.1  # the labels score differently: a mix-up of labels would show
    assert_classify_matches(json.loads(result.stdout), images, LABELS, probs, logits)


def test_classify_one_label_prob_is_exactly_one_and_logit_is_the_reference(images, folder, ref):
    result = invoke("classify", "a.png", "-l", "a photo of a cat", "-f", "json", "-m", folder)
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    (score,) = record["scores"]
    assert score["prob"] == 1.0
    _, logits = ref.classify(["a.png"], ["a photo of a cat"])
    assert abs(logits[0, 0]) > 0.01  # a logit of 0 would pass for a missing computation
    assert score["logit"] == pytest.approx(float(logits[0, 0]), rel=TOL, abs=TOL)


def test_classify_label_past_the_token_limit_scores_as_the_reference_truncated_to_512(images, folder, ref):
    labels = [LONG, "dog"]
    assert len(ref.tokenizer(LONG)["input_ids"]) > 600  # really past the limit ...
    assert ref.text_inputs(labels)["input_ids"].shape[1] == 512  # ... and the reference cuts it to 512
    result = invoke("classify", "a.png", "c.png", "-l", LONG, "-l", "dog", "-f", "json", "-m", folder)
    assert result.exit_code == 0, result.stderr
    assert "warning: text 'cat cat" in result.stderr and "truncated to 512" in result.stderr
    probs, logits = ref.classify(["a.png", "c.png"], labels)  # the reference cuts to 512 tokens
    assert_classify_matches(json.loads(result.stdout), ["a.png", "c.png"], labels, probs, logits)


# --- embed -----------------------------------------------------------------------------------------------

def test_embed_text_npy_matches_reference(tmp_path, monkeypatch, folder, ref):
    monkeypatch.chdir(tmp_path)
    texts = TEXTS + [LONG]
    Path("t.txt").write_bytes("\r\n".join(texts).encode() + b"\n")
    result = invoke("embed", "--text", "t.txt", "-o", "t.npy", "-m", folder)
    assert result.exit_code == 0, result.stderr
    ours = np.load("t.npy")
    assert ours.shape == (len(texts), 16) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.text_embeddings(texts), atol=TOL, rtol=0)


def test_embed_text_jsonl_on_stdout_matches_reference(folder, ref):
    result = invoke("embed", "--text", "-", "-m", folder, input="".join(t + "\n" for t in TEXTS))
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["text"] for r in records] == TEXTS
    ours = np.array([r["embedding"] for r in records], dtype=np.float32)
    np.testing.assert_allclose(ours, ref.text_embeddings(TEXTS), atol=TOL, rtol=0)


def test_embed_image_npy_matches_reference(images, folder, ref):
    result = invoke("embed", "--image", *images, "-o", "i.npy", "--exact-decode", "-m", folder)
    assert result.exit_code == 0, result.stderr
    ours = np.load("i.npy")
    assert ours.shape == (len(images), 16) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.image_embeddings(images), atol=TOL, rtol=0)


def test_embed_image_unnormalised_npy_matches_reference(images, folder, ref):
    result = invoke("embed", "--image", *images, "-o", "i.npy", "--no-normalize", "--exact-decode", "-m", folder)
    assert result.exit_code == 0, result.stderr
    expected = ref.image_embeddings(images, normalize=False)
    assert not np.allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.load("i.npy"), expected, atol=TOL, rtol=TOL)


def test_embed_image_jsonl_on_stdout_matches_reference(images, folder, ref):
    result = invoke("embed", "--image", *images, "--exact-decode", "-m", folder)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [(r["row"], r["image"]) for r in records] == list(enumerate(images))
    ours = np.array([r["embedding"] for r in records], dtype=np.float32)
    np.testing.assert_allclose(ours, ref.image_embeddings(images), atol=TOL, rtol=0)


# --- bf16 against the fp32 reference ---------------------------------------------------------------------
# Measured through the CLI on these inputs (tiny model, torch 2.13, a 2-core x86 CPU with avx512_bf16):
# 1 - cosine at most 1.4e-5 for the texts and 4.5e-6 for the images; logits off by at most 0.066 and
# probabilities by 0.0027 (the logits span -1.04..1.29). The bounds are 4-7 times the worst of those; fp32
# is within 2e-6 of the reference, so each test also checks that the run really was not fp32.
BF16_MAX_ONE_MINUS_COSINE = 1e-4
BF16_MAX_LOGIT_ERROR = 0.25
BF16_MAX_PROB_ERROR = 0.02


def cosines(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_bf16_text_embeddings_close_to_reference_fp32(tmp_path, monkeypatch, folder, ref):
    monkeypatch.chdir(tmp_path)
    texts = TEXTS + [LONG]
    Path("t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = invoke("embed", "--text", "t.txt", "-o", "t.npy", "--precision", "bf16", "-m", folder)
    assert result.exit_code == 0, result.stderr
    ours, expected = np.load("t.npy"), ref.text_embeddings(texts)
    assert ours.dtype == np.float32
    assert not np.allclose(ours, expected, atol=1e-6)  # really bf16: fp32 would be within 1e-6
    assert 1 - cosines(ours, expected).min() <= BF16_MAX_ONE_MINUS_COSINE


def test_bf16_image_embeddings_close_to_reference_fp32(images, folder, ref):
    result = invoke("embed", "--image", *images, "-o", "i.npy", "--exact-decode", "--precision", "bf16",
                    "-m", folder)
    assert result.exit_code == 0, result.stderr
    ours, expected = np.load("i.npy"), ref.image_embeddings(images)
    assert not np.allclose(ours, expected, atol=1e-6)
    assert 1 - cosines(ours, expected).min() <= BF16_MAX_ONE_MINUS_COSINE


def test_bf16_classify_close_to_reference_fp32(images, folder, ref):
    args = [x for label in LABELS for x in ("-l", label)]
    result = invoke("classify", *images, *args, "-f", "json", "--exact-decode", "--precision", "bf16",
                    "-m", folder)
    assert result.exit_code == 0, result.stderr
    probs, logits = ref.classify(images, LABELS)
    records = json.loads(result.stdout)
    got = [by_label(r, LABELS) for r in records]
    ours_p, ours_l = np.array([g[0] for g in got]), np.array([g[1] for g in got])
    assert np.abs(ours_l - logits).max() > 1e-3  # really bf16: fp32 agrees to 6 digits
    assert np.abs(ours_l - logits).max() <= BF16_MAX_LOGIT_ERROR
    assert np.abs(ours_p - probs).max() <= BF16_MAX_PROB_ERROR


# --- the oracle's import rule ----------------------------------------------------------------------------

@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("1", "fail"), ("", "skip"), ("false", "skip"),
                                         (None, "skip")])
def test_a_missing_oracle_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="altclip_no_such_oracle"):
        require("altclip_no_such_oracle")
    assert require("json") is json
