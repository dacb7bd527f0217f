"""What the commands write on stdout: data only (tables, json, jsonl, csv), the records behind
them being outputs/records.py's. rich is imported when a table is first drawn."""

from __future__ import annotations

import csv
import json

from ..outputs.records import UNSURE
from .terminal import no_color

FORMATS = ("table", "json", "jsonl", "csv")


def default_format(output: str | None, stdout_is_tty: bool) -> str:
    """The format of a command's results when -f is not given: html for -o *.html (*.htm), jsonl
    for another -o FILE, a table on a terminal, jsonl into a pipe or file."""
    if output is not None:
        return "html" if output.lower().endswith((".html", ".htm")) else "jsonl"
    return "table" if stdout_is_tty else "jsonl"


def results_format(fmt: str | None, null: bool, output: str | None, stdout_is_tty: bool, *, page: str) -> str:
    """The format of a command that prints paths, records or a page (search, dupes): "paths" with
    -0, else -f as given, else default_format's. UsageError for -0 with another -f, and for a page
    sent to a terminal (page: the file name the hint suggests, e.g. "results.html")."""
    from .options import UsageError

    if null:
        if fmt not in (None, "paths"):
            raise UsageError(f"-0 prints NUL-separated paths; it does not go with -f {fmt}",
                             hint="leave out -f with -0")
        return "paths"
    if fmt is None:
        return default_format(output, stdout_is_tty)
    if fmt == "html" and output is None and stdout_is_tty:
        raise UsageError("-f html writes a page: give it a file", hint=f"add -o {page} (or pipe the output)")
    return fmt


def dumps(obj) -> str:
    """One compact JSON line, any script kept readable (not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


class JsonlWriter:
    def __init__(self, stream):
        self.stream = stream

    def write(self, record: dict) -> None:
        self.stream.write(dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class JsonWriter:
    """One JSON array, streamed: one object per line between the brackets."""

    def __init__(self, stream):
        self.stream = stream
        self.count = 0

    def write(self, record: dict) -> None:
        self.stream.write(("[\n" if self.count == 0 else ",\n") + dumps(record))
        self.stream.flush()
        self.count += 1

    def close(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")
        self.stream.flush()


class CsvWriter:
    """One row per (image, label): image,rank,label,prob,logit,error,top; a failed image gives one row
    with only image and error. top is the image's best label on each of its rows, empty when unsure."""

    HEADER = ("image", "rank", "label", "prob", "logit", "error", "top")

    def __init__(self, stream):
        self.stream = stream
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(self.HEADER)

    def write(self, record: dict) -> None:
        if "error" in record:
            self.writer.writerow([record["image"], "", "", "", "", record["error"], ""])
        else:
            top = record.get("top") or ""
            for rank, s in enumerate(record["scores"], start=1):
                self.writer.writerow([record["image"], rank, s["label"], s["prob"], s["logit"], "", top])
        self.stream.flush()

    def close(self) -> None:
        pass


class TableWriter:
    """A rich table per image: label, probability and a bar. Failed images are reported on
    stderr only (the table is for reading, the other formats keep error records)."""

    BAR_WIDTH = 24

    def __init__(self, stream):
        from rich.console import Console

        self.console = Console(file=stream, no_color=no_color(), highlight=False, emoji=False)

    def write(self, record: dict) -> None:
        if "error" in record:
            return
        from rich import box
        from rich.table import Table
        from rich.text import Text

        title = Text(record["image"], style="bold")
        if "top" in record and record["top"] is None:
            title.append(f"  {UNSURE}", style="yellow")
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD,
                      show_edge=False, pad_edge=False)
        table.add_column("label", overflow="fold")
        table.add_column("prob", justify="right")
        table.add_column("", no_wrap=True)
        for s in record["scores"]:
            table.add_row(Text(s["label"]), f"{100 * s['prob']:.1f}%", Text(bar(s["prob"], self.BAR_WIDTH), style="green"))
        self.console.print(table)
        self.console.print()

    def close(self) -> None:
        pass


class SummaryWriter:
    """One table for many images: a row per image (its best label and probability, then the
    runner-up, or ranks 2..K with -k K; "(unsure)" below --min-prob), then a count per label.
    Rows are drawn at the end; failed images are counted here and named on stderr."""

    def __init__(self, stream, labels, top_k: int | None = None):
        from rich.console import Console

        self.console = Console(file=stream, no_color=no_color(), highlight=False, emoji=False)
        self.labels = list(dict.fromkeys(labels))
        self.ranks = max(1, min(top_k if top_k is not None else 2, len(self.labels)))
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("image", overflow="fold")
        table.add_column("best", overflow="fold")
        table.add_column("prob", justify="right")
        for rank in range(2, self.ranks + 1):
            table.add_column("runner-up" if self.ranks == 2 else ordinal(rank), overflow="fold")
        counts = dict.fromkeys(self.labels, 0)
        unsure = failed = 0
        for r in self.records:
            if "error" in r:
                failed += 1
                continue
            scores = r["scores"]
            top = r.get("top", scores[0]["label"] if scores else None)
            if top is None:
                unsure += 1
                best = Text(f"{UNSURE} {scores[0]['label']}" if scores else UNSURE, style="yellow")
            else:
                counts[top] = counts.get(top, 0) + 1
                best = Text(top)
            others = [Text(f"{s['label']} {100 * s['prob']:.1f}%") for s in scores[1:self.ranks]]
            others += [Text("")] * (self.ranks - 1 - len(others))
            table.add_row(Text(r["image"]), best, f"{100 * scores[0]['prob']:.1f}%" if scores else "", *others)
        self.console.print(table)
        self.console.print()
        tally = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        tally.add_column("label", overflow="fold")
        tally.add_column("images", justify="right")
        for label, n in counts.items():
            tally.add_row(Text(label), str(n))
        if unsure:
            tally.add_row(Text(UNSURE, style="yellow"), str(unsure))
        if failed:
            tally.add_row(Text("(failed)", style="red"), str(failed))
        self.console.print(tally)


SUMMARY_AFTER = 3  # a table shows more images than this as one summary table


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def bar(fraction: float, width: int) -> str:
    """A bar of block characters, in eighths: readable without colour."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[rest] if rest else "")


def classify_writer(fmt: str, stream, *, images: int = 0, labels=(), top_k: int | None = None):
    """The writer for fmt; a table of more than SUMMARY_AFTER images is one SummaryWriter table."""
    if fmt == "table" and images > SUMMARY_AFTER:
        return SummaryWriter(stream, labels, top_k)
    return {"table": TableWriter, "json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter}[fmt](stream)


# --- embed -------------------------------------------------------------------------------------------


def embedding_line(row: int, key: str, value: str, embedding) -> str:
    """{"row": i, "image"/"text": ..., "embedding": [...]} with float32's shortest round-trip digits."""
    floats = ", ".join(str(v) for v in embedding)  # numpy scalars print their shortest exact form
    head = dumps({"row": row, key: value})
    return f'{head[:-1]}, "embedding": [{floats}]}}'
