"""A search's results as one self-contained HTML page: a grid of thumbnails with rank, score and
path, each linking to the full image.

Self-contained: thumbnails are JPEG data URIs (at most THUMB_PX on a side, EXIF orientation
applied), the CSS is inline, there is no script, and a Content-Security-Policy forbids the page to
load anything, so opening it never touches the network. Every string from outside (paths, the
query, error messages) goes through html.escape. Needs PIL (thumbnails), made in the decoding
pipeline's pool of daemon threads under the input timeout.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..inputs.files import DEFAULT_INPUT_TIMEOUT, stuck_error
from ..inputs.names import display

THUMB_PX = 256
QUERY_PX = 96  # the query's own images, under the heading
JPEG_QUALITY = 82


@dataclass(frozen=True)
class Hit:
    """One result: its rank (1 is the best), absolute path and cosine score, and when known the
    date it was taken (ISO 8601, shown as its local date and time)."""

    rank: int
    path: str
    score: float
    taken: str | None = None


def thumbnail(path: str, px: int = THUMB_PX) -> str:
    """A data:image/jpeg;base64 URI of the image at most `px` on a side, or InputError saying why not."""
    from ..inputs.images import open_image

    image = open_image(path, name=display(path), draft_min_side=px)  # EXIF orientation, first frame
    return image_uri(image, px, keep=False)


def image_uri(image, px: int = THUMB_PX, *, keep: bool = True) -> str:
    """A data:image/jpeg;base64 URI of a decoded PIL image at most `px` on a side (keep: leave
    `image` as it is; else it is shrunk in place)."""
    from PIL import Image

    if keep:
        image = image.copy()
    image.thumbnail((px, px), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    elif image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnails(paths: Sequence[str], px: int, workers: int, timeout: float | None) -> list:
    """(data URI or None, why not) per path, in order, made in daemon worker threads (PIL decodes
    outside the GIL); one still unread after `timeout` seconds (a hung network mount) is given up
    and its worker replaced, so the page is written all the same."""
    from ..inputs.pipeline import DaemonPool
    from ..inputs.sources import reason

    if not paths:
        return []
    pool = DaemonPool(min(workers, len(paths)))
    try:
        tasks = [pool.submit(_thumb_or_error, path, px) for path in paths]
        out = []
        for path, task in zip(paths, tasks):
            try:
                out.append(pool.result(task, timeout))
            except FutureTimeout:
                pool.abandon(task)
                out.append((None, reason(stuck_error(display(path), timeout), display(path))))
        return out
    finally:
        pool.close()


def _thumb_or_error(path: str, px: int) -> tuple[str | None, str | None]:
    from ..errors import InputError
    from ..inputs.sources import reason

    try:
        return thumbnail(path, px), None
    except InputError as exc:
        return None, reason(exc, display(path))
    except Exception as exc:  # noqa: BLE001 - one odd file must not cost the whole page
        return None, f"{type(exc).__name__}: {exc}"


def render(hits: Sequence[Hit], query: str, *, searched: str = "", note: str = "", px: int = THUMB_PX,
           workers: int | None = None, query_images: Sequence[tuple[str, object]] = (),
           input_timeout: float | None = DEFAULT_INPUT_TIMEOUT) -> str:
    """The page as a string. query: the query as one line (see query.describe); searched: the folder
    searched; note: a line for the footer (the model, the number of files); query_images: (label,
    PIL image) of the query's image parts, shown small under the heading; input_timeout: seconds
    one thumbnail may take (None: no limit), past which its card says why it is missing."""
    thumbs = _thumbnails([h.path for h in hits], px, workers or min(8, os.cpu_count() or 1), input_timeout)
    best = max((h.score for h in hits), default=0.0)
    cards = "\n".join(_card(h, uri, err, best) for h, (uri, err) in zip(hits, thumbs))
    e = _escape
    count = f"{len(hits)} result{'' if len(hits) == 1 else 's'}"
    where = f" under <span class=\"path\">{e(searched)}</span>" if searched else ""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    footer = " · ".join(x for x in (e(note), f"altclip search, {e(when)}") if x)
    body = cards if hits else '<p class="empty">No results.</p>'
    shown = "".join(f'<figure class="part"><img src="{image_uri(image, QUERY_PX)}" alt="{e(label)}">'
                    f'<figcaption>{e(label)}</figcaption></figure>' for label, image in query_images)
    parts = f'<div class="parts">{shown}</div>' if shown else ""
    return _PAGE.format(title=e(f"altclip search: {query}"), query=e(query), parts=parts, count=count,
                        where=where, body=body, footer=footer, css=_CSS, main="")


def render_groups(groups: Sequence, heading: str, *, count: str, searched: str = "", note: str = "",
                  px: int = THUMB_PX, workers: int | None = None,
                  input_timeout: float | None = DEFAULT_INPUT_TIMEOUT) -> str:
    """A page of duplicate groups (search.dupes.Group), each a row of thumbnails, the photo to
    keep first and marked, each other with its tier, cosine, Hamming distance and why it lost.
    heading: the page's title; count: the line under it (the summary)."""
    members = [m for g in groups for m in g.members]
    thumbs = iter(_thumbnails([m.path for m in members], px, workers or min(8, os.cpu_count() or 1), input_timeout))
    e = _escape
    sections = []
    for g in groups:
        cards = "\n".join(_member_card(m, *next(thumbs)) for m in g.members)
        sections.append(f'<section class="group" data-group="{g.number}" data-tier="{e(g.tier)}">'
                        f'<h2>#{g.number} {e(g.tier)} <span class="muted">{len(g.members)} photos</span></h2>'
                        f'<div class="cards">{cards}</div></section>')
    where = f" · below <span class=\"path\">{e(searched)}</span>" if searched else ""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M")
    footer = " · ".join(x for x in (e(note), f"altclip dupes, {e(when)}") if x)
    body = "\n".join(sections) if sections else '<p class="empty">No duplicates.</p>'
    return _PAGE.format(title=e(heading), query=e(heading), parts="", count=e(count), where=where, body=body,
                        footer=footer, css=_CSS + _GROUP_CSS, main=' class="groups"')


def _member_card(m, uri: str | None, error: str | None) -> str:
    """A photo of a duplicate group: the kept one marked "keep", another with its tier and why it lost."""
    e = _escape
    shown = display(m.path)
    folder, name = os.path.split(shown)
    href = e(Path(m.path).as_uri())
    if uri is not None:
        thumb = f'<img src="{uri}" alt="{e(name)}" loading="lazy">'
    else:
        thumb = f'<span class="placeholder">cannot show this image: {e(error or "unknown error")}</span>'
    size = f"{m.width}x{m.height}" if m.width is not None and m.height is not None else "size unknown"
    facts = " · ".join(x for x in (size, f"{m.bytes:,} bytes", m.taken or "") if x)
    if m.tier == "keep":
        top = '<span class="rank keep">keep</span>'
        why = ""
    else:
        bits = "" if m.hamming is None else f" · {m.hamming} bits"
        top = f'<span class="rank">{e(m.tier)}</span><span class="score">cos {m.cosine:.4f}{bits}</span>'
        why = f'<div class="why">{e(m.why or "")}</div>'
    return (f'<figure class="card{" kept" if m.tier == "keep" else ""}" data-tier="{e(m.tier)}" '
            f'data-path="{e(shown)}"><a class="thumb" href="{href}" title="{e(shown)}">{thumb}</a>'
            f'<figcaption><div class="top">{top}</div><div class="facts">{e(facts)}</div>{why}'
            f'<a class="file" href="{href}" title="{e(shown)}"><span class="name">{e(name)}</span>'
            f'<span class="dir">{e(folder)}</span></a></figcaption></figure>')


def _card(hit: Hit, uri: str | None, error: str | None, best: float) -> str:
    e = _escape
    shown = display(hit.path)
    folder, name = os.path.split(shown)
    href = e(Path(hit.path).as_uri())
    score = f"{hit.score:.4f}"
    width = 0 if best <= 0 else max(0.0, min(1.0, hit.score / best)) * 100
    if uri is not None:
        thumb = f'<img src="{uri}" alt="{e(name)}" loading="lazy">'
    else:
        thumb = f'<span class="placeholder">cannot show this image: {e(error or "unknown error")}</span>'
    return (f'<figure class="card" data-rank="{hit.rank}" data-score="{score}" data-path="{e(shown)}">'
            f'<a class="thumb" href="{href}" title="{e(shown)}">{thumb}</a>'
            f'<figcaption><div class="top"><span class="rank">#{hit.rank}</span>'
            f'<span class="score">{score}</span></div>'
            + (f'<div class="taken">{e(hit.taken[:16].replace("T", " "))}</div>' if hit.taken else "") +
            f'<div class="bar"><span style="width:{width:.0f}%"></span></div>'
            f'<a class="file" href="{href}" title="{e(shown)}"><span class="name">{e(name)}</span>'
            f'<span class="dir">{e(folder)}</span></a></figcaption></figure>')


def _escape(text: str) -> str:
    return html.escape(display(str(text)), quote=True)


def write(path: str, data: str | bytes) -> None:
    """Write the page (or any output: text is written as UTF-8) to `path` whole or not at all: a
    temporary file beside it, then a rename."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".altclip-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_CSS = """
:root { color-scheme: light dark; --bg: #f6f6f4; --fg: #1c1c1e; --muted: #6b6b70; --card: #ffffff;
        --line: #e2e2e0; --tile: #ececea; --accent: #3a6fd8; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #151517; --fg: #ececef; --muted: #9b9ba3; --card: #1f1f23; --line: #2d2d33;
          --tile: #26262b; --accent: #7ea6ff; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { padding: 28px 32px 4px; }
h1 { margin: 0 0 6px; font-size: 22px; font-weight: 600; overflow-wrap: anywhere; }
header p, footer { margin: 0; color: var(--muted); }
.path { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 18px;
       padding: 20px 32px 32px; }
.card { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 12px;
        overflow: hidden; display: flex; flex-direction: column; }
.thumb { display: flex; align-items: center; justify-content: center; aspect-ratio: 1 / 1;
         background: var(--tile); }
.thumb img { display: block; max-width: 100%; max-height: 100%; object-fit: contain; }
.placeholder { padding: 16px; color: var(--muted); font-size: 12px; text-align: center;
               overflow-wrap: anywhere; }
figcaption { padding: 10px 12px 12px; }
.top { display: flex; justify-content: space-between; font-variant-numeric: tabular-nums; }
.rank { font-weight: 600; }
.score { color: var(--muted); font-family: ui-monospace, SFMono-Regular, Menlo, monospace; }
.taken { color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
.bar { height: 3px; margin: 7px 0 8px; background: var(--line); border-radius: 2px; }
.bar span { display: block; height: 100%; background: var(--accent); border-radius: 2px; }
a { color: inherit; text-decoration: none; }
.file { display: block; }
.file:hover .name { text-decoration: underline; }
.name { display: block; font-weight: 500; overflow-wrap: anywhere; }
.dir { display: block; color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.empty { color: var(--muted); }
.parts { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.part { margin: 0; text-align: center; color: var(--muted); font-size: 12px; }
.part img { display: block; max-width: 96px; max-height: 96px; border-radius: 8px;
            border: 1px solid var(--line); margin-bottom: 4px; }
footer { padding: 0 32px 28px; font-size: 12px; }
"""

_GROUP_CSS = """
main.groups { display: block; }
.group { margin: 0 0 28px; }
.group h2 { margin: 0 0 10px; font-size: 16px; font-weight: 600; }
.muted, .facts, .why { color: var(--muted); font-weight: 400; }
.facts, .why { font-size: 12px; margin: 4px 0; overflow-wrap: anywhere; }
.group .cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 18px; }
.kept { border: 2px solid var(--accent); }
.keep { color: var(--accent); }
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="generator" content="altclip">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{query}</h1>
{parts}<p>{count}{where}</p>
</header>
<main{main}>
{body}
</main>
<footer>{footer}</footer>
</body>
</html>
"""
