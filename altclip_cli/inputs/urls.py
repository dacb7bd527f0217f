"""Downloading one image URL with a deadline for the whole download, a size cap, and redirects
followed to http(s) only.

urllib's own timeout bounds each socket operation, not the download: a server that sends a byte
every few seconds would keep it going for ever. Here every read gets the time that is left
(`read1` returns what has arrived instead of waiting for a full buffer), so the download ends at
the deadline whatever the server does. Proxies from the environment are honoured, as by urllib.
"""
from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin, urlsplit

from ..errors import InputError

URL_PREFIXES = ("http://", "https://")
DEFAULT_URL_TIMEOUT = 30.0  # seconds, for the whole download of one URL
DEFAULT_URL_MAX_BYTES = 64 * 1000 * 1000  # 64 MB
MAX_REDIRECTS = 10
CHUNK = 64 * 1024


class _Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline")
        return left


class _BadRedirect(Exception):
    def __init__(self, target: str):
        super().__init__(target)
        self.target = target


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects only: urllib would also follow one to ftp://, and refuses one to
    file:// with an HTTPError that reads like any other 30x."""

    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target and urlsplit(urljoin(req.full_url, target)).scheme.lower() not in ("http", "https"):
            raise _BadRedirect(urljoin(req.full_url, target))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _handlers(deadline: _Deadline, sockets: list):
    """HTTP(S) handlers whose connections time out at the deadline and record their sockets."""

    def connection(base):
        class Connection(base):
            def connect(self):
                self.timeout = deadline.left()
                super().connect()
                sockets.append(self.sock)

        return Connection

    http_cls, https_cls = connection(http.client.HTTPConnection), connection(http.client.HTTPSConnection)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_cls, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_cls, req, context=self._context)

    return [HTTP(), HTTPS(), _RedirectHandler()]


def fetch_url(url: str, *, timeout: float = DEFAULT_URL_TIMEOUT,
              max_bytes: int = DEFAULT_URL_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, or InputError naming it: `timeout` bounds the whole download
    (connecting, redirects and every read), `max_bytes` its size; redirects to anything but
    http(s), redirect loops, HTTP errors and network failures are refused too."""
    from ..version import __version__

    deadline = _Deadline(timeout)
    sockets: list = []
    opener = urllib.request.build_opener(*_handlers(deadline, sockets))
    request = urllib.request.Request(url, headers={"User-Agent": f"altclip/{__version__}"})
    timed_out = InputError(f"{url}: timed out after {timeout:g} s (the limit for the whole download)")
    try:
        with opener.open(request, timeout=deadline.left()) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"{url}: the download is {int(length):,} bytes, over the cap of {max_bytes:,} bytes")
            chunks, size = [], 0
            while True:
                if sockets:
                    sockets[-1].settimeout(deadline.left())
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{url}: the download is over the cap of {max_bytes:,} bytes")
                chunks.append(chunk)
    except InputError:
        raise
    except _BadRedirect as exc:
        raise InputError(f"{url}: redirected to {exc.target}, which is not an http(s) URL; "
                         "only http(s) redirects are followed") from None
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303, 307, 308):
            raise InputError(f"{url}: too many redirects (more than {MAX_REDIRECTS}; a redirect loop?)") from None
        raise InputError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise timed_out from None
        raise InputError(f"{url}: cannot download ({exc.reason})") from None
    except (socket.timeout, TimeoutError):
        raise timed_out from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # reset, bad URL, protocol errors
        raise InputError(f"{url}: cannot download ({exc})") from None
    return b"".join(chunks)
