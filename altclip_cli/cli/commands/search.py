"""`altclip search`: the images under a folder ranked against a text or image query, from the
model's index (brought up to date first)."""

from __future__ import annotations

import os
import sys

import click

from ...search.filters import SORTS
from ..formats import results_format
from ..options import (UsageError, common_options, filter_options, index_decode_options, index_option, messages,
                       model_options, search_filter, server_options, walk_options)

SEARCH_FORMATS = ("table", "jsonl", "json", "tsv", "paths", "html")


@click.command()
@click.argument("query", metavar="QUERY")
@click.option("-a", "--add", "add", multiple=True, metavar="Q",
              help="Another part to add to the query: a text or an image (repeatable).")
@click.option("-s", "--subtract", "subtract", multiple=True, metavar="Q",
              help="A part to subtract from the query: a text or an image (repeatable).")
@click.option("-k", "--top", "top", type=click.IntRange(min=1), default=10, show_default=True, metavar="N",
              help="Show the N best images.")
@click.option("--min-score", type=float, default=None, metavar="X",
              help="Show only images whose score (a cosine, -1 to 1) is at least X.")
@filter_options
@click.option("--sort", type=click.Choice(SORTS), default="score", show_default=True,
              help="The order of the results: score (best first), or date (the images -k and --min-score kept, "
                   "oldest first; those without a date last).")
@click.option("-f", "--format", "fmt", type=click.Choice(SEARCH_FORMATS), default=None,
              help="Output format [default: table on a terminal, html for -o *.html, jsonl otherwise].")
@click.option("-0", "--null", "null", is_flag=True,
              help="Print only the paths, each followed by a NUL byte (implies -f paths), for xargs -0.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the output to FILE (replaced whole) instead of stdout.")
@click.option("--dir", "search_dir", default=".", show_default=True, type=click.Path(), metavar="DIR",
              help="Search the images below DIR (indexed first unless --no-index).")
@click.option("--no-index", is_flag=True, help="Search the index as it is, without bringing it up to date first.")
@index_option(help="Where the index lives (as for `altclip index`); auto: the model's own under ALTCLIP_HOME.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Wait this long for another run updating the same index [default: fail at once; "
                   "--no-index searches what it has committed so far].")
@walk_options
@index_decode_options
@model_options
@server_options
@common_options
def search(query, add, subtract, top, min_score, after, before, near, within, camera, sort, fmt, null, output,
           search_dir, no_index, index_dir, wait, include_hidden, exclude_dirs, max_pixels, input_timeout,
           exact_decode, model, device, precision, revision, batch_size, server, token_file, quiet):
    """Find the images below --dir (default: here) that best match QUERY.

    QUERY and each -a/-s part is a text, in any language, or an image: a part that contains a
    /, starts with ~ or is an http(s) URL is an image (write ./cat.jpg for a file here). A weight
    W: in front scales a part ("2:sunset", "0.5:./pool.jpg"; "1:2:30" is the text "2:30"). The
    query is the weighted sum of the parts' normalised embeddings, -s parts subtracted; scores are
    cosines (-1 to 1). The folder is indexed first (new and changed images embedded, as
    `altclip index` does), then every image below it is ranked, exactly. When `altclip serve`
    runs the same model (see --server), its warm model does the work: over its Unix socket it
    indexes and ranks too; over TCP it encodes the query and the rest is done here.

    --after, --before, --near and --camera keep only the photos whose date, place or camera (read
    from their EXIF when indexed) fit; a photo without that fact is left out, and counted.

    \b
    Examples:
      altclip search "a dog on a beach"
      altclip search beach --after 2023-06 --before 2023-08 --near 43.30,5.37 --within 20km
      altclip search "birthday cake" --camera "iphone 12" -k 30 --sort date
      altclip search 猫 --dir ~/Pictures -k 20
      altclip search "2:golden retriever" -a ./pool.jpg -s fruit
      altclip search sunset -f paths -0 | xargs -0 cp -t picked/
      altclip search "birthday cake" -k 50 -o cake.html    # a page of thumbnails

    \b
    Output (paths are absolute; taken, gps and camera when known):
      jsonl: {"rank": 1, "path": "/home/me/Pictures/dog.jpg", "score": 0.3127,
              "taken": "2023-07-14T10:20:30+02:00", "gps": [43.3, 5.37], "camera": "Apple iPhone 12"}
      json: one array of those; tsv: score<TAB>path (tab, newline, backslash in a path as \\t \\n \\\\);
      paths: one per line (-0: NUL-separated); table: rank, score, path;
      html: a self-contained page of thumbnails (-o FILE, or piped to stdout).

    \b
    Exit codes: 0 done (also with no results), 1 error (a query image that cannot be read, the
    index, the model), 2 usage error, 130/143 interrupted (the index keeps what was done).
    """
    from ...search.query import QueryError, describe, open_images, parse_query
    from ..options import load_model
    from ..terminal import isatty

    msgs = messages()
    try:
        parts = parse_query(query, add, subtract)
    except QueryError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    where = search_filter(after, before, near, within, camera, sort)
    if min_score is not None and min_score != min_score:  # NaN: every comparison false, no image kept
        raise UsageError(f"--min-score {min_score}: not a number: expected a score (a cosine), e.g. 0.25")
    fmt = results_format(fmt, null, output, isatty(sys.stdout), page="results.html")
    if output is not None:
        from ...outputs.embedfile import check_writable

        check_writable(output)  # a missing or read-only folder fails now, not after the indexing
    if not os.path.isdir(os.path.expanduser(search_dir)):
        what = "is not a folder" if os.path.exists(os.path.expanduser(search_dir)) else "no such folder"
        raise UsageError(f"--dir {search_dir}: {what}", hint="give --dir an existing folder (default: the current one)")
    root = os.path.realpath(os.path.expanduser(search_dir))

    from ...outputs.signals import sigterm_as_interrupt
    from ..options import excluded_dirs, get_model, is_remote, open_kwargs, pil_pixel_limit

    walk = {"include_hidden": include_hidden, "exclude_dirs": excluded_dirs(exclude_dirs)}
    with sigterm_as_interrupt() as terminated, pil_pixel_limit(max_pixels):
        try:
            # The images to index go to the model too: a server's decoding must be this command's.
            model_ = get_model(server, token_file, model, device, precision, msgs, exact_decode=exact_decode,
                               revision=revision, max_pixels=max_pixels,
                               images=not no_index or any(p.is_image for p in parts), input_timeout=input_timeout)
            open_kw = open_kwargs(max_pixels, 30.0, 64.0, model_.draft_min_side)
            if is_remote(model_) and model_.searches:
                hits, searched, counts = _search_on_server(model_, parts, root, search_dir, index_dir, top,
                                                           min_score, no_index, wait, walk, msgs, where)
                images = open_images(parts, open_kw, input_timeout) if fmt == "html" else {}  # the page shows them
            else:
                images, hits, searched, counts = _search_here(
                    model_, parts, root, search_dir, index_dir, top, min_score, no_index, wait, walk, open_kw,
                    batch_size, input_timeout, msgs, where,
                    load_here=lambda: load_model(model, device, model_.precision, msgs, exact_decode=exact_decode,
                                                 revision=revision))
        except QueryError as exc:
            if exc.usage:  # parts that cancel out
                raise UsageError(exc.message, hint=exc.hint) from None
            raise
        except KeyboardInterrupt:
            from ..status import ExitStatus

            msgs.error("interrupted; the index keeps what was done", hint="run the same command again to go on")
            click.get_current_context().exit(ExitStatus.TERMINATED if terminated.received else ExitStatus.INTERRUPTED)
    total = counts.get("total", searched) if where.active else searched
    if total == 0:
        msgs.warn(f"{search_dir}: no indexed images below this folder")
    elif where.active:
        _report_filtered(searched, counts, msgs)
    if searched and not hits and min_score is not None:
        msgs.note(f"no image scores {min_score} or more (the best of {searched:,} images is below it)")
    shown = [(("- " if p.weight < 0 else "") + p.given, images[i]) for i, p in enumerate(parts) if i in images]
    ranked = f"{searched:,} of {total:,} images match the filters" if where.active else \
        f"{searched:,} image{'' if searched == 1 else 's'} searched"
    _output(fmt, hits, output, null, title=describe(parts), searched=root, query_images=shown,
            note=f"{model_.model_id}, {ranked}", input_timeout=input_timeout, dates=where.needs_dates)


def _report_filtered(searched, counts, msgs) -> None:
    """How many images the filters kept, and the lines naming those left out for lack of a fact."""
    from ...search.filters import missing_lines

    total = counts.get("total", searched)
    msgs.note(f"{searched:,} of {total:,} indexed image{'' if total == 1 else 's'} below the folder "
              f"{'matches' if searched == 1 else 'match'} the filters")
    for line in missing_lines(counts.get("missing", {}), counts.get("unread", 0)):
        msgs.note(line)


def _search_here(model_, parts, root, search_dir, index_dir, top, min_score, no_index, wait, walk, open_kw,
                 batch_size, input_timeout, msgs, where, load_here):
    """(query images, hits, images searched, the filter's counts), the index updated and ranked in
    this process (search.run.search_below, as the library's search()); the query is encoded by
    model_ (loaded here, or a server's that cannot search this folder)."""
    from ...search.run import search_below
    from ...search.summary import report_update
    from ..options import is_remote

    def local_model():  # update_index calls it only when some image needs the model
        msgs.note("new or changed images to index: loading the model in this process "
                  "(the server cannot read this folder)")
        return load_here()

    remote = is_remote(model_)
    found = search_below(model_, parts, root, index=index_dir, top=top, min_score=min_score, update=not no_index,
                         indexer=local_model if remote else None,
                         # A server reads the image parts itself (as files or bytes), as it would any image.
                         query_sources=_query_sources(parts) if remote else None,
                         open_kw=open_kw, batch_size=batch_size, wait=wait, input_timeout=input_timeout, msgs=msgs,
                         where=where, **{k: v for k, v in walk.items() if v is not None})
    if found.summary is not None:
        report_update(found.summary, search_dir, msgs)
    counts = {"total": found.ranked.total, "missing": found.ranked.missing, "unread": found.ranked.unread}
    return found.images, found.hits, found.searched, counts


def _search_on_server(remote, parts, root, search_dir, index_dir, top, min_score, no_index, wait, walk, msgs, where):
    """(hits, images searched, the filter's counts) from the server's POST /v1/search: it indexes
    below root with its warm model, filters and ranks; its messages (failed images, the summary)
    are printed here."""
    from ...paths import default_index_folder
    from ...search.summary import UpdateSummary, report_update
    from ...search.update import not_utf8_warning, storable
    from ..messages import ServerProgress, replay
    from ..terminal import isatty

    # This command's index, wherever the server keeps its own (its ALTCLIP_HOME may not be ours).
    folder = default_index_folder(remote.weights_id) if index_dir == "auto" else os.path.expanduser(index_dir)
    index = os.path.abspath(folder)
    if not storable(root):  # no image below it can be indexed (and a request holds UTF-8 text only)
        msgs.warn(not_utf8_warning(root))
        return [], 0, {}
    bar = ServerProgress(msgs) if not msgs.quiet and isatty(msgs.stream) else None
    try:
        answer = remote.search(parts, root, index=index, top=top, min_score=min_score, update=not no_index,
                               wait=wait, progress=bar, where=where, **walk)
    finally:
        if bar is not None:
            bar.close()
    replay(answer.get("messages", []), msgs)
    if not no_index and not answer.get("walked"):
        from ..options import debug_line

        debug_line(f"server: nothing changed below {root} since the server last walked it (it watches the folders)")
    if answer.get("update") is not None:
        report_update(UpdateSummary.from_dict(answer["update"]), search_dir, msgs)
    hits = [(int(r["rank"]), r["path"], float(r["score"]), {k: r[k] for k in FACT_FIELDS if k in r})
            for r in answer.get("results", [])]
    counts = {k: answer[k] for k in ("total", "missing", "unread") if k in answer}
    return hits, int(answer.get("searched", 0)), counts


def _query_sources(parts) -> dict:
    """{part index: inputs.sources.Source} for the image parts (what a server's model takes)."""
    from ...inputs.sources import Source

    return {i: Source(p.value, url=p.value) if p.is_url else Source(p.value, path=os.path.expanduser(p.value))
            for i, p in enumerate(parts) if p.is_image}


# --- output -----------------------------------------------------------------------------------------


def _output(fmt, hits, output, null, *, title, searched, note, query_images=(), input_timeout=None,
            dates=False) -> None:
    if fmt == "html":
        from ...search.html import Hit, render

        data = render([Hit(r, p, s, f.get("taken")) for r, p, s, f in hits], title, searched=searched, note=note,
                      query_images=query_images, input_timeout=input_timeout).encode("utf-8")
    elif fmt == "table":
        data = _table(hits, output is None, dates)
    else:
        data = b"".join(_FORMATTERS[fmt](hits, null))
    if output is not None:
        from ...errors import AltclipError
        from ...search.html import write

        try:
            write(output, data)
        except OSError as exc:  # the folder went away (or filled up) while the search ran
            raise AltclipError(f"cannot write {output} ({exc.strerror or exc})") from None
        return
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream in place of stdout (an embedding program's)
        sys.stdout.write(data.decode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        return
    out.write(data)
    out.flush()


FACT_FIELDS = ("taken", "gps", "camera")  # what a record holds of a photo's facts, when known


def _record(rank, path, score, facts) -> dict:
    from ...inputs.names import display
    from ...outputs.records import search_record

    return search_record(rank, display(path), score, facts)


def _jsonl(hits, null):
    from ..formats import dumps

    for hit in hits:
        yield (dumps(_record(*hit)) + "\n").encode("utf-8")


def _json(hits, null):
    from ..formats import dumps

    body = ",\n".join(dumps(_record(*hit)) for hit in hits)
    yield (f"[\n{body}\n]\n" if hits else "[]\n").encode("utf-8")


_TSV_ESCAPES = {ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}


def _tsv(hits, null):
    for _rank, path, score, _facts in hits:
        yield f"{score:.4f}\t".encode() + os.fsencode(path.translate(_TSV_ESCAPES)) + b"\n"


def _paths(hits, null):
    """The file system's own bytes (a name that is not UTF-8 stays openable)."""
    end = b"\0" if null else b"\n"
    for _rank, path, _score, _facts in hits:
        if not null and "\n" in path:
            messages().warn(f"{path!r} has a newline in its name: use -0 to pass such paths on")
        yield os.fsencode(path) + end


_FORMATTERS = {"jsonl": _jsonl, "json": _json, "tsv": _tsv, "paths": _paths}


def _table(hits, to_terminal: bool, dates: bool = False) -> bytes:
    """rank, score, the date taken (with dates: a date filter or sort) and path (relative to the
    current folder when below it); rich renders it."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ...inputs.names import display
    from ..terminal import no_color

    buf = io.StringIO()
    width = None
    if to_terminal:
        import shutil

        width = shutil.get_terminal_size().columns
    console = Console(file=buf, no_color=no_color(), highlight=False, emoji=False, width=width,
                      force_terminal=to_terminal and not no_color())
    cwd = os.path.realpath(os.getcwd())
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    if dates:
        table.add_column("taken")
    table.add_column("path", overflow="fold")
    for rank, path, score, facts in hits:
        shown = os.path.relpath(path, cwd) if path.startswith(cwd.rstrip(os.sep) + os.sep) else path
        taken = [_shown_date(facts.get("taken"))] if dates else []
        table.add_row(str(rank), f"{score:.4f}", *taken, Text(display(shown)))
    if hits:
        console.print(table)
    return buf.getvalue().encode("utf-8")


def _shown_date(taken: str | None) -> str:
    """"2023-07-14 10:20" (the local time the photo was taken), or "-" when unknown."""
    return taken[:16].replace("T", " ") if taken else "-"
