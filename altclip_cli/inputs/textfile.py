"""Reading `--text` files and `--labels-file`: UTF-8 lines, row i is line i."""
from __future__ import annotations

import os

from ..errors import InputError
from .names import display


def split_lines(data: bytes, name: str) -> list[str]:
    """Lines of a UTF-8 text file: row i is line i, empty lines included, CRLF or LF endings, a
    final newline ends the last line rather than starting an empty one, a UTF-8 BOM is dropped.
    Bytes that are not UTF-8 raise InputError naming the line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data:
        return []
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{name} line {number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                hint="convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8",
            ) from None
    return lines


def read_text_file(path: str, stdin=None) -> tuple[list[str], str]:
    """(lines, display name) of a text file, `-` for the binary `stdin`."""
    if path == "-":
        return split_lines(stdin.read(), "<stdin>"), "<stdin>"
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{display(path)}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{display(path)}: is a directory, not a text file") from None
    except PermissionError:
        raise InputError(f"{display(path)}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{display(path)}: cannot read ({exc.strerror or exc})") from None
    return split_lines(data, display(path)), display(path)
