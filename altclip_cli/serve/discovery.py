"""Which server a command may use: `connect` turns --server (auto, off, a socket path, a URL)
into a RemoteModel (serve/remote.py) or None to run in-process, and `mismatch` says whether a
server computes what the command would in-process.

    remote = connect("auto", Wanted(model="BAAI/AltCLIP", precision="auto", ...))
    model = remote or altclip_cli.load(...)          # the same calls from here on

What "the same model" means without loading it (`mismatch`): the protocol; the model folder (a
local folder by its real path, a hub id by the snapshot its revision names in this machine's
Hugging Face cache) against the server's `model_folder`; an explicit --device against the
server's, while auto takes any; --precision auto against a server that chose its precision
too, an explicit one against the server's; and, when images go to the server, the decoding
(--exact-decode) and the pixel cap. When unsure, it is not the same.

The default socket is asked only when it is a socket of this user's in a private folder of this
user's (`ask_default_socket`, for --server auto and `altclip info` alike). No torch, numpy or PIL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .client import (PROTOCOL, RequestFailed, ServerDown, ServerError, ServerMismatch, ServerTimeout, health,
                     parse_target)
from .remote import RemoteModel
from .transport import default_socket_path, socket_problem

AUTO_HEALTH_TIMEOUT = 2.0  # auto asks the default socket this long before it runs in-process
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)  # as inputs.images.DEFAULT_MAX_PIXELS (which imports PIL)


@dataclass(frozen=True)
class Wanted:
    """What a command would load in-process, to compare with a server's /v1/health."""

    model: str
    revision: str | None = None
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # auto, fp32, fp16, bf16
    exact_decode: bool = False
    max_pixels: int | None = None  # --max-pixels: None the default cap, 0 none
    images: bool = True  # images go to the server: its decoding must be ours
    scores: bool = False  # the command scores images against labels (needs the logit scale)


def mismatch(info: dict, wanted: Wanted) -> str | None:
    """Why the server of `info` (its /v1/health) does not compute what the command would
    in-process, or None when it does."""
    if info.get("status") != "ok":
        return f"it is not ready (status {info.get('status')!r})"
    if info.get("protocol") != PROTOCOL:
        return f"it speaks protocol {info.get('protocol')} (altclip {info.get('altclip')}), this altclip {PROTOCOL}"
    folder, why = model_folder(wanted.model, wanted.revision)
    if folder is None:
        return why
    theirs = info.get("model_folder")
    if not theirs or os.path.realpath(folder) != os.path.realpath(theirs):
        return f"it runs {_named(str(info.get('model')), theirs)}, not {_named(wanted.model, folder)}"
    if wanted.device != "auto" and not _same_device(wanted.device, str(info.get("device"))):
        return f"it runs on {info.get('device')}, not {wanted.device}"
    if wanted.precision == "auto":
        if info.get("precision_requested") != "auto":
            asked = info.get("precision_requested") or "a precision it does not report"
            return f"it was started with --precision {asked}, this command asks for auto"
    elif info.get("precision") != wanted.precision:
        return f"it computes at {info.get('precision')}, this command at {wanted.precision}"
    if wanted.images:
        if info.get("exact_decode") is not (wanted.exact_decode is True):
            has = {True: "with", False: "without"}.get(info.get("exact_decode"), "not saying whether with")
            ours = "with" if wanted.exact_decode else "without"
            return f"it decodes images {has} --exact-decode, this command {ours}"
        ours = DEFAULT_MAX_PIXELS if wanted.max_pixels is None else (wanted.max_pixels or None)
        limits = info.get("limits") or {}
        if "max_pixels" not in limits or limits["max_pixels"] != ours:
            return f"its pixel cap is {limits.get('max_pixels', 'unknown')}, this command's {ours}"
    if wanted.scores and not isinstance(info.get("logit_scale"), (int, float)):
        return "it does not report its logit scale (an older altclip)"
    if not isinstance(info.get("embed_dim"), int) or not info.get("weights"):
        return "it does not report its embedding width and weights"
    return None


def model_folder(model: str, revision: str | None) -> tuple[str | None, str]:
    """(the folder `model` resolves to here without downloading anything, or None and why not).
    A local folder as runtime.load takes it; a hub id as the cached snapshot of `revision`."""
    local = os.path.expanduser(model)
    if os.path.isdir(local):
        return os.path.realpath(local), ""
    from ..hub.hfcache import cached_snapshot

    snapshot = cached_snapshot(model, revision)
    if snapshot is None:
        rev = f" (revision {revision})" if revision else ""
        return None, (f"{model}{rev} is neither a local folder nor in this machine's Hugging Face cache, so it "
                      "cannot be compared")
    return os.path.realpath(snapshot), ""


def _named(model: str, folder: str | None) -> str:
    same = folder and os.path.realpath(os.path.expanduser(model)) == os.path.realpath(folder)
    return model if same else f"{model} ({folder or 'no folder given'})"


def _same_device(asked: str, served: str) -> bool:
    def norm(d: str) -> str:
        return "cuda:0" if d == "cuda" else d

    return norm(asked.lower()) == norm(served.lower())


# --- choosing the server ------------------------------------------------------------------------------


def connect(spec: str, wanted: Wanted, *, token: str | None = None,
            debug: Callable[[str], None] = lambda line: None, warn: Callable[[str], None] = lambda line: None,
            fetch_kw: dict | None = None) -> RemoteModel | None:
    """The RemoteModel of the server `spec` names, or None to run in-process.
    spec: "off" (None), "auto" (the default socket's server when one answers and matches,
    else None; `debug` says which and why), or a socket path / http(s) URL, which must answer
    and match: ServerDown, ServerTimeout, ServerMismatch or RequestFailed (401) otherwise."""
    spec = (spec or "auto").strip()
    if spec.lower() == "off":
        debug("server: off (--server off or ALTCLIP_SERVER=off): running in-process")
        return None
    if spec.lower() == "auto":
        return _auto(wanted, debug, warn, fetch_kw)
    target = parse_target(spec, token)
    try:
        info = health(target)
    except ServerDown as exc:
        raise ServerDown(f"--server {spec}: {exc.message}",
                         hint="start it with `altclip serve` (--socket PATH, or --port for TCP), or use --server "
                              "auto, which runs in-process when no server answers") from None
    except ServerTimeout as exc:
        raise ServerTimeout(f"--server {spec}: {exc.message}", hint=exc.hint) from None
    except RequestFailed as exc:
        hint = "set ALTCLIP_TOKEN or --token-file to the server's token" if exc.status == 401 else exc.hint
        raise RequestFailed(exc.status, f"--server {spec}: {exc.message}", exc.error, hint=hint) from None
    except ServerMismatch as exc:
        raise ServerMismatch(f"--server {spec}: {exc.message}", hint=exc.hint) from None
    why = mismatch(info, wanted)
    if why is not None:
        raise ServerMismatch(f"the server at {target} does not compute what this command asks for: {why}",
                             hint="start `altclip serve` with the same -m, --revision, --device, --precision, "
                                  "--exact-decode and --max-pixels, or use --server off to run in-process")
    debug(f"server: using {target} ({_describe(info)})")
    return RemoteModel(target, info, model_id=wanted.model, fetch_kw=fetch_kw)


def _auto(wanted: Wanted, debug, warn, fetch_kw) -> RemoteModel | None:
    found = ask_default_socket(AUTO_HEALTH_TIMEOUT)
    where = f"unix:{found.path}"
    if found.refused is not None:
        warn(f"not using the server socket {found.path}: {found.refused}")
        debug(f"server: {where} is not private: running in-process")
        return None
    if found.info is None:
        debug(f"server: {found.silent}: running in-process")
        return None
    why = mismatch(found.info, wanted)
    if why is not None:
        debug(f"server: {where} does not match ({why}): running in-process")
        return None
    debug(f"server: using {where} ({_describe(found.info)})")
    return RemoteModel(parse_target(str(found.path)), found.info, model_id=wanted.model, fetch_kw=fetch_kw)


@dataclass(frozen=True)
class DefaultSocket:
    """What answers on the default socket (transport.default_socket_path): its server's health,
    or why it was not asked (`refused`: not a private socket of this user's) or did not answer
    (`silent`)."""

    path: Path
    info: dict | None = None
    refused: str | None = None
    silent: str | None = None


def ask_default_socket(timeout: float) -> DefaultSocket:
    """The default socket's server, asked only when the socket passes transport.socket_problem
    (every reader of the default socket comes here: `--server auto`, `altclip info`)."""
    path = default_socket_path()
    if not os.path.lexists(path):
        return DefaultSocket(path, silent=f"none at unix:{path}")
    problem = socket_problem(path)
    if problem is not None:
        return DefaultSocket(path, refused=problem)
    try:
        return DefaultSocket(path, info=health(str(path), timeout=timeout))
    except ServerError as exc:
        return DefaultSocket(path, silent=f"unix:{path} does not answer ({exc.message})")


def _describe(info: dict) -> str:
    return (f"altclip {info.get('altclip')}, pid {info.get('pid')}: {info.get('model')}, {info.get('device')}, "
            f"{info.get('precision')}")
