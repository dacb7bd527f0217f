"""What the server's parts share while it runs (`ServeState`): the model, its thread, the
decoders, the limits, the counters, and what /v1/health reports of them."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ..version import __version__
from .batcher import Batcher
from .client import PROTOCOL
from .transport import HostPolicy


@dataclass
class ServeState:
    """What the routes and the gate share: the model, its thread, the decoders, the limits and
    the counters."""

    model: object  # altclip_cli.runtime.altclip.AltCLIP
    batcher: Batcher
    decoder: object  # jobs.Decoder
    transport: str  # "unix" or "tcp"
    max_request_bytes: int
    max_images: int = 64  # images per request (413 beyond)
    max_texts: int = 1024  # texts per request (413 beyond)
    revision: str | None = None
    token: str | None = None
    host_policy: HostPolicy | None = None
    idle_timeout: float | None = None
    log: object = None  # callable(line) for the request log, or None
    started: float = field(default_factory=time.monotonic)
    started_epoch: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    requests: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    server: object = None  # the uvicorn.Server, for the idle timeout
    stop_reason: str | None = None
    indexing: dict = field(default_factory=dict)  # the index updates of searches under way: their progress

    def health(self) -> dict:
        m = self.model
        return {
            "status": "ok", "altclip": __version__, "protocol": PROTOCOL,
            "model": m.model_id, "model_folder": str(m.folder), "revision": self.revision,
            "weights": m.weights_id, "device": str(m.device), "precision": m.precision,
            "device_requested": requested(m.device_reason, str(m.device)),
            "precision_requested": requested(m.precision_reason, m.precision),
            "exact_decode": bool(m.exact_decode), "logit_scale": m.logit_scale,
            "embed_dim": m.embed_dim, "pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3),
            "transport": self.transport, "paths": self.transport == "unix", "search": self.transport == "unix",
            "limits": {"max_pixels": self.decoder.max_pixels, "max_request_bytes": self.max_request_bytes,
                       "max_images": self.max_images, "max_texts": self.max_texts,
                       "queue_size": self.batcher.max_waiting, "image_batch": self.batcher.image_batch,
                       "text_batch": self.batcher.text_batch, "batch_window_ms": self.batcher.window_s * 1000,
                       "idle_timeout_s": self.idle_timeout},
            "requests": self.requests, "in_flight": self.in_flight, "waiting": self.batcher.waiting,
            "indexing": [dict(update) for update in list(self.indexing.values())],
            "batching": self.batcher.stats.as_dict(),
        }


def item_caps(image_batch: int, text_batch: int, max_items: int | None) -> tuple[int, int]:
    """(images, texts) one request may hold: max_items for both when given, else four batches
    of each, and at least MIN_TEXTS texts (what a client sends in one request)."""
    if max_items is not None:
        return max_items, max_items
    return 4 * image_batch, max(4 * text_batch, MIN_TEXTS)


MIN_TEXTS = 1024


def requested(reason: str, resolved: str) -> str:
    """What `serve` was asked for: "auto", or the device or precision named (runtime.device's
    reasons start with "auto" when it chose). A client's --precision auto matches only a server
    that chose too."""
    return "auto" if reason.startswith("auto") else resolved
