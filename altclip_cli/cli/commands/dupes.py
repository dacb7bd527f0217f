"""`altclip dupes`: the duplicate photos below some folders, in tiers (identical, near, similar),
each group naming the photo to keep, from the model's index (brought up to date first)."""

from __future__ import annotations

import os
import sys

import click

from ..formats import results_format
from ..options import (UsageError, common_options, folder_name, index_decode_options, index_option, messages,
                       model_options, walk_options)

DUPES_FORMATS = ("table", "jsonl", "html")
ASIDE_HINT = "give a folder, e.g. ~/dupes-aside"
KEEP_RULES = ("largest", "oldest", "newest", "first")  # search.dupes.KEEP_RULES (not imported: numpy)
# search.dupes's defaults, repeated so that --help imports no numpy; a test checks they agree.
DEFAULT_THRESHOLD = 0.92
DEFAULT_MAX_DISTANCE = 10


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(), metavar="[PATHS]...")
@click.option("--similar", is_flag=True,
              help="Also group photos of the same scene (bursts, series) by their embeddings' cosine.")
@click.option("--threshold", type=click.FloatRange(-1, 1), default=None, metavar="X",
              help=f"The cosine from which --similar groups two photos (implies --similar) "
                   f"[default: {DEFAULT_THRESHOLD}].")
@click.option("--max-distance", type=click.IntRange(0, 64), default=DEFAULT_MAX_DISTANCE, show_default=True,
              metavar="BITS", help="Perceptual hashes of near photos differ in at most this many of their 64 bits.")
@click.option("--keep", type=click.Choice(KEEP_RULES), default="largest", show_default=True,
              help="Which photo of a group to keep: largest (most pixels, then largest file, then oldest), "
                   "oldest or newest (capture time), first (below the earliest of PATHS).")
@click.option("-f", "--format", "fmt", type=click.Choice(DUPES_FORMATS), default=None,
              help="Output format [default: table on a terminal, html for -o *.html, jsonl otherwise].")
@click.option("-0", "--null", "null", is_flag=True,
              help="Print only the paths of the photos not kept, each followed by a NUL byte, for xargs -0.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the output to FILE (replaced whole) instead of stdout.")
@click.option("--move-to", "move_to", type=click.Path(file_okay=False), metavar="DIR",
              callback=folder_name(ASIDE_HINT),
              help="Move every photo not kept into DIR, under its path below the folder it was found in "
                   "(journalled: a run killed at any instant loses none; nothing is replaced or deleted).")
@click.option("--restore", "restore_from", type=click.Path(file_okay=False), metavar="DIR",
              callback=folder_name(ASIDE_HINT),
              help="Put back every photo an earlier --move-to DIR moved there (nothing is indexed or grouped).")
@index_option(help="Where the index lives (as for `altclip index`); auto: the model's own under ALTCLIP_HOME.")
@click.option("--no-index", is_flag=True, help="Group the index as it is, without bringing it up to date first.")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Wait this long for another run updating the same index [default: fail at once].")
@walk_options
@index_decode_options
@model_options
@common_options
def dupes(paths, similar, threshold, max_distance, keep, fmt, null, output, move_to, restore_from, index_dir,
          no_index, wait,
          include_hidden, exclude_dirs, max_pixels, input_timeout, exact_decode, model, device, precision, revision,
          batch_size, quiet):
    """Find duplicate photos below PATHS (default: the current folder), and say which to keep.

    The folders are indexed first (new and changed images embedded, as `altclip index` does).
    Groups come in tiers, strictest first: identical (the same bytes), near (the same picture
    saved again: re-encoded, resized, rotated, stripped of metadata, cropped a little; by a
    perceptual hash within --max-distance bits AND an embedding cosine of at least 0.95, so two
    different dark or blank frames never match), and with --similar, similar (the same scene:
    cosine >= --threshold). Each group names the photo to keep (--keep) and, for each other
    one, its tier, its cosine and hash distance to the kept one, and why it lost. Nothing is
    deleted, ever: --move-to DIR moves the photos not kept aside, and --restore DIR puts them back.

    \b
    Examples:
      altclip dupes ~/Pictures
      altclip dupes originals/ backup/ --keep first --move-to ~/dupes-aside
      altclip dupes --restore ~/dupes-aside                   # every photo back in its place
      altclip dupes --similar --threshold 0.9 -o dupes.html    # a page of thumbnails
      altclip dupes ~/Pictures -f jsonl | jq -r 'select(.tier == "identical") | .keep'

    \b
    Output (paths are absolute):
      jsonl: one group per line, {"group": 1, "tier": "near", "keep": PATH, "items": [{"path",
        "tier", "cosine", "hamming", "width", "height", "bytes", "taken", "why"}, ...]}, the
        kept photo first with tier "keep";
      table: a summary line, then a block per group; html: a page of groups with thumbnails;
      -0: the paths of the photos not kept, NUL-separated.

    \b
    Exit codes: 0 done (also with no duplicates), 1 error (the index, the model, DIR), 2 usage
    error, 3 done but some photos were not moved or not restored (each named), 130/143
    interrupted (the index keeps what was done; a move or restore run again finishes it).
    """
    from ..terminal import isatty

    msgs = messages()
    if restore_from is not None:
        if paths or move_to is not None:
            raise UsageError("--restore puts photos back; it takes no PATHS and no --move-to",
                             hint=f"run `altclip dupes --restore {restore_from}` alone")
        _exit(_restore(restore_from, msgs))
    fmt = results_format(fmt, null, output, isatty(sys.stdout), page="dupes.html")
    if output is not None:
        from ...outputs.embedfile import check_writable

        check_writable(output)  # a missing or read-only folder fails now, not after the indexing
    given = list(paths) or ["."]
    for path in given:
        if not os.path.lexists(os.path.expanduser(path)):
            raise UsageError(f"{path or repr(path)}: no such file or folder", hint="give folders (or photos) that exist")
    if threshold is not None and threshold != threshold:  # NaN passes FloatRange's bounds
        raise UsageError(f"--threshold {threshold}: not a number: expected a cosine from -1 to 1, e.g. 0.9")
    similar = similar or threshold is not None

    from ...outputs.signals import sigterm_as_interrupt
    from ...search.dupes import DEFAULT_SIMILAR_THRESHOLD, distinct_roots, duplicates_below
    from ...search.run import index_folder
    from ...search.summary import UpdateSummary, report_update
    from ...search.update import model_identity, not_utf8_warning, storable
    from ..options import excluded_dirs, load_model, open_kwargs, pil_pixel_limit

    roots = distinct_roots(given)  # what is walked and read, as the index names it
    if move_to is not None:
        _check_aside(move_to, roots)
    for root in roots:
        if not storable(root):
            msgs.warn(not_utf8_warning(root))
    identity = model_identity(model, revision=revision, progress=not msgs.quiet and isatty(msgs.stream))
    folder = index_folder(index_dir, identity["weights"])
    summary = UpdateSummary()
    walk = {"include_hidden": include_hidden}
    if excluded_dirs(exclude_dirs) is not None:
        walk["exclude_dirs"] = excluded_dirs(exclude_dirs)

    def get_model():  # called only when some image needs embedding
        return load_model(model, device, precision, msgs, exact_decode=exact_decode, revision=revision)

    what = ", ".join(given)
    moving = False
    with sigterm_as_interrupt() as terminated, pil_pixel_limit(max_pixels):
        try:
            found = duplicates_below(
                get_model, identity, folder, given, update=not no_index, wait=wait, summary=summary, similar=similar,
                threshold=DEFAULT_SIMILAR_THRESHOLD if threshold is None else threshold, max_distance=max_distance,
                keep=keep, open_kw=open_kwargs(max_pixels, 30.0, 64.0), batch_size=batch_size,
                input_timeout=input_timeout, msgs=msgs, **walk)
            if not no_index:
                report_update(summary, what, msgs)
            _output_found(found, fmt, output, what, len(given), identity, input_timeout, msgs)
            if move_to is not None:
                moving = True
                _exit(_move_aside(found, roots, move_to, msgs))
        except KeyboardInterrupt:
            from ..status import ExitStatus

            if moving:
                msgs.error("interrupted while moving photos aside; each is in its old place or its new one",
                           hint=f"run the same command again to finish, or `altclip dupes --restore {move_to}`")
            else:
                msgs.error("interrupted; the index keeps what was done", hint="run the same command again to go on")
            _exit(ExitStatus.TERMINATED if terminated.received else ExitStatus.INTERRUPTED)


def _exit(code) -> None:
    click.get_current_context().exit(int(code))


def _output_found(found, fmt, output, what, given: int, identity, input_timeout, msgs) -> None:
    if found.compared == 0:
        msgs.warn(f"{what}: no indexed images below {'these paths' if given > 1 else 'this path'}")
    if found.aliases:
        msgs.note(f"{found.aliases:,} path{'s are other names' if found.aliases > 1 else ' is another name'} "
                  "(a symlink or hard link) of a photo compared: left out, not a duplicate")
    if found.unhashed:
        msgs.note(f"{found.unhashed:,} photo{'s have' if found.unhashed > 1 else ' has'} no perceptual hash (not "
                  "decodable, or indexed by an older altclip and not updated since): they match byte-identical "
                  "copies only")
    headline = summary_line(found)
    if fmt != "table":  # the table starts with it; other outputs carry data only
        msgs.note(headline)
    _output(fmt, found, output, headline=headline, searched=what, note=identity["model"],
            input_timeout=input_timeout)


# --- moving aside and back ---------------------------------------------------------------------------


def _check_aside(move_to: str, roots) -> None:
    """A usage error, before any work, when --move-to DIR lies in a folder searched: the next run
    would walk the photos moved there and group them again."""
    dest = os.path.realpath(os.path.expanduser(move_to))
    for root in roots:
        if dest == root or dest.startswith(os.path.join(root, "")):
            raise UsageError(f"--move-to {move_to}: it is inside {root}, which is searched for duplicates",
                             hint="give a folder outside the ones searched")


def _move_aside(found, roots, move_to, msgs):
    from ...outputs.dupemove import move_aside
    from ...inputs.names import display
    from ...search.dupes import aside_items, kept_not_as_indexed
    from ..status import ExitStatus

    held = kept_not_as_indexed(found)
    items = [item for item in aside_items(found, roots) if item[0] not in held]
    for path, why in held.items():
        msgs.warn(f"{display(path)}: {why}")
    done = move_aside(items, os.path.expanduser(move_to), msgs)
    done.skipped += list(held.items())
    parts = [f"moved {len(done.moved):,} photo{'' if len(done.moved) == 1 else 's'} into {move_to}"]
    if done.already:
        parts.append(f"{len(done.already):,} already there from an earlier run")
    if done.skipped:
        parts.append(f"{len(done.skipped):,} not moved (named above)")
    msgs.note("; ".join(parts) + (f" (put them back: altclip dupes --restore {move_to})" if done.moved else ""))
    return ExitStatus.PARTIAL if done.skipped else ExitStatus.OK


def _restore(restore_from, msgs):
    from ...outputs.dupemove import restore
    from ..status import ExitStatus

    done = restore(os.path.expanduser(restore_from), msgs)
    parts = [f"restored {len(done.restored):,} photo{'' if len(done.restored) == 1 else 's'} from {restore_from}"]
    if done.kept:
        parts.append(f"{len(done.kept):,} kept there (named above)")
    if done.missing:
        parts.append(f"{len(done.missing):,} no longer there (named above)")
    msgs.note("; ".join(parts))
    return ExitStatus.PARTIAL if done.kept or done.missing else ExitStatus.OK


def summary_line(found) -> str:
    """'3 groups of duplicates among 1,234 photos (1 identical, 2 near): 4 photos to remove, 8.1 MB'."""
    groups = len(found.groups)
    photos = f"{found.compared:,} photo{'' if found.compared == 1 else 's'}"
    if not groups:
        return f"no duplicates among {photos}"
    tiers = ", ".join(f"{n:,} {tier}" for tier, n in found.counts().items() if n)
    spare = sum(m.bytes for g in found.groups for m in g.others)
    return (f"{groups:,} group{'' if groups == 1 else 's'} of duplicates among {photos} ({tiers}): "
            f"{found.removable:,} photo{'' if found.removable == 1 else 's'} to remove, {_megabytes(spare)}")


def _megabytes(n: int) -> str:
    """A file size for people: 812 bytes, 45 KB, 3.1 MB, 1.2 GB (powers of 1000, as file managers show)."""
    if n < 1000:
        return f"{n} bytes"
    for unit, scale in (("KB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if n < scale * 1000 or unit == "GB":
            return f"{n / scale:,.0f} {unit}" if unit == "KB" else f"{n / scale:,.1f} {unit}"
    raise AssertionError("unreachable")


# --- output -----------------------------------------------------------------------------------------


def _output(fmt, found, output, *, headline, searched, note, input_timeout) -> None:
    if fmt == "html":
        from ...search.html import render_groups

        data = render_groups(found.groups, "altclip dupes", count=headline, searched=searched,
                             note=note, input_timeout=input_timeout).encode("utf-8")
    elif fmt == "table":
        data = _table(found, headline).encode("utf-8")
    elif fmt == "paths":
        data = b"".join(os.fsencode(m.path) + b"\0" for g in found.groups for m in g.others)
    else:
        from ..formats import dumps

        data = "".join(dumps(g.record()) + "\n" for g in found.groups).encode("utf-8")
    if output is not None:
        from ...errors import AltclipError
        from ...search.html import write

        try:
            write(output, data)
        except OSError as exc:  # the folder went away (or filled up) while the run went on
            raise AltclipError(f"cannot write {output} ({exc.strerror or exc})") from None
        return
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a text-only stream in place of stdout (an embedding program's)
        sys.stdout.write(data.decode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        return
    out.write(data)
    out.flush()


def _table(found, headline: str) -> str:
    """The summary line, then one block per group: the kept photo, then each other with its tier,
    cosine, hash distance and why it lost. Plain text (no colour needed), paths relative to the
    current folder when below it; a thousand groups read as a thousand short blocks."""
    from ...inputs.names import display

    cwd = os.path.join(os.path.realpath(os.getcwd()), "")
    lines = [headline]
    if found.groups:
        lines += ["", f"  {'tier':<10} {'cosine':>6} {'bits':>4}  {'pixels':>11} {'size':>10}  path  ← why it lost"]
    for g in found.groups:
        lines.append(f"#{g.number} {g.tier}, {len(g.members)} photos")
        for m in g.members:
            path = display(m.path[len(cwd):] if m.path.startswith(cwd) else m.path)
            pixels = f"{m.width}x{m.height}" if m.width is not None and m.height is not None else "?"
            bits = "-" if m.hamming is None else str(m.hamming)
            line = f"  {m.tier:<10} {m.cosine:>6.3f} {bits:>4}  {pixels:>11} {_megabytes(m.bytes):>10}  {path}"
            lines.append(line if m.why is None else f"{line}  ← {m.why}")
    return "\n".join(lines) + "\n"
