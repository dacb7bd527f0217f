"""Messages that say nothing: the sink a library call uses when no command line's messages
(cli/messages.Messages) are given, and the progress bar that draws nothing."""
from __future__ import annotations


class NoProgress:
    """A progress bar that draws nothing: a context manager with advance(n)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int = 1) -> None:
        pass


class Silent:
    """Messages (warn, error, note, progress) that go nowhere."""

    quiet = True

    def warn(self, message) -> None:
        pass

    def error(self, message, hint=None) -> None:
        pass

    def note(self, message) -> None:
        pass

    def progress(self, description, total=None, **kw) -> NoProgress:
        return NoProgress()
