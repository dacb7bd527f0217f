"""The `altclip` command line: the group, its commands, and the one place where errors become
`error:`/`hint:` lines and exit codes.

Importing this module is cheap (click only; no torch, numpy, PIL, rich or huggingface_hub):
`altclip --help` and shell completion run it on every call. Commands import what they need.
"""

from __future__ import annotations

import os
import sys

import click

from ..version import __version__
from .commands.check import check
from .commands.cache import cache
from .commands.classify import classify
from .commands.dupes import dupes
from .commands.embed import embed
from .commands.index import index
from .commands.manage import download, info, models
from .commands.merge import merge
from .commands.search import search
from .commands.serve import serve
from .commands.tag import tag
from ..errors import AltclipError
from .options import DEBUG_KEY, MESSAGES_KEY, UsageError, debug_option
from .messages import Messages
from .status import ExitStatus


class CommandFailed(click.ClickException):
    """An AltclipError (or an unexpected exception) on its way to `error:` / `hint:` lines."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = ExitStatus.ERROR):
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


class AltclipGroup(click.Group):
    """Turns every failure into `error: ...` (+ `hint: ...`) on stderr and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, BrokenPipeError):
            raise
        except AltclipError as exc:
            if ctx.meta.get(DEBUG_KEY):
                _print_traceback()
            raise CommandFailed(exc.message, exc.hint, getattr(exc, "exit_code", ExitStatus.ERROR)) from exc
        except MemoryError as exc:
            if ctx.meta.get(DEBUG_KEY):
                _print_traceback()
            raise CommandFailed("out of memory", hint="try a smaller --batch-size") from exc
        except Exception as exc:
            if ctx.meta.get(DEBUG_KEY):
                _print_traceback()
                hint = "this is a bug in altclip: please report it with the traceback above"
            else:
                hint = "this is a bug in altclip: run again with --debug and report the traceback"
            raise CommandFailed(f"unexpected {type(exc).__name__}: {exc}", hint) from exc

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        msgs = Messages()
        try:
            rv = super().main(args, prog_name or "altclip", complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else ExitStatus.OK
        except click.UsageError as exc:
            hint = getattr(exc, "hint", None)
            if hint is None and exc.ctx is not None:
                hint = f"see '{exc.ctx.command_path} --help'"
            msgs.error(exc.format_message(), hint)
            code = ExitStatus.USAGE
        except CommandFailed as exc:
            msgs.error(exc.format_message(), exc.hint)
            code = exc.exit_code
        except click.ClickException as exc:  # click's own, e.g. a file option that cannot be opened
            msgs.error(exc.format_message())
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            msgs.error("interrupted")
            code = ExitStatus.INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`altclip ... | head`): stop quietly, as other Unix tools do.
            _silence_stdout()
            code = ExitStatus.ERROR
        if standalone_mode:
            sys.exit(int(code))
        return int(code)


def _print_traceback() -> None:
    import traceback

    traceback.print_exc(file=sys.stderr)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


@click.group("altclip", cls=AltclipGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="altclip", message="%(prog)s %(version)s")
@debug_option
def cli():
    """altclip: BAAI's multilingual AltCLIP on your own machine.

    Zero-shot image classification with labels in any language, and embeddings of images
    and texts, from the terminal and in shell pipelines. stdout carries data only; progress,
    warnings and errors go to stderr.

    \b
    Examples:
      altclip classify holiday/*.jpg -l 猫 -l dog -l "a beach"
      find photos -name '*.jpg' | altclip embed --image - -o photos.npy
      altclip embed --text captions.txt -o captions.npy
      altclip download BAAI/AltCLIP
      altclip cache clear --older-than 30d

    \b
    Exit codes: 0 all inputs done, 1 error, 2 usage error, 3 done but some inputs failed,
    130 interrupted, 143 terminated (SIGTERM).
    """


for _command in (classify, tag, embed, merge, check, download, info, models, cache, index, search, dupes, serve):
    cli.add_command(_command)


def main(argv=None) -> None:
    """The console script."""
    cli.main(args=argv, prog_name="altclip")


__all__ = ["cli", "main", "ExitStatus", "UsageError", "MESSAGES_KEY"]
