"""The stderr side of every command: `error:` / `warning:` / `hint:` lines, notes, and a progress
bar on a terminal. Colour only on a terminal and never with NO_COLOR set; rich is imported when
first needed."""

from __future__ import annotations

import sys

from ..quiet import NoProgress
from .terminal import isatty, no_color


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
            return NoProgress()
        return _RichProgress(self.stream, description, total)

    def status(self, text: str):
        """A spinner while something slow happens (loading a model), on a terminal only."""
        if self.quiet or not isatty(self.stream):
            return NoProgress()
        from rich.console import Console

        return Console(file=self.stream, no_color=no_color()).status(text)


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


# --- what a server says while it works for a command ------------------------------------------------


def replay(lines: list[dict], msgs) -> None:
    """A server's messages (serve/searching.RecordedMessages) printed as this command's own."""
    for line in lines:
        if line.get("level") == "error":
            msgs.error(line.get("message", ""), hint=line.get("hint"))
        elif line.get("level") == "warning":
            msgs.warn(line.get("message", ""))
        else:
            msgs.note(line.get("message", ""))


class ServerProgress:
    """An indexing bar drawn from the numbers a server reports while it indexes: the callback of
    serve.remote.RemoteModel.search and .index (done, total)."""

    def __init__(self, msgs):
        self.msgs, self.bar, self.shown = msgs, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.msgs.progress("indexing (altclip serve)", total=total).__enter__()
        self.bar.advance(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None
