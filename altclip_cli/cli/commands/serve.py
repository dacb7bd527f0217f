"""`altclip serve`: keep the model loaded and answer over HTTP (a Unix socket by default)."""

from __future__ import annotations

import click

from ...errors import AltclipError
from ..options import UsageError, common_options, messages, model_options

EXTRA_MODULES = ("fastapi", "uvicorn", "multipart")  # what `pip install 'altclip[serve]'` brings


@click.command(short_help="Keep the model loaded and answer requests over a socket.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="Listen on this Unix socket [default: $XDG_RUNTIME_DIR/altclip/altclip.sock, else "
                   "altclip-$UID/altclip.sock in the temp folder]. Its folder must be yours and private (0700).")
@click.option("--host", default=None, metavar="HOST",
              help="Listen on TCP at this address instead [default with --port: 127.0.0.1]. An address "
                   "other than loopback needs --token-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="TCP port (0: any free port, printed at start) [default with --host: 8790].")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Require `Authorization: Bearer TOKEN` on every request, TOKEN being this file's content.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME[:PORT]",
              help="Also answer requests naming the server so in their Host header (a TCP server without a "
                   "token answers only its own address, against DNS rebinding), e.g. the local end of an SSH "
                   "tunnel. Repeatable.")
@click.option("--max-pixels", type=click.IntRange(min=0), default=None, metavar="N", envvar="ALTCLIP_MAX_PIXELS",
              help="Refuse images with more pixels (decompression bombs) [default: about 179 million; 0: no cap].")
@click.option("--max-request-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              metavar="MB", help="Refuse requests larger than this (413), uploads included.")
@click.option("--max-items", type=click.IntRange(min=1), default=None, metavar="N",
              help="Refuse requests with more images or texts than this (413) [default: 4 batches of images, "
                   "and 4 batches or 1024 texts, whichever is more].")
@click.option("--input-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              metavar="SECONDS", help="Time allowed to read and decode one image.")
@click.option("--exact-decode", is_flag=True, envvar="ALTCLIP_EXACT_DECODE",
              help="Decode large JPEGs at full size, bit-exact with the reference's preprocessing.")
@click.option("--queue-size", type=click.IntRange(min=1), default=64, show_default=True, metavar="N",
              help="Requests that may wait for the model; more are answered 503 with Retry-After.")
@click.option("--batch-window-ms", type=click.FloatRange(min=0), default=5.0, show_default=True, metavar="MS",
              help="How long the model waits for more requests to share a forward pass.")
@click.option("--idle-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Exit after this long without requests [default: never].")
@model_options
@common_options
def serve(socket_path, host, port, token_file, allow_hosts, max_pixels, max_request_mb, max_items, input_timeout,
          exact_decode, queue_size, batch_window_ms, idle_timeout, model, device, precision, revision, batch_size,
          quiet):
    """Keep the model loaded and answer requests over HTTP, until Ctrl-C (or SIGTERM).

    By default it listens on a Unix socket that only you can reach. Requests that arrive
    together share a forward pass. One line per request goes to stderr.

    \b
    Endpoints (JSON):
      GET  /v1/health       version, model, weights, device, precision, pid, uptime
      POST /v1/classify     images (upload, base64, or a path) + labels: classify's records
      POST /v1/embed        texts or images: embeddings
      POST /v1/embeddings   the OpenAI embeddings API (data:image URIs are images)

    \b
    Examples:
      altclip serve
      curl --unix-socket $XDG_RUNTIME_DIR/altclip/altclip.sock http://localhost/v1/health
      curl --unix-socket $XDG_RUNTIME_DIR/altclip/altclip.sock -F image=@cat.jpg -F label=猫 -F label=dog http://localhost/v1/classify
      altclip serve --port 8790               # TCP on 127.0.0.1
      altclip serve --host 0.0.0.0 --port 8790 --token-file ~/.config/altclip/token
    """
    msgs = messages()
    tcp = host is not None or port is not None
    if socket_path is not None and tcp:
        raise UsageError("give either --socket or --host/--port, not both")
    if token_file is not None and not tcp:
        raise UsageError("--token-file is for TCP (--host/--port); the Unix socket is private to you already")
    if allow_hosts and (not tcp or token_file is not None):
        raise UsageError("--allow-host is for a TCP server without --token-file (the Unix socket has no Host check, "
                         "and a server with a token answers any Host)")
    from ...serve.transport import is_loopback, read_token, split_host

    for name in allow_hosts:
        if split_host(name) is None or not split_host(name)[0]:
            raise UsageError(f"--allow-host {name!r} is not a host name, NAME or NAME:PORT")
    if tcp and not is_loopback(host or "127.0.0.1") and token_file is None:
        raise UsageError(f"--host {host} is not a loopback address: anyone who can reach it could use the server",
                         hint="pass --token-file FILE (clients send Authorization: Bearer TOKEN), "
                              "or listen on 127.0.0.1")
    if tcp and token_file is None:
        msgs.warn("a TCP server without --token-file answers every user of this machine (and any program they "
                  "run); the Unix socket (the default) or --token-file keeps it yours")
    _check_extra()
    token = read_token(token_file, warn=msgs.warn) if token_file else None

    from ...serve.server import Settings, serve as run
    from ..options import load_model, pil_pixel_limit

    settings = Settings(model=model, device=device, precision=precision, revision=revision, batch_size=batch_size,
                        exact_decode=exact_decode, socket_path=socket_path, host=host, port=port, token=token,
                        max_pixels=max_pixels, max_request_bytes=int(max_request_mb * 1_000_000),
                        max_items=max_items, allow_hosts=tuple(allow_hosts),
                        queue_size=queue_size, batch_window_s=batch_window_ms / 1000, idle_timeout=idle_timeout,
                        input_timeout=input_timeout)
    with pil_pixel_limit(max_pixels):
        return run(settings, msgs, lambda: load_model(model, device, precision, msgs, exact_decode=exact_decode,
                                                      revision=revision))


def _check_extra() -> None:
    import importlib.util

    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise AltclipError(f"altclip serve needs the serve extra ({', '.join(missing)} not installed)",
                           hint="pip install 'altclip[serve]'")
