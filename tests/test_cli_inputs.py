"""IMAGES expansion, URL fetching and text-file reading for the command line (no model needed)."""
from __future__ import annotations

import io
import os

import pytest

from altclip_cli.errors import InputError
from altclip_cli.inputs.sources import Source, expand_images, open_source, read_path_list
from altclip_cli.inputs.textfile import read_text_file, split_lines
from altclip_cli.inputs.urls import fetch_url
from urlserver import serve


def names(sources):
    return [(s.name, s.error) if s.error else s.name for s in sources]


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """photos/{b.jpg, a.PNG, notes.txt, .hidden.jpg, ._a.jpg, sub/c.jpg, sub/deeper/d.webp, empty/}"""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    for rel in ("b.jpg", "a.PNG", ".hidden.jpg", "._a.jpg", "sub/c.jpg", "sub/deeper/d.webp"):
        (root / rel).write_bytes(b"x")
    (root / "notes.txt").write_text("not an image")
    return root


def test_files_are_kept_as_given_in_order(tree):
    out = list(expand_images(["photos/b.jpg", "photos/notes.txt", "photos/a.PNG"]))
    assert names(out) == ["photos/b.jpg", "photos/notes.txt", "photos/a.PNG"]
    assert out[0].path == "photos/b.jpg"


def test_folder_lists_images_sorted_skips_hidden_and_subfolders(tree):
    warnings = []
    out = list(expand_images(["photos"], warn=warnings.append))
    assert names(out) == ["photos/a.PNG", "photos/b.jpg"]
    assert warnings == []


def test_folder_recursive_files_before_subfolders(tree):
    out = list(expand_images(["photos/"], recursive=True))
    assert names(out) == ["photos/a.PNG", "photos/b.jpg", "photos/sub/c.jpg", "photos/sub/deeper/d.webp"]


def test_folder_without_images_is_a_warning_naming_it(tree):
    (tree / "only" / "inner").mkdir(parents=True)
    (tree / "only" / "inner" / "x.jpg").write_bytes(b"x")
    warnings = []
    out = list(expand_images(["photos/empty", "photos/only"], warn=warnings.append))
    assert out == []
    assert warnings == ["photos/empty: no images in this folder",
                        "photos/only: no images in this folder (it has 1 subfolder: use -r to look inside)"]
    assert names(expand_images(["photos/only"], recursive=True)) == ["photos/only/inner/x.jpg"]


def test_missing_file_is_passed_on_for_open_to_name(tree):
    out = list(expand_images(["nope.jpg"]))
    assert out == [Source("nope.jpg", path="nope.jpg")]
    with pytest.raises(InputError, match="^nope.jpg: no such file"):
        open_source(out[0])


def test_glob_the_shell_did_not_expand(tree):
    assert names(expand_images(["photos/*.jpg"])) == ["photos/b.jpg"]
    assert names(expand_images(["photos/**/*.jpg"], recursive=True)) == ["photos/b.jpg", "photos/sub/c.jpg"]
    assert names(expand_images(["photos/*.gif"])) == [("photos/*.gif", "no files match this pattern")]


def test_a_file_whose_name_looks_like_a_glob_is_taken_literally(tree):
    (tree / "[1].jpg").write_bytes(b"x")
    assert names(expand_images(["photos/[1].jpg"])) == ["photos/[1].jpg"]


def test_symlink_loop_in_recursive_walk_is_skipped_with_a_warning(tree):
    os.symlink("..", tree / "sub" / "loop")
    os.symlink("missing.jpg", tree / "broken.jpg")
    warnings = []
    out = list(expand_images(["photos"], recursive=True, warn=warnings.append))
    assert names(out) == ["photos/a.PNG", "photos/b.jpg", "photos/broken.jpg", "photos/sub/c.jpg",
                          "photos/sub/deeper/d.webp"]
    assert warnings == ["photos/sub/loop: folder already visited (a symlink loop?), skipped"]
    with pytest.raises(InputError, match="^photos/broken.jpg: no such file"):
        open_source(out[2])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_folder_is_an_error_record(tree):
    (tree / "sub").chmod(0)
    try:
        out = list(expand_images(["photos/sub"]))
    finally:
        (tree / "sub").chmod(0o755)
    assert out[0].error.startswith("permission denied")


def test_stdin_list_crlf_blank_lines_and_undecodable_names(tree):
    stdin = io.BytesIO(b"photos/b.jpg\r\n\nphotos/sub\n  \nphotos/\xff.jpg")
    out = list(expand_images(["photos/a.PNG", "-"], stdin=stdin))
    assert [s.name for s in out] == ["photos/a.PNG", "photos/b.jpg", "photos/sub/c.jpg", "photos/\udcff.jpg"]
    assert os.fsencode(out[3].name) == b"photos/\xff.jpg"


def test_stdin_lines_are_not_globbed(tree):
    assert read_path_list(io.BytesIO(b"photos/*.jpg\n")) == ["photos/*.jpg"]
    assert names(expand_images(["-"], stdin=io.BytesIO(b"photos/*.jpg\n"))) == ["photos/*.jpg"]


def test_urls_are_sources():
    assert list(expand_images(["https://example.org/cat.jpg"])) == [
        Source("https://example.org/cat.jpg", url="https://example.org/cat.jpg")]


# --- URLs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with serve() as url:
        yield url


def test_url_is_fetched_and_opened(server):
    image = open_source(Source(server + "/cat.png", url=server + "/cat.png"))
    assert image.size == (40, 30)


@pytest.mark.parametrize("path, kw, message", [
    ("/loop", {}, "too many redirects"),
    ("/huge", {"max_bytes": 1000}, "524,288,000 bytes, over the cap of 1,000 bytes"),
    ("/big-chunked", {"max_bytes": 5000}, "over the cap of 5,000 bytes"),
    ("/slow", {"timeout": 0.2}, "timed out after 0.2 s"),
    ("/missing", {}, "HTTP 404"),
])
def test_url_failures_name_the_url(server, path, kw, message):
    with pytest.raises(InputError) as info:
        fetch_url(server + path, **kw)
    assert info.value.message.startswith(server + path + ": ")
    assert message in info.value.message


def test_unreachable_url(server):
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(InputError, match="cannot download"):
        fetch_url(f"http://127.0.0.1:{port + 1 if port < 65535 else 1}/x.png", timeout=2)


# --- text files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, lines", [
    (b"", []),
    (b"a\nb\n", ["a", "b"]),
    (b"a\nb", ["a", "b"]),
    (b"a\n\nb\n\n", ["a", "", "b", ""]),
    (b"\n", [""]),
    (b"a\r\nb\r\n", ["a", "b"]),
    (b"a\rb\n", ["a\rb"]),
    (b"\xef\xbb\xbf\xe7\x8c\xab\n", ["猫"]),
])
def test_split_lines(data, lines):
    assert split_lines(data, "f.txt") == lines


def test_non_utf8_names_the_line_and_column():
    with pytest.raises(InputError) as info:
        split_lines(b"ok\nfine\ncaf\xe9 au lait\n", "texts.txt")
    assert info.value.message == "texts.txt line 3: not valid UTF-8 (byte 0xe9 at column 4)"
    assert "iconv" in info.value.hint


def test_ten_megabyte_line(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(b"x" * 10_000_000 + b"\nshort\n")
    lines, name = read_text_file(str(path))
    assert [len(line) for line in lines] == [10_000_000, 5]


def test_read_text_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_text_file(str(tmp_path / "nope.txt"))
    with pytest.raises(InputError, match="is a directory"):
        read_text_file(str(tmp_path))
    lines, name = read_text_file("-", stdin=io.BytesIO(b"x\n"))
    assert (lines, name) == (["x"], "<stdin>")
