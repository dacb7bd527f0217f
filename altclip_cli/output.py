"""What the commands print: data writers for stdout, and the stderr side (messages, progress).

stdout carries data only (tables, json, jsonl, csv); errors, warnings and progress go to stderr.
Colour only on a terminal and never with NO_COLOR set. rich is imported when first needed.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Sequence

FORMATS = ("table", "json", "jsonl", "csv")


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def dumps(obj) -> str:
    """One compact JSON line, any script kept readable (not \\u-escaped)."""
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def number(x) -> float:
    """A float32 as a short JSON number (6 significant digits)."""
    return float(f"{float(x):.6g}")


# --- stderr ----------------------------------------------------------------------------------------


class Messages:
    """The stderr side: `error:` / `warning:` / `hint:` lines, notes, and a progress bar on a terminal."""

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self._stream = stream

    @property
    def stream(self):
        return self._stream or sys.stderr

    def _color(self) -> bool:
        return isatty(self.stream) and not no_color()

    def _line(self, tag: str, color: str, text: str) -> None:
        import click

        prefix = click.style(tag, fg=color, bold=True) if self._color() else tag
        click.echo(f"{prefix} {text}", file=self.stream, color=self._color())

    def error(self, message: str, hint: str | None = None) -> None:
        self._line("error:", "red", message)
        if hint:
            self._line("hint:", "cyan", hint)

    def warn(self, message: str) -> None:
        if not self.quiet:
            self._line("warning:", "yellow", message)

    def note(self, message: str) -> None:
        if not self.quiet:
            import click

            click.echo(message, file=self.stream)

    def progress(self, description: str, total: int | None = None, *, data_to_stdout: bool = False):
        """A context manager giving `advance(n)`; draws a bar only on a terminal, never when quiet,
        and not while the command's data goes to a terminal (the output shows the progress there)."""
        if self.quiet or not isatty(self.stream) or (data_to_stdout and isatty(sys.stdout)):
            return _NoProgress()
        return _RichProgress(self.stream, description, total)

    def status(self, text: str):
        """A spinner while something slow happens (loading a model), on a terminal only."""
        if self.quiet or not isatty(self.stream):
            return _NoProgress()
        from rich.console import Console

        return Console(file=self.stream, no_color=no_color()).status(text)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int = 1) -> None:
        pass


class _RichProgress:
    def __init__(self, stream, description, total):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=stream, no_color=no_color())
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=console, transient=True,
                                  redirect_stdout=False)  # data keeps its own stream; stderr lines print above the bar
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def advance(self, n: int = 1) -> None:
        self._progress.advance(self._task, n)


# --- classify ---------------------------------------------------------------------------------------


def score_record(image: str, labels: Sequence[str], probs, logits, top_k: int | None) -> dict:
    """{"image": ..., "scores": [{"label", "prob", "logit"}, ...]} sorted by prob, descending;
    equal probabilities keep the labels' order. Repeated labels stay separate entries."""
    order = sorted(range(len(labels)), key=lambda j: -float(probs[j]))
    if top_k is not None:
        order = order[:top_k]
    return {"image": image,
            "scores": [{"label": labels[j], "prob": number(probs[j]), "logit": number(logits[j])} for j in order]}


def error_record(image: str, error: str) -> dict:
    return {"image": image, "error": error}


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
    """One row per (image, label): image,rank,label,prob,logit,error; a failed image gives one row
    with only image and error."""

    HEADER = ("image", "rank", "label", "prob", "logit", "error")

    def __init__(self, stream):
        self.stream = stream
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(self.HEADER)

    def write(self, record: dict) -> None:
        if "error" in record:
            self.writer.writerow([record["image"], "", "", "", "", record["error"]])
        else:
            for rank, s in enumerate(record["scores"], start=1):
                self.writer.writerow([record["image"], rank, s["label"], s["prob"], s["logit"], ""])
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

        table = Table(title=Text(record["image"], style="bold"), title_justify="left", box=box.SIMPLE_HEAD,
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


def bar(fraction: float, width: int) -> str:
    """A bar of block characters, in eighths: readable without colour."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[rest] if rest else "")


def classify_writer(fmt: str, stream):
    return {"table": TableWriter, "json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter}[fmt](stream)


# --- embed -------------------------------------------------------------------------------------------


def embedding_line(row: int, key: str, value: str, embedding) -> str:
    """{"row": i, "image"/"text": ..., "embedding": [...]} with float32's shortest round-trip digits."""
    floats = ", ".join(str(v) for v in embedding)  # numpy scalars print their shortest exact form
    head = dumps({"row": row, key: value})
    return f'{head[:-1]}, "embedding": [{floats}]}}'
