"""Bad inputs through the command line (issue 4's table): each one is named on stderr and in the
output, the other inputs are processed and correct, and the exit code is 3. Everything is
generated here; nothing is downloaded."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_cli import invoke, jsonl, write_image
from urlserver import serve


@pytest.fixture
def ref_model(tiny_loaded):
    return tiny_loaded


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "good1.png", 1)
    write_image(tmp_path / "good2.jpg", 2)
    return tmp_path


def _truncated_jpeg(path: Path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _make_bad(kind: str, folder: Path) -> tuple[str, list[str]]:
    """Create one bad input; returns (the IMAGES argument, the extra options it needs)."""
    if kind == "truncated jpeg":
        _truncated_jpeg(folder / "cut.jpg")
        return "cut.jpg", []
    if kind == "zero bytes":
        (folder / "zero.jpg").write_bytes(b"")
        return "zero.jpg", []
    if kind == "text named .jpg":
        (folder / "text.jpg").write_text("hello")
        return "text.jpg", []
    if kind == "unsupported format":
        (folder / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
        return "drawing.svg", []
    if kind == "folder without images":
        (folder / "empty").mkdir()
        (folder / "empty" / "notes.txt").write_text("x")
        return "empty", []
    if kind == "broken symlink":
        os.symlink("nowhere.jpg", folder / "broken.jpg")
        return "broken.jpg", []
    if kind == "missing file":
        return "missing.jpg", []
    if kind == "decompression bomb":
        Image.new("RGB", (200, 100), "white").save(folder / "bomb.png")
        return "bomb.png", ["--max-pixels", "10000"]
    if kind == "no glob match":
        return "nothing-*.jpg", []
    raise ValueError(kind)


BAD = {
    "truncated jpeg": "the file is truncated or damaged",
    "zero bytes": "the file is empty (zero bytes)",
    "text named .jpg": "not an image, or in a format Pillow cannot read",
    "unsupported format": "not an image, or in a format Pillow cannot read",
    "broken symlink": "no such file",
    "missing file": "no such file",
    "decompression bomb": "image has 20,000 pixels, over the limit of 10,000 pixels",
    "no glob match": "no files match this pattern",
}


def test_folder_without_images_is_a_warning_and_the_others_are_done(work, ref_model):
    folder, ref = ref_model
    arg, _ = _make_bad("folder without images", work)
    result = invoke("embed", "--image", "good1.png", arg, "good2.jpg", "-o", "x.npy", "-m", folder)
    assert result.exit_code == 0, result.stderr
    assert f"warning: {arg}: no images in this folder" in result.stderr
    assert "error:" not in result.stderr
    assert [r["row"] for r in jsonl(Path("x.jsonl").read_text())] == [0, 1]
    assert np.load("x.npy").shape[0] == 2


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_image_input_is_named_and_the_others_are_done(work, ref_model, kind):
    folder, ref = ref_model
    arg, options = _make_bad(kind, work)
    result = invoke("embed", "--image", "good1.png", arg, "good2.jpg", *options, "-o", "x.npy", "-m", folder)
    assert result.exit_code == 3, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"error: {arg}: ")
    assert BAD[kind] in error_lines[0]
    sidecar = jsonl(Path("x.jsonl").read_text())
    assert [r["row"] for r in sidecar] == [0, None, 1]
    assert sidecar[1]["image"] == arg and BAD[kind] in sidecar[1]["error"]
    from altclip_cli.inputs.images import open_image

    expected = ref.encode_images([open_image("good1.png"), open_image("good2.jpg")])
    np.testing.assert_allclose(np.load("x.npy"), expected, atol=1e-5)

    classified = invoke("classify", "good1.png", arg, *options, "-l", "x", "-l", "y", "-f", "json", "-m", folder)
    assert classified.exit_code == 3
    records = json.loads(classified.stdout)
    assert "scores" in records[0] and records[1]["image"] == arg and BAD[kind] in records[1]["error"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_permission_denied_file(work, ref_model):
    (work / "secret.jpg").write_bytes(b"x")
    (work / "secret.jpg").chmod(0)
    result = invoke("classify", "good1.png", "secret.jpg", "-l", "x", "-m", ref_model[0])
    assert result.exit_code == 3
    assert "error: secret.jpg: permission denied" in result.stderr


def _unusual_images(folder: Path) -> list[str]:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)).save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).convert("1").save(folder / "bilevel.gif")
    Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(folder / "huge.jpg", quality=50)
    return ["deep16.png", "cmyk.jpg", "palette.png", "alpha.png", "bilevel.gif", "huge.jpg"]


def test_unusual_but_valid_images_all_work(work, ref_model):
    names = _unusual_images(work)
    result = invoke("embed", "--image", *names, "-o", "u.npy", "-m", ref_model[0])
    assert result.exit_code == 0, result.stderr
    assert np.load("u.npy").shape == (len(names), 16)
    assert [r["image"] for r in jsonl(Path("u.jsonl").read_text())] == names


def test_symlink_loop_in_a_recursive_walk_is_a_warning_not_a_failure(work, ref_model):
    (work / "album").mkdir()
    write_image(work / "album" / "x.png", 7)
    os.symlink("../album", work / "album" / "up")
    result = invoke("classify", "album", "-r", "-l", "x", "-m", ref_model[0])
    assert result.exit_code == 0, result.stderr
    assert [r["image"] for r in jsonl(result.stdout)] == ["album/x.png"]
    assert "warning: album/up: folder already visited (a symlink loop?), skipped" in result.stderr


# --- URLs ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with serve() as url:
        yield url


def test_urls_good_and_bad(work, ref_model, server):
    urls = [server + p for p in ("/cat.png", "/loop", "/huge", "/slow", "/gone.png")]
    result = invoke("classify", *urls, "-l", "x", "-l", "y", "-f", "json", "--url-timeout", "1",
                    "--url-max-mb", "1", "-m", ref_model[0])
    assert result.exit_code == 3, result.stderr
    records = json.loads(result.stdout)
    assert [r["image"] for r in records] == urls
    assert "scores" in records[0]
    assert records[1]["error"] == "too many redirects (more than 10; a redirect loop?)"
    assert records[2]["error"] == "the download is 524,288,000 bytes, over the cap of 1,000,000 bytes"
    assert records[3]["error"] == "timed out after 1 s (the limit for the whole download)"
    assert records[4]["error"] == "HTTP 404 Not Found"
    for url in urls[1:]:
        assert f"error: {url}: " in result.stderr


# --- texts and labels --------------------------------------------------------------------------------------

def test_ten_megabyte_line_is_embedded_with_a_truncation_warning(work, ref_model):
    (work / "long.txt").write_text("cat " * 2_500_000 + "\nshort\n", encoding="utf-8")
    result = invoke("embed", "--text", "long.txt", "-o", "t.npy", "-m", ref_model[0])
    assert result.exit_code == 0, result.stderr
    assert np.load("t.npy").shape == (2, 16)
    assert "warning: text 'cat cat" in result.stderr and "truncated to 512" in result.stderr
    quiet = invoke("embed", "--text", "long.txt", "-o", "t.npy", "-m", ref_model[0], "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""
