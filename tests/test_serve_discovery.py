"""Who may answer on the default socket, for every command that reads it without being told to
(`altclip info`, `--server auto`): only a socket of this user's in a private folder of this
user's; and what a server says is shown with its control characters escaped."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socketserver
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from altclip_cli.cli import cli
from altclip_cli.serve import client

# What a hostile server puts in its strings: a window title, a colour (7-bit and 8-bit CSI), a
# line break that fakes a line of output, and a right-to-left override.
HOSTILE = "evil\x1b]0;pwned\x07\x1b[31m\x9b2J\nerror: fake line\u202etxt"
RAW = ("\x1b", "\x07", "\x9b", "\u202e", "\nerror: fake line")


def hostile_health() -> dict:
    return {"status": "ok", "protocol": client.PROTOCOL, "altclip": HOSTILE, "model": HOSTILE,
            "model_folder": "/nowhere" + HOSTILE, "device": HOSTILE, "precision": HOSTILE, "pid": 4242,
            "uptime_s": 60.0, "weights": "w", "embed_dim": 32, "limits": {}}


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextlib.contextmanager
def fake_socket_server(path: Path, health: dict):
    """An HTTP server on the Unix socket `path` answering GET /v1/health with `health`."""
    asked = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            body = json.dumps(health, ensure_ascii=False).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self):
            return "unix"

        def log_message(self, *args):
            pass

    server = _UnixHTTPServer(str(path), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def runtime_dir(monkeypatch):
    """A short XDG_RUNTIME_DIR (socket paths hold about 100 bytes), so the default socket is
    <it>/altclip/altclip.sock."""
    import tempfile

    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="acd"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(folder))
    for name in ("ALTCLIP_DEBUG", "ALTCLIP_SERVER"):
        monkeypatch.delenv(name, raising=False)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def info_output(*args) -> str:
    result = CliRunner().invoke(cli, ["info", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_info_does_not_ask_a_socket_in_a_folder_others_can_reach(runtime_dir):
    folder = runtime_dir / "altclip"
    folder.mkdir()
    folder.chmod(0o777)
    with fake_socket_server(folder / "altclip.sock", hostile_health()) as asked:
        text = info_output()
        data = json.loads(info_output("--json"))["server"]
    line = next(x for x in text.splitlines() if x.startswith("server: "))
    assert line == (f"server: not asking unix:{folder}/altclip.sock: {folder} has mode 0777: other users could "
                    "reach the socket; its folder must be private (0700)")
    assert data["running"] is False and "has mode 0777" in data["refused"]
    assert asked == []  # not even connected to
    assert not any(raw in text for raw in RAW)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_info_does_not_ask_a_socket_folder_another_user_owns(runtime_dir):
    from altclip_cli.serve.discovery import ask_default_socket

    folder = runtime_dir / "altclip"
    folder.mkdir(mode=0o700)
    with fake_socket_server(folder / "altclip.sock", hostile_health()) as asked:
        os.chown(folder, 65534, 65534)
        line = next(x for x in info_output().splitlines() if x.startswith("server: "))
        found = ask_default_socket(timeout=1.0)
    assert line.startswith(f"server: not asking unix:{folder}/altclip.sock: {folder} belongs to uid 65534, not to you")
    assert found.info is None and "belongs to uid 65534" in found.refused and asked == []


def test_a_private_servers_strings_are_shown_escaped(runtime_dir):
    from altclip_cli.serve.discovery import Wanted, connect

    folder = runtime_dir / "altclip"
    folder.mkdir(mode=0o700)
    with fake_socket_server(folder / "altclip.sock", hostile_health()) as asked:
        text = info_output()
        data = json.loads(info_output("--json"))["server"]
        debug, warnings = [], []
        assert connect("auto", Wanted(model=str(runtime_dir), precision="fp32"), debug=debug.append,
                       warn=warnings.append) is None
    assert asked  # a private socket of ours is asked
    line = next(x for x in text.splitlines() if x.startswith("server: "))
    escaped = "evil\\x1b]0;pwned\\x07\\x1b[31m\\x9b2J\\nerror: fake line\\u202etxt"
    assert line.startswith(f"server: unix:{folder}/altclip.sock: {escaped} on {escaped}, ")
    assert "pid 4242, up 1 min" in line
    assert data["running"] is True and data["model"] == escaped
    for shown in (text, *debug, *warnings):
        assert not any(raw in shown for raw in RAW), shown
    assert len(debug) == 1 and "\\x1b" in debug[0]


def test_auto_does_not_ask_a_socket_in_a_folder_others_can_reach(runtime_dir):
    from altclip_cli.serve.discovery import Wanted, connect

    folder = runtime_dir / "altclip"
    folder.mkdir()
    folder.chmod(0o777)
    with fake_socket_server(folder / "altclip.sock", hostile_health()) as asked:
        debug, warnings = [], []
        assert connect("auto", Wanted(model="x"), debug=debug.append, warn=warnings.append) is None
    assert asked == []
    assert warnings == [f"not using the server socket {folder}/altclip.sock: {folder} has mode 0777: other users "
                        "could reach the socket; its folder must be private (0700)"]


def test_a_servers_error_message_is_shown_escaped():
    with error_server() as url:
        with pytest.raises(client.RequestFailed) as caught:
            client.post_json(url, "/v1/embed", {"texts": ["a"]})
    assert not any(raw in caught.value.message for raw in RAW) and "\\x1b" in caught.value.message
    assert not any(raw in (caught.value.hint or "") for raw in RAW)


@contextlib.contextmanager
def error_server():
    """A loopback HTTP server answering every request 400 with a hostile error message and hint."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": {"message": HOSTILE, "hint": HOSTILE}}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
