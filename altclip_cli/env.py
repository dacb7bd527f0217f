"""Reading altclip's environment flags one way everywhere."""
from __future__ import annotations

import os

OFF = frozenset({"", "0", "false", "no", "off"})


def flag(name: str) -> bool:
    """On for any value but unset, empty, 0, false, no and off (any case, spaces trimmed)."""
    return os.environ.get(name, "").strip().lower() not in OFF
