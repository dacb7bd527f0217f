"""What the commands need to know about the terminal."""
from __future__ import annotations

import os


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
