"""How inputs are named in messages and output records."""
from __future__ import annotations


def display(name: str) -> str:
    """A name safe to print and to put in JSON: undecodable filename bytes become U+FFFD."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
