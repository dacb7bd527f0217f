"""Shell completion scripts for bash, zsh and fish, generated from the Click app.

The scripts in the repository's completions/ folder are this module's output; a test checks
they are current. Regenerate them with `python -m altclip_cli.cli.completions completions/`.
Completion itself calls `altclip` with _ALTCLIP_COMPLETE set on every TAB, which imports only
the cheap command-line modules (no torch).
"""

from __future__ import annotations

import sys
from pathlib import Path

# file name in completions/ -> shell
FILES = {"altclip.bash": "bash", "_altclip": "zsh", "altclip.fish": "fish"}


def script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from . import cli

    cls = get_completion_class(shell)
    return cls(cli, {}, "altclip", "_ALTCLIP_COMPLETE").source().rstrip("\n") + "\n"


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, shell in FILES.items():
        path = folder / name
        path.write_text(script(shell), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(path)
