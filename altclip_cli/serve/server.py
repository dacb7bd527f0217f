"""Running `altclip serve`: claim the address (before the model loads, so that a second server
fails at once), load the model, start its thread, serve with uvicorn until Ctrl-C, SIGTERM or
the idle timeout, then stop cleanly: no new connection is taken, the requests in flight are
answered however long they take (an index update of a big folder included), then the socket is
removed. A request waiting for another process's index lock is answered 503 at once instead.

A second Ctrl-C stops at once: each request still in flight is answered 503 ("stopped at
once"), and an index update among them stops at its next batch of images, keeping what it had
committed (run it again to finish); the process exits once that batch is written."""
from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

from .transport import DEFAULT_PORT, SocketClaim, bind_tcp, claim_socket, default_socket_path


@dataclass
class Settings:
    model: str
    device: str = "auto"
    precision: str = "auto"
    revision: str | None = None
    batch_size: int | None = None
    exact_decode: bool = False
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    token: str | None = None
    max_pixels: int | None = None  # None: the library's default cap; 0: none
    max_request_bytes: int = 64_000_000
    max_items: int | None = None  # images or texts per request; None: four batches (state.item_caps)
    allow_hosts: tuple[str, ...] = ()  # Host names a TCP server without a token answers besides its own
    queue_size: int = 64
    batch_window_s: float = 0.005
    idle_timeout: float | None = None
    input_timeout: float | None = 120.0

    @property
    def tcp(self) -> bool:
        return self.host is not None or self.port is not None


def serve(settings: Settings, msgs, load_model) -> int:
    """Serve until stopped; 0 after a clean stop. load_model() -> AltCLIP (the command's loader,
    which prints its notes); msgs: the command's Messages."""
    claim: SocketClaim | None = None
    if not settings.tcp:
        claim = claim_socket(default_socket_path() if settings.socket_path is None else settings.socket_path)
        if claim.replaced_stale:
            msgs.note(f"replaced a stale socket at {claim.path} (its server had stopped)")
    try:
        return _serve(settings, msgs, load_model, claim)
    finally:
        if claim is not None:
            claim.release()


def _serve(settings: Settings, msgs, load_model, claim: SocketClaim | None) -> int:
    import uvicorn

    from ..inputs.images import DEFAULT_MAX_PIXELS
    from ..runtime.device import default_batch_size
    from ..inputs.threads import plan_threads
    from .app import create_app
    from .batcher import Batcher
    from .gate import Gate, stderr_log
    from .jobs import Decoder
    from .state import ServeState, item_caps
    from .transport import HostPolicy

    model = load_model()
    model.tokenizer  # loaded now: request threads share it
    batcher = Batcher(model, text_batch=settings.batch_size or default_batch_size(model.device, "text"),
                      image_batch=settings.batch_size or default_batch_size(model.device, "image"),
                      window_s=settings.batch_window_s, max_waiting=settings.queue_size)
    max_pixels = DEFAULT_MAX_PIXELS if settings.max_pixels is None else (settings.max_pixels or None)
    decoder = Decoder(model, plan_threads(model.device.type).decode_workers, max_pixels, settings.input_timeout)
    if settings.tcp:
        host = settings.host or "127.0.0.1"
        sock = bind_tcp(host, DEFAULT_PORT if settings.port is None else settings.port)
        port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        where = f"http://{shown}:{port}"
        policy = None if settings.token else HostPolicy(host, port, settings.allow_hosts)  # a token is the check
    else:
        sock = claim.bind()
        where = f"unix:{claim.path}"
        policy = None
    max_images, max_texts = item_caps(batcher.image_batch, batcher.text_batch, settings.max_items)
    state = ServeState(model=model, batcher=batcher, decoder=decoder, transport="tcp" if settings.tcp else "unix",
                       max_request_bytes=settings.max_request_bytes, max_images=max_images, max_texts=max_texts,
                       revision=settings.revision,
                       token=settings.token, host_policy=policy, idle_timeout=settings.idle_timeout,
                       log=None if msgs.quiet else stderr_log)
    config = uvicorn.Config(Gate(create_app(state), state), log_config=None, access_log=False, log_level="warning",
                            lifespan="on", ws="none", server_header=False, timeout_graceful_shutdown=None)
    server = _Server(config)
    server.on_stopping = lambda: _say_waiting(state, msgs)
    state.server = server
    batcher.start()
    msgs.note(f"altclip serve: {model.model_id} ({model.device}, {model.precision}) listening on {where}, "
              f"pid {_pid()}; Ctrl-C stops it")
    try:
        server.run(sockets=[sock])
    finally:
        batcher.stop()
        decoder.close()
        sock.close()
    why = state.stop_reason or (f"{signal.Signals(server.stopped_by).name} received" if server.stopped_by else "stopped")
    msgs.note(f"altclip serve: stopped ({why}) after {state.requests} request{'' if state.requests == 1 else 's'}")
    return 0


def _say_waiting(state, msgs) -> None:
    if state.in_flight:
        msgs.note(f"altclip serve: stopping; answering the {state.in_flight} request"
                  f"{'' if state.in_flight == 1 else 's'} in flight first (Ctrl-C again to stop at once)")


def _pid() -> int:
    import os

    return os.getpid()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, with Ctrl-C and SIGTERM as a clean stop: uvicorn raises the signal
        again once it has shut down (the process would die of it); here it only stops serving,
        and the command exits 0. A second Ctrl-C stops without waiting for requests in flight
        (see the module doc). on_stopping() is called once when the stop begins."""

        stopped_by: int | None = None
        on_stopping = None

        async def shutdown(self, sockets=None):
            if self.on_stopping is not None:
                self.on_stopping()
            await super().shutdown(sockets)
            if self.force_exit:  # uvicorn skips the app's shutdown then (its task is cancelled, noisily)
                await self.lifespan.shutdown()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            self.stopped_by = self.stopped_by or sig
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return Server


def _Server(config):  # noqa: N802 - a class made on first use (uvicorn is imported only here)
    return _server_class()(config)
