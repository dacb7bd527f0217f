"""`altclip cache` and `altclip cache clear`: what altclip keeps under ALTCLIP_HOME, and its
removal. The listing and the removal are altclip_cli.cache.inventory's; this module parses and
prints."""

from __future__ import annotations

import sys
import time

import click

from ..options import UsageError, common_options, messages

def _json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")(f)


@click.group(invoke_without_command=True, short_help="List or clear altclip's own caches.")
@_json_option
@click.pass_context
def cache(ctx, as_json):
    """List what altclip keeps under ALTCLIP_HOME (default ~/.cache/altclip): weights cast to
    the compute dtype, checkpoints converted from pytorch_model.bin, label embeddings, and the
    search indexes of `--index auto`, each with its size and last use. The same as
    `altclip cache list`.

    The Hugging Face cache, where models are downloaded to, is shared with other tools:
    its place is shown but altclip leaves it alone (`hf cache` manages it).

    \b
    Examples:
      altclip cache
      altclip cache --json | jq -s 'map(.bytes) | add'
      altclip cache clear --older-than 30d
      altclip cache clear --labels
    """
    if ctx.invoked_subcommand is None:
        _list(as_json)
    elif as_json and ctx.invoked_subcommand != "list":
        raise UsageError(f"--json lists entries; it does not go with '{ctx.invoked_subcommand}'",
                         hint="altclip cache --json")


@cache.command("list", short_help="List altclip's cache entries (the default).")
@_json_option
@common_options
def list_(as_json, quiet):
    """List altclip's cache entries: a table on a terminal, else (or with --json) one JSON object
    per entry and a last one of kind "total"."""
    _list(as_json)


@cache.command(short_help="Remove cache entries, all or those unused for a while.")
@click.option("--older-than", metavar="DURATION",
              help="Only entries last used longer ago than this: 90m, 12h, 30d, 2w, 1d12h.")
@click.option("--weights", is_flag=True, help="Weights cast to the compute dtype.")
@click.option("--converted", is_flag=True, help="Checkpoints converted from pytorch_model.bin.")
@click.option("--labels", is_flag=True, help="Label embeddings.")
@click.option("--indexes", is_flag=True,
              help="Search indexes under ALTCLIP_HOME (only when named: rebuilding one embeds every image again).")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@common_options
def clear(older_than, weights, converted, labels, indexes, dry_run, quiet):
    """Remove altclip's cache entries: every kind of cache unless --weights, --converted or
    --labels pick some, and all of them unless --older-than keeps those used recently. Everything
    removed is rebuilt when next needed. Search indexes are removed only with --indexes (with
    --older-than: those not updated for that long). An entry another altclip is writing is
    skipped with a warning. The Hugging Face cache is never touched (`hf cache` manages it).

    \b
    Examples:
      altclip cache clear --older-than 30d
      altclip cache clear --converted --dry-run
      altclip cache clear --indexes --older-than 52w
    """
    from ...cache import inventory

    msgs = messages()
    seconds = None
    if older_than is not None:
        try:
            seconds = inventory.parse_duration(older_than)
        except ValueError as e:
            raise UsageError(f"--older-than: {e}",
                             hint="give a number and a unit (s, m, h, d, w): 90m, 12h, 30d, 2w") from None
    chosen = (weights, converted, labels, indexes)
    picked = [kind for kind, on in zip(inventory.ALL_KINDS, chosen) if on] or list(inventory.KINDS)
    result = inventory.clear(picked, seconds, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for entry in result.removed if dry_run else ():
        msgs.note(f"{verb} {entry.kind}: {entry.name} ({human_size(entry.size)})")
    for entry in result.in_use:
        msgs.warn(f"skipped {entry.kind}: {entry.name}: another altclip process is using it")
    for entry, reason in result.failed:
        msgs.error(f"could not remove {entry.kind}: {entry.name} ({reason})")
    if result.removed:
        kinds = ", ".join(f"{sum(e.kind == k for e in result.removed)} {k}" for k in inventory.ALL_KINDS
                          if any(e.kind == k for e in result.removed))
        msgs.note(f"{verb} {_count(result.removed)} ({kinds}), "
                  f"{'freeing' if dry_run else 'freed'} {human_size(result.freed)}")
    elif result.in_use or result.failed:
        msgs.note(f"{verb} nothing")
    else:
        msgs.note("nothing to remove" + (f" (nothing unused for {older_than})" if older_than else ""))
    return 1 if result.failed else 0


def _list(as_json: bool) -> None:
    from ...cache import inventory
    from ...paths import altclip_home
    from ..formats import dumps
    from ..terminal import isatty

    entries = inventory.entries()
    total = {"kind": "total", "entries": len(entries), "bytes": sum(e.size for e in entries),
             "altclip_home": str(altclip_home()), "hf_cache": str(inventory.hf_cache())}
    if as_json or not isatty(sys.stdout):
        for entry in entries:
            click.echo(dumps(entry.record()))
        click.echo(dumps(total))
        return
    _table(entries, total)


def _table(entries, total: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..terminal import no_color

    console = Console(file=sys.stdout, no_color=no_color(), highlight=False, emoji=False)
    now = time.time()
    if entries:
        table = Table(box=None, pad_edge=False)
        for col in ("kind", "what", "", "size", "last used"):
            table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
        for e in entries:
            rows = f"{e.rows:,} {'rows' if e.kind == 'labels' else 'images'}" if e.rows is not None else "unreadable"
            detail = {"weights": ", ".join(e.precisions), "converted": ""}.get(e.kind, rows)
            table.add_row(e.kind, Text(e.name), detail, human_size(e.size), ago(now - e.last_used))
        console.print(table)
        console.print()
    console.print(Text(f"total: {_count(entries) if entries else 'nothing'}, {human_size(total['bytes'])} "
                       f"in {total['altclip_home']}"))
    if any(e.kind == "indexes" for e in entries):
        console.print(Text("search indexes are removed only when named: `altclip cache clear --indexes`"))
    console.print(Text(f"models are downloaded to the Hugging Face cache, {total['hf_cache']}: shared with "
                       "other tools, left alone here (`hf cache` manages it)"))


def _count(entries) -> str:
    return f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"


def human_size(n: int) -> str:
    """'512 B', '1.7 GB' (powers of 1024)."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def ago(seconds: float) -> str:
    """'just now', '5 minutes ago', '3 hours ago', '2 days ago'."""
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            n = int(seconds // length)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"
