"""Options shared by several commands, as decorator stacks, and the small helpers they need.

Cheap to import (click only): the command line's --help and shell completion load this module.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import nullcontext

import click

from ..env import flag
from ..hub.registry import DEFAULT_MODEL
from ..paths import INDEX_FOLDER_HINT, blank_folder
from .messages import Messages

DEBUG_KEY = "altclip.debug"
MESSAGES_KEY = "altclip.messages"


class UsageError(click.UsageError):
    """A usage error (exit 2) with our own hint line."""

    def __init__(self, message: str, hint: str | None = None, ctx: click.Context | None = None):
        super().__init__(message, ctx)
        self.hint = hint


class DeviceType(click.ParamType):
    """auto, cpu, cuda, cuda:N or mps."""

    name = "device"
    _pattern = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if not self._pattern.fullmatch(text):
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps", param, ctx)
        return text

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in ("auto", "cpu", "cuda", "mps") if c.startswith(incomplete)]


def complete_model(ctx, param, incomplete):
    """Local folders and the known hub ids (hub.py is cheap to import: no huggingface_hub).
    The folder entry comes first: bash's script starts over when it meets one."""
    from click.shell_completion import CompletionItem

    from ..hub.registry import KNOWN_MODELS

    return [CompletionItem(incomplete, type="dir")] + [CompletionItem(m) for m in KNOWN_MODELS if m.startswith(incomplete)]


def debug_from_env() -> bool:
    """ALTCLIP_DEBUG: unset, empty, 0, false, no or off mean off; any other value (1, true, yes, on) on."""
    return flag("ALTCLIP_DEBUG")


def _set_debug(ctx, param, value):
    if value or debug_from_env():
        ctx.meta[DEBUG_KEY] = True
    return value


def _set_quiet(ctx, param, value):
    ctx.meta[MESSAGES_KEY] = Messages(quiet=value)
    _route_library_logging()
    return value


def _route_library_logging() -> None:
    """The library's `logging` warnings (e.g. a CUDA out-of-memory batch halved) become
    `warning:` lines on stderr, silenced by --quiet like ours."""
    log = logging.getLogger("altclip")
    if not any(isinstance(h, _ToMessages) for h in log.handlers):
        log.addHandler(_ToMessages(logging.WARNING))
        log.propagate = False


class _ToMessages(logging.Handler):
    def emit(self, record):
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not end a run
            return
        if record.levelno >= 40:
            messages().error(text)
        else:
            messages().warn(text)


def messages() -> Messages:
    """The current command's stderr side (quiet or not)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and MESSAGES_KEY in ctx.meta:
        return ctx.meta[MESSAGES_KEY]
    return Messages()


def _stack(*decorators):
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, callback=_set_debug, is_eager=True,
    help="Show the Python traceback when something fails, and `debug:` lines (which server answers, "
         "or why none) on stderr (also: ALTCLIP_DEBUG=1).")


def debug_on() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(DEBUG_KEY)) or debug_from_env()


def debug_line(text: str) -> None:
    """A `debug: ...` line on stderr with --debug or ALTCLIP_DEBUG (--quiet does not hide it)."""
    if debug_on():
        click.echo(f"debug: {text}", err=True)

common_options = _stack(
    click.option("-q", "--quiet", is_flag=True, callback=_set_quiet,
                 help="No progress bars, notes or warnings on stderr (errors still show)."),
    debug_option,
)

model_options = _stack(
    click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, envvar="ALTCLIP_MODEL",
                 show_envvar=True, metavar="ID|DIR", shell_complete=complete_model,
                 help="Hub id (downloaded on first use) or a local model folder."),
    click.option("--device", type=DeviceType(), default="auto", show_default=True, envvar="ALTCLIP_DEVICE",
                 show_envvar=True, help="auto picks cuda, then mps, then cpu; cuda:N for another GPU."),
    click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
                 show_default=True, envvar="ALTCLIP_PRECISION", show_envvar=True, help="Compute precision; auto is bf16/fp16 where the hardware is fast at it."),
    click.option("--revision", default=None, metavar="REV",
                 help="A branch, tag or commit of a hub model [default: main]; not for a local folder."),
    click.option("-b", "--batch-size", type=click.IntRange(min=1), default=None, metavar="N",
                 help="Images (or texts, labels) per model batch [default: chosen for the device]."),
)


class ServerSpec(click.ParamType):
    """auto, off, a socket path (or unix:PATH), or an http(s):// URL."""

    name = "server"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if text.lower() in ("auto", "off"):
            return text.lower()
        if not text:
            self.fail("is empty: use auto, off, a socket path or an http(s):// URL", param, ctx)
        if "://" in text:
            from ..serve.client import parse_target

            try:
                parse_target(text)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        return text

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        return [CompletionItem(incomplete, type="file")] + [CompletionItem(c) for c in ("auto", "off")
                                                             if c.startswith(incomplete)]


server_options = _stack(
    click.option("--server", default="auto", show_default=True, envvar="ALTCLIP_SERVER", show_envvar=True,
                 type=ServerSpec(), metavar="auto|off|PATH|URL",
                 help="Use a running `altclip serve` for the model's work. auto: the one on the default socket, "
                      "if it runs the same model, precision, device and decoding, else in-process (--debug says "
                      "which); off: in-process; a socket PATH or http://HOST:PORT: that server, which must answer "
                      "and match."),
    click.option("--token-file", "token_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                 help="The token of a --server URL that asks for one [default: $ALTCLIP_TOKEN]."),
)

image_input_options = _stack(
    click.option("-r", "--recursive", is_flag=True, help="Walk folders given as IMAGES, subfolders included."),
    click.option("--max-pixels", type=click.IntRange(min=0), default=None, metavar="N",
                 envvar="ALTCLIP_MAX_PIXELS",
                 help="Refuse images with more pixels (decompression bombs) [default: about 179 million; 0: no cap]."),
    click.option("--url-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
                 metavar="SECONDS", help="Time allowed to download one image URL."),
    click.option("--url-max-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
                 metavar="MB", help="Size cap for one image URL."),
    click.option("--input-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
                 metavar="SECONDS", help="Time allowed to read and decode one input; one that takes longer "
                                         "(a hung network mount) fails and the run goes on."),
    click.option("--exact-decode", is_flag=True, envvar="ALTCLIP_EXACT_DECODE",
                 help="Decode large JPEGs at full size, bit-exact with the reference's preprocessing "
                      "(default: at a reduced scale that keeps twice the model's input size; faster, "
                      "cosine >= 0.99997)."),
)


# How an index update decodes the images it embeds: index, search and dupes.
index_decode_options = _stack(
    click.option("--max-pixels", type=click.IntRange(min=0), default=None, metavar="N", envvar="ALTCLIP_MAX_PIXELS",
                 help="Refuse images with more pixels (decompression bombs) [default: about 179 million; 0: no cap]."),
    click.option("--input-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
                 metavar="SECONDS", help="Time allowed to read and decode one image; one that takes longer fails."),
    click.option("--exact-decode", is_flag=True, envvar="ALTCLIP_EXACT_DECODE",
                 help="Decode large JPEGs at full size, bit-exact with the reference's preprocessing "
                      "(must match how the index was built)."),
)


# Folders every walk skips unless --exclude-dir replaces them (inputs.walk.DEFAULT_EXCLUDES).
DEFAULT_EXCLUDE_TEXT = ".git, node_modules, @eaDir, System Volume Information, __pycache__"

# How folders are walked, the same for classify/embed -r, index and search.
walk_options = _stack(
    click.option("--include-hidden", is_flag=True, help="Also walk hidden files and folders (names starting with '.')."),
    click.option("--exclude-dir", "exclude_dirs", multiple=True, metavar="NAME",
                 help=f"Skip folders with this name (repeatable; replaces the defaults: {DEFAULT_EXCLUDE_TEXT})."),
)


def excluded_dirs(exclude_dirs) -> tuple | None:
    """The folder names --exclude-dir gives: None when not given (the walk's defaults); an empty
    name (--exclude-dir "") stands for none."""
    return tuple(d for d in exclude_dirs if d) if exclude_dirs else None


def walk_kwargs(include_hidden: bool, exclude_dirs, index_dir: str | None = None, sort_into: str | None = None) -> dict:
    """inputs.sources.expand_images' walk options from the command line: the walk options, and the
    folders the command writes to (an --index DIR, a --sort-into DIR), never walked into."""
    import os

    kw = {"include_hidden": include_hidden,
          "skip_dirs": tuple(os.path.expanduser(d) for d in (index_dir, sort_into) if d and d != "auto")}
    excludes = excluded_dirs(exclude_dirs)
    if excludes is not None:
        kw["exclude_dirs"] = excludes
    return kw

def folder_name(hint: str):
    """Click callback for an option that names a folder: a blank name (paths.blank_folder) is a
    usage error naming the option, with `hint`."""
    def check(ctx, param, value):
        if why := blank_folder(param.opts[0], value):
            raise UsageError(why, hint=hint)
        return value
    return check


def index_option(help: str, default: str | None = "auto"):
    """--index DIR|auto, as every command that reads or writes an index takes it."""
    return click.option("--index", "index_dir", default=default, show_default=default is not None,
                        metavar="DIR|auto", callback=folder_name(INDEX_FOLDER_HINT), help=help)


# The --index option of classify, embed and tag: vectors of unchanged indexed images without the image tower.
reuse_index_option = index_option(
    default=None,
    help="Take the vectors of images that this index (made by `altclip index`; auto: the model's own) "
         "holds unchanged from it instead of running the image tower; the numbers are the same.")


# The metadata filters of search and classify --index (search/filters.py: one parser for them and
# for POST /v1/search).
filter_options = _stack(
    click.option("--after", metavar="DATE",
                 help="Only photos taken on or after DATE: YYYY, YYYY-MM or YYYY-MM-DD (from that period's start)."),
    click.option("--before", metavar="DATE",
                 help="Only photos taken on or before DATE: YYYY, YYYY-MM or YYYY-MM-DD (to that period's end)."),
    click.option("--near", metavar="LAT,LON",
                 help="Only photos taken within --within of this place (decimal degrees, south and west negative)."),
    click.option("--within", metavar="DISTANCE", help="With --near: how far, e.g. 5km or 500m [default: 1km]."),
    click.option("--camera", metavar="TEXT",
                 help="Only photos whose camera make and model contain TEXT (any case, e.g. 'canon', 'iphone 12')."),
)


def search_filter(after, before, near, within, camera, sort=None):
    """The search.filters.SearchFilter of the filter options (and --sort); a UsageError naming the
    option for a bad value."""
    from ..search.filters import FilterError, parse_filter

    try:
        return parse_filter(after=after, before=before, near=near, within=within, camera=camera, sort=sort)
    except FilterError as exc:
        raise UsageError(exc.message_for("--")) from None


def open_kwargs(max_pixels, url_timeout, url_max_mb, draft_min_side=None) -> dict:
    """The keyword arguments of inputs.open_source from the image input options
    (draft_min_side: the loaded model's, see AltCLIP.draft_min_side)."""
    kw = {"url_timeout": url_timeout, "url_max_bytes": int(url_max_mb * 1_000_000),
          "draft_min_side": draft_min_side}
    if max_pixels is not None:
        kw["max_pixels"] = max_pixels or None  # 0: no cap
    return kw


def pil_pixel_limit(max_pixels):
    """inputs.images.pil_pixel_limit for one command's run; PIL is imported only when --max-pixels
    changes anything (a run through a server decodes nothing)."""
    if max_pixels is None:
        return nullcontext()
    from ..inputs.images import pil_pixel_limit as limit

    return limit(max_pixels)


def stdin_binary():
    return sys.stdin.buffer


def stdin_for(images):
    """stdin's binary stream when an IMAGES argument is `-`."""
    return stdin_binary() if "-" in images else None


def load_model(model: str, device: str, precision: str, msgs: Messages, exact_decode: bool = False,
               revision: str | None = None):
    """runtime.load with a note on a terminal (downloads draw their own progress bar)."""
    from ..runtime import altclip as runtime
    from .terminal import isatty

    if revision and os.path.isdir(os.path.expanduser(model)):
        msgs.warn(f"--revision {revision} is ignored: {model} is a local folder, not a hub id")
    if isatty(msgs.stream):
        msgs.note(f"loading {model} ...")
    return runtime.load(model, device=device, precision=precision, exact_decode=exact_decode,
                        revision=revision, progress=not msgs.quiet and isatty(msgs.stream))


def get_model(server: str, token_file: str | None, model: str, device: str, precision: str, msgs: Messages, *,
              exact_decode: bool = False, revision: str | None = None, max_pixels: int | None = None,
              images: bool = True, scores: bool = False, url_timeout: float = 30.0, url_max_mb: float = 64.0,
              input_timeout: float | None = None):
    """The model a command works with: the RemoteModel of the server --server picks
    (serve/discovery.py), else the model loaded in-process (load_model). images: images go to the
    model (the server's decoding must match); scores: the command scores images against labels."""
    remote = connect_server(server, token_file, model, device, precision, msgs, exact_decode=exact_decode,
                            revision=revision, max_pixels=max_pixels, images=images, scores=scores,
                            url_timeout=url_timeout, url_max_mb=url_max_mb, input_timeout=input_timeout)
    if remote is not None:
        return remote
    return load_model(model, device, precision, msgs, exact_decode=exact_decode, revision=revision)


def connect_server(server: str, token_file: str | None, model: str, device: str, precision: str, msgs: Messages, *,
                   exact_decode: bool = False, revision: str | None = None, max_pixels: int | None = None,
                   images: bool = True, scores: bool = False, url_timeout: float = 30.0, url_max_mb: float = 64.0,
                   input_timeout: float | None = None):
    """The RemoteModel of the server --server picks (serve/discovery.connect), or None to run
    in-process; see get_model. input_timeout: --input-timeout, for the local files whose bytes
    the client reads and sends (None: the default)."""
    from ..serve.discovery import Wanted, connect

    wanted = Wanted(model=model, revision=revision, device=device, precision=precision, exact_decode=exact_decode,
                    max_pixels=max_pixels, images=images, scores=scores)
    token = _token(token_file, msgs) if server not in ("auto", "off") else None  # the default socket needs none
    remote = connect(server, wanted, token=token, debug=debug_line, warn=msgs.warn,
                     fetch_kw={"timeout": url_timeout, "max_bytes": int(url_max_mb * 1_000_000)})
    if remote is not None and input_timeout is not None:
        remote.input_timeout = input_timeout
    return remote


def is_remote(model) -> bool:
    """Whether get_model's model is a server's (its vectors come from there)."""
    from ..serve.remote import RemoteModel

    return isinstance(model, RemoteModel)


def _token(token_file: str | None, msgs: Messages) -> str | None:
    if token_file is not None:
        from ..serve.transport import read_token

        return read_token(token_file, warn=msgs.warn)
    return os.environ.get("ALTCLIP_TOKEN", "").strip() or None
