"""The html page of `altclip search -f html`: one card per result with rank, score, path and an
embedded JPEG thumbnail, nothing fetched from anywhere, every string escaped."""
from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from altclip_cli.search.html import THUMB_PX, Hit, render, thumbnail, write


class Page(HTMLParser):
    """The parts of the page the tests look at: cards with their attributes, images, links, text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.cards: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.title = ""
        self.h1 = ""
        self._in: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "figure" and "card" in attrs.get("class", ""):
            self.cards.append({"attrs": attrs, "imgs": [], "links": [], "text": ""})
        elif self.cards and self._in and "figure" in self._in:
            if tag == "img":
                self.cards[-1]["imgs"].append(attrs)
            elif tag == "a":
                self.cards[-1]["links"].append(attrs["href"])
        if tag not in ("img", "meta", "br"):
            self._in.append(tag)

    def handle_endtag(self, tag):
        if tag in self._in:
            while self._in.pop() != tag:
                pass

    def handle_data(self, data):
        if "title" in self._in:
            self.title += data
        if "h1" in self._in:
            self.h1 += data
        if "figure" in self._in and self.cards:
            self.cards[-1]["text"] += data + "\n"


def photo(path: Path, size=(640, 480), seed=0, exif_orientation=None) -> Path:
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    a[..., 2] = rng.integers(0, 256)
    image = Image.fromarray(a)
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(path, exif=exif)
    else:
        image.save(path)
    return path


def decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1], validate=True)))
    assert image.format == "JPEG"
    return image


@pytest.fixture
def results(tmp_path):
    paths = [photo(tmp_path / "wide.jpg", (640, 480), 1),
             photo(tmp_path / "tall.png", (200, 900), 2),
             photo(tmp_path / "tiny.png", (40, 30), 3),
             photo(tmp_path / "a <script>alert(1) & b.jpg", (300, 300), 4)]
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not an image at all")
    paths.append(bad)
    return [Hit(i + 1, str(p), 0.31 - 0.02 * i) for i, p in enumerate(paths)]


def test_a_card_per_result_with_rank_score_path_and_thumbnail(results, tmp_path):
    text = render(results, "a dog on a beach", searched=str(tmp_path), note="model tiny, 5 files")
    page = Page(text)
    assert len(page.cards) == len(results)
    for card, hit in zip(page.cards, results):
        assert card["attrs"]["data-rank"] == str(hit.rank)
        assert card["attrs"]["data-score"] == f"{hit.score:.4f}"
        assert card["attrs"]["data-path"] == hit.path
        assert f"#{hit.rank}" in card["text"] and f"{hit.score:.4f}" in card["text"]
        assert Path(hit.path).name in card["text"] and str(tmp_path) in card["text"]
        assert card["links"] and all(href == Path(hit.path).as_uri() for href in card["links"])
    for card in page.cards[:4]:
        (img,) = card["imgs"]
        thumb = decode(img["src"])
        assert max(thumb.size) <= THUMB_PX
    assert decode(page.cards[0]["imgs"][0]["src"]).size == (256, 192)  # 640x480 -> 256 on its long side
    assert decode(page.cards[2]["imgs"][0]["src"]).size == (40, 30)    # small images are not enlarged
    # The image that cannot be read: a placeholder saying why, no <img>.
    assert page.cards[4]["imgs"] == [] and "cannot show this image" in page.cards[4]["text"]
    assert "not an image" in page.cards[4]["text"]
    assert "a dog on a beach" in page.title and page.h1.strip() == "a dog on a beach"


def test_the_page_is_self_contained(results, tmp_path):
    text = render(results, "x", searched=str(tmp_path))
    assert not re.search(r"https?:", text, re.I)  # no URL of any resource, no link out
    page = Page(text)
    names = {tag for tag, _ in page.tags}
    assert not names & {"script", "link", "iframe", "object", "embed", "base"}
    for tag, attrs in page.tags:
        for key in ("src", "srcset", "href", "data", "poster"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:image/jpeg;base64,", "file:///")), (tag, key, value[:60])
        if tag == "meta" and attrs.get("http-equiv") == "Content-Security-Policy":
            assert "default-src 'none'" in attrs["content"]
    assert "url(" not in text and "@import" not in text


def test_every_string_is_escaped(results, tmp_path):
    query = '<img src=x onerror="alert(1)"> & "quotes"'
    text = render(results, query, searched=str(tmp_path / "<dir>"), note="<b>note</b>")
    assert "<script>" not in text and "<img src=x" not in text and "<b>note" not in text and "<dir>" not in text
    assert "a &lt;script&gt;alert(1) &amp; b.jpg" in text
    page = Page(text)
    assert page.h1.strip() == query and query in page.title  # escaped text reads back as given
    evil = page.cards[3]
    assert evil["attrs"]["data-path"].endswith("/a <script>alert(1) & b.jpg")
    assert evil["links"][0].endswith("/a%20%3Cscript%3Ealert%281%29%20%26%20b.jpg")
    assert [tag for tag, _ in page.tags].count("img") == 4  # the thumbnails only


def test_thumbnails_apply_exif_orientation(tmp_path):
    # Stored 300 wide x 100 high; orientation 6 (rotate 90 degrees clockwise) shows it 100 x 300.
    path = photo(tmp_path / "phone.jpg", (300, 100), exif_orientation=6)
    assert decode(thumbnail(str(path))).size == (85, 256)


def test_transparent_images_get_a_white_background(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(path)
    pixel = decode(thumbnail(str(path))).convert("RGB").getpixel((32, 32))
    assert all(c > 245 for c in pixel)


def test_an_empty_result_list_is_a_page_that_says_so():
    page = Page(render([], "nothing"))
    assert page.cards == [] and "No results." in render([], "nothing")


def test_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "page.html"
    target.write_text("old")
    write(str(target), "<!doctype html>new")
    assert target.read_text() == "<!doctype html>new"
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary left behind


# --- through the command line ---------------------------------------------------------------------------

def test_search_writes_the_page_with_o(tmp_path, monkeypatch, tiny_loaded):
    from test_cli import invoke, jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(7):
        photo(tmp_path / "photos" / f"p{i}.{'jpg' if i % 2 else 'png'}", (120 + 40 * i, 90), seed=i)
    photo(tmp_path / "photos" / "<b>bold & co.png", (50, 50), seed=9)
    model = str(tiny_loaded[0])
    records = jsonl(invoke("search", "a <dog>", "--dir", "photos", "-k", "6", "-m", model).stdout)
    result = invoke("search", "a <dog>", "--dir", "photos", "-k", "6", "-m", model, "-o", "page.html")
    assert (result.exit_code, result.stdout) == (0, "")  # -o *.html: html, nothing on stdout
    text = (tmp_path / "page.html").read_text(encoding="utf-8")
    page = Page(text)
    assert [(int(c["attrs"]["data-rank"]), c["attrs"]["data-path"], float(c["attrs"]["data-score"]))
            for c in page.cards] == [(r["rank"], r["path"], r["score"]) for r in records]
    assert all(len(c["imgs"]) == 1 and c["imgs"][0]["src"].startswith("data:image/jpeg;base64,")
               for c in page.cards)
    assert page.h1.strip() == "a <dog>" and "&lt;dog&gt;" in text and "<dog>" not in text
    assert not re.search(r"https?:", text)
    piped = invoke("search", "a <dog>", "--dir", "photos", "-k", "6", "-m", model, "-f", "html")
    assert piped.exit_code == 0 and piped.stdout.startswith("<!doctype html>")
    assert len(Page(piped.stdout).cards) == 6
    everything = invoke("search", "a <dog>", "--dir", "photos", "-k", "20", "-m", model, "-f", "html").stdout
    assert "&lt;b&gt;bold &amp; co.png" in everything and "<b>bold" not in everything


def test_the_query_images_show_under_the_heading(tmp_path, monkeypatch, tiny_loaded):
    from test_cli import invoke

    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for i in range(3):
        photo(tmp_path / "photos" / f"p{i}.png", (300, 200), seed=i)
    result = invoke("search", "a dog", "-s", "./photos/p1.png", "--dir", "photos", "-m", str(tiny_loaded[0]),
                    "-f", "html")
    assert result.exit_code == 0, result.stderr
    page = Page(result.stdout)
    assert page.h1.strip() == "a dog - ./photos/p1.png" and len(page.cards) == 3
    header_imgs = [a for tag, a in page.tags if tag == "img" and a.get("alt") == "- ./photos/p1.png"]
    assert len(header_imgs) == 1 and decode(header_imgs[0]["src"]).size == (96, 64)
    assert [tag for tag, _ in page.tags].count("img") == 4
