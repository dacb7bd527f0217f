"""`altclip download`, `altclip info` and `altclip models`: the models and the machine."""

from __future__ import annotations

import json
import os
import platform
import sys

import click

from ...version import __version__
from ...hub.registry import DEFAULT_MODEL
from ..options import DeviceType, common_options, complete_model, messages

LIBRARIES = ("torch", "numpy", "pillow", "tokenizers", "safetensors", "huggingface_hub", "click", "rich")


@click.command(short_help="Fetch a model into the Hugging Face cache.")
@click.argument("model", required=False, envvar="ALTCLIP_MODEL", metavar="[MODEL]", shell_complete=complete_model)
@click.option("--revision", metavar="REV", help="A branch, tag or commit of the hub repo [default: main].")
@common_options
def download(model, revision, quiet):
    """Fetch MODEL into the Hugging Face cache [default: $ALTCLIP_MODEL or BAAI/AltCLIP].

    Files already in the cache (from altclip or transformers) are not fetched again, and an
    interrupted download resumes. A pickle pytorch_model.bin is converted to safetensors once.
    Honours HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE. Prints the model folder on stdout.

    \b
    Examples:
      altclip download
      altclip download BAAI/AltCLIP-m18
    """
    from ...hub import download_model
    from ..terminal import isatty

    msgs = messages()
    model = model or DEFAULT_MODEL
    resolved = download_model(model, revision=revision, progress=not quiet and isatty(msgs.stream))
    click.echo(str(resolved.folder))


@click.command(short_help="Version, device and precision, caches, libraries.")
@click.option("--device", type=DeviceType(), default="auto", show_default=True,
              help="The device to report on (as classify and embed would choose it).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@common_options
def info(device, precision, as_json, quiet):
    """Version, the device and precision altclip would use and why, the caches, the server on the
    default socket (if one runs), library versions."""
    from ...hub import cached_models
    from ...hub.hfcache import hub_cache, offline
    from ...paths import altclip_home
    from ...runtime.device import choose_device, choose_precision

    dev, dev_reason = choose_device(device)
    prec, prec_reason = choose_precision(dev, precision)
    data = {
        "version": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "device": str(dev), "device_reason": dev_reason,
        "precision": prec, "precision_reason": prec_reason,
        "default_model": os.environ.get("ALTCLIP_MODEL") or DEFAULT_MODEL,
        "hf_cache": str(hub_cache()),
        "altclip_home": str(altclip_home()),
        "offline": offline(),
        "cached_models": [m.repo_id for m in cached_models()],
        "server": _server_status(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    lines = [
        f"altclip {data['version']} (python {data['python']}, {data['platform']})",
        f"device: {data['device']} ({dev_reason})",
        f"precision: {prec} ({prec_reason})",
        f"default model: {data['default_model']}",
        f"hugging face cache: {data['hf_cache']}" + (" (offline)" if data["offline"] else ""),
        f"altclip cache: {data['altclip_home']}",
        "cached models: " + (", ".join(data["cached_models"]) or "none"),
        "server: " + _server_line(data["server"]),
        "libraries: " + ", ".join(f"{k} {v or '-'}" for k, v in data["libraries"].items()),
    ]
    click.echo("\n".join(lines))


def _server_status() -> dict:
    """What answers on the default socket: {"socket", "running"} and, when one runs, its model,
    device, precision, altclip version, pid and uptime (strings with their control characters
    escaped); "refused": why a socket there is not asked (it is not this user's private one)."""
    from ...serve.discovery import ask_default_socket

    found = ask_default_socket(timeout=1.0)
    out = {"socket": str(found.path), "running": False}
    if found.refused is not None:
        out["refused"] = found.refused
    if found.info is None:
        return out
    info = found.info
    out.update(running=True, **{k: info.get(k) for k in ("model", "device", "precision", "altclip")},
               pid=info.get("pid") if isinstance(info.get("pid"), int) else None,
               uptime_s=info.get("uptime_s") if isinstance(info.get("uptime_s"), (int, float)) else None)
    return out


def _server_line(server: dict) -> str:
    if server.get("refused"):
        return f"not asking unix:{server['socket']}: {server['refused']}"
    if not server["running"]:
        return f"none on unix:{server['socket']} (`altclip serve` starts one)"
    hours = (server.get("uptime_s") or 0) / 3600
    up = f"{hours:.1f} h" if hours >= 1 else f"{(server.get('uptime_s') or 0) / 60:.0f} min"
    return (f"unix:{server['socket']}: {server['model']} on {server['device']}, {server['precision']} "
            f"(altclip {server['altclip']}, pid {server['pid']}, up {up})")


@click.command(short_help="The known models: size, languages, cached or not.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@common_options
def models(as_json, quiet):
    """The known AltCLIP models, their download size and whether they are cached."""
    from ...hub import KNOWN_MODELS, cached_models
    from ..formats import dumps
    from ..terminal import isatty

    cached = {m.repo_id: m for m in cached_models()}
    rows = []
    for model_id in list(KNOWN_MODELS) + [m for m in cached if m not in KNOWN_MODELS]:
        known, c = KNOWN_MODELS.get(model_id), cached.get(model_id)
        rows.append({
            "id": model_id,
            "languages": list(known.languages) if known else None,
            "download_gb": known.download_gb if known else None,
            "cached": bool(c and c.complete),
            "cached_bytes": c.size_bytes + c.converted_bytes if c else 0,
            "folder": str(c.folder) if c else None,
            "description": known.description if known else "an AltCLIP model found in the cache",
        })
    stdout = sys.stdout
    if as_json or not isatty(stdout):
        for row in rows:
            click.echo(dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    from ..terminal import no_color

    table = Table(box=None, pad_edge=False)
    for col in ("model", "languages", "download", "cached", "description"):
        table.add_column(col)
    for r in rows:
        cached_text = ("yes" if r["cached"] else "partly") + f" ({_size(r['cached_bytes'])})" if r["folder"] else "no"
        langs = ", ".join(r["languages"]) if r["languages"] else "?"
        table.add_row(r["id"], langs, f"{r['download_gb']:.1f} GB" if r["download_gb"] else "?", cached_text,
                      r["description"])
    Console(file=stdout, no_color=no_color(), highlight=False).print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
