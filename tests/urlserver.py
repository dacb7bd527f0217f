"""A small image server on 127.0.0.1 for URL inputs: one good image and each way a URL can fail."""
from __future__ import annotations

import io
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def png_bytes() -> bytes:
    """The image served at /cat.png: (30, 40) random pixels, the same every time."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _headers(self, status: int, **headers) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), str(value))
        self.end_headers()

    def do_GET(self):
        if self.path == "/cat.png":
            body = png_bytes()
            self._headers(200, Content_Length=len(body))
            self.wfile.write(body)
        elif self.path == "/loop":  # redirects to itself
            self._headers(302, Location="/loop", Content_Length=0)
        elif self.path == "/huge":  # announces 500 MB
            self._headers(200, Content_Length=500 * 1024 * 1024)
        elif self.path == "/big-chunked":  # 40 kB with no Content-Length
            self._headers(200)
            for _ in range(40):
                self.wfile.write(b"\0" * 1000)
        elif self.path == "/slow":  # answers after 1.5 s
            time.sleep(1.5)
            self._headers(204)
        elif self.path == "/trickle":  # headers, then one byte every 0.3 s for ever
            self._headers(200, Content_Length=10_000_000)
            try:
                while True:
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.3)
            except OSError:  # the client gave up
                pass
        elif self.path == "/to-ftp":
            self._headers(302, Location="ftp://127.0.0.1/cat.png", Content_Length=0)
        elif self.path == "/to-file":
            self._headers(301, Location="file:///etc/passwd", Content_Length=0)
        elif self.path == "/hop":  # one redirect to the good image
            self._headers(307, Location="/cat.png", Content_Length=0)
        else:
            self.send_error(404)


@contextmanager
def serve():
    """Yields the server's base URL, http://127.0.0.1:PORT."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
