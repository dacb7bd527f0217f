"""A fake Hugging Face Hub on 127.0.0.1, enough for huggingface_hub 2.4's downloads.

Serves `root/<org>/<name>/<files>` as model repos, each with one commit (a hash of its
files). Endpoints, as huggingface_hub 2.4 calls them:

    GET  /api/models/{repo}[/revision/{rev}]      repo info: sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]   file listing (snapshot_download lists the tree)
    HEAD /{repo}/resolve/{rev}/{file}             metadata: X-Repo-Commit, ETag, X-Linked-Etag/-Size
    GET  /{repo}/resolve/{rev}/{file}             the bytes; `Range: bytes=N-` answers 206
    GET  /api/agent-harnesses                     huggingface_hub fetches this once a day (agent detection)

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound). Xet is
never advertised (no X-Xet-* headers, no xetHash), so the client uses plain HTTP.

    with FakeHub(root) as hub:
        hub.url                       # http://127.0.0.1:PORT, for HF_ENDPOINT
        hub.requests                  # [(method, path, headers)] in arrival order
        hub.cut_next("org/name", "pytorch_model.bin", after=6000)   # drop the next GET mid-body
        hub.stall_next("org/name", "pytorch_model.bin", after=6000) # send 6000 bytes, then hang
        hub.release()                                               # until this (or 60 s)
        hub.corrupt_next("org/name", "pytorch_model.bin")           # flip a byte of the next GET
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors", ".model", ".msgpack", ".h5", ".onnx")


class FakeHub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.requests: list[tuple[str, str, dict]] = []
        self._faults: dict[tuple[str, str], tuple[str, int]] = {}  # (repo, file): (kind, after)
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle
    def start(self) -> "FakeHub":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._released.clear()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- test controls
    def cut_next(self, repo_id: str, filename: str, *, after: int) -> None:
        """The next GET of this file sends its full Content-Length but only `after` bytes,
        then closes the connection (once)."""
        with self._lock:
            self._faults[(repo_id, filename)] = ("cut", after)

    def stall_next(self, repo_id: str, filename: str, *, after: int) -> None:
        """The next GET of this file sends its full Content-Length but only `after` bytes,
        then hangs until release() (at most 60 s) and closes the connection (once): a
        client killed meanwhile has exactly those bytes to resume from."""
        with self._lock:
            self._released.clear()
            self._faults[(repo_id, filename)] = ("stall", after)

    def corrupt_next(self, repo_id: str, filename: str) -> None:
        """The next GET of this file sends the whole body with its first byte flipped (once)."""
        with self._lock:
            self._faults[(repo_id, filename)] = ("corrupt", 0)

    def release(self) -> None:
        """End the stalled transfers."""
        self._released.set()

    def take_fault(self, repo_id: str, filename: str) -> tuple[str, int] | None:
        with self._lock:
            return self._faults.pop((repo_id, filename), None)

    def log(self, method: str, path: str, headers: dict) -> None:
        with self._lock:
            self.requests.append((method, path, headers))

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def fetched(self) -> list[str]:
        """The file names GET through /resolve/ (hub traffic for file bodies)."""
        return [p.split("/resolve/", 1)[1].split("/", 1)[1]
                for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]

    # -- repos
    def repo_dir(self, repo_id: str) -> Path | None:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            return None
        folder = self.root / repo_id
        return folder if folder.is_dir() else None

    def files(self, repo_id: str) -> dict[str, Path]:
        folder = self.repo_dir(repo_id)
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def commit(self, repo_id: str) -> str:
        digest = hashlib.sha1(repo_id.encode())
        for name, path in self.files(repo_id).items():
            digest.update(name.encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the hub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    # -- routing
    def _dispatch(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub.log(self.command, path, dict(self.headers))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "agent-harnesses"]:
            return self._json({"standardEnvVars": [], "harnesses": {}}, body)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._info(repo_id, "main", body)
            if rest[0] == "revision" and len(rest) == 2:
                return self._info(repo_id, rest[1], body)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        self._error(404, None, body)

    def _check(self, repo_id: str, revision: str, body: bool) -> str | None:
        """The commit for (repo, revision), or None after answering 404."""
        if self.hub.repo_dir(repo_id) is None:
            self._error(404, "RepoNotFound", body)
            return None
        commit = self.hub.commit(repo_id)
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound", body)
            return None
        return commit

    def _info(self, repo_id: str, revision: str, body: bool) -> None:
        commit = self._check(repo_id, revision, body)
        if commit is None:
            return
        siblings = [{"rfilename": name} for name in self.hub.files(repo_id)]
        self._json({"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                    "private": False, "gated": False, "disabled": False, "siblings": siblings}, body)

    def _tree(self, repo_id: str, revision: str, prefix: str, body: bool) -> None:
        if self._check(repo_id, revision, body) is None:
            return
        entries = []
        for name, file in self.hub.files(repo_id).items():
            if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                continue
            data = file.read_bytes()
            entry = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(entries, body)

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        commit = self._check(repo_id, revision, body)
        if commit is None:
            return
        file = self.hub.files(repo_id).get(filename)
        if file is None:
            return self._error(404, "EntryNotFound", body, {"X-Repo-Commit": commit})
        data = file.read_bytes()
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if filename.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"',
                            "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{_git_blob_sha1(data)}"'
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        fault = self.hub.take_fault(repo_id, filename) if body else None
        if fault is not None and fault[0] == "corrupt":
            data, fault = bytes([data[0] ^ 0xFF]) + data[1:], None
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if not body:
            return
        if fault is not None:
            kind, after = fault
            self.wfile.write(data[start:start + after])
            self.wfile.flush()
            if kind == "stall":
                self.hub._released.wait(timeout=60)
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(data[start:])

    # -- answers
    def _json(self, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, body: bool, extra: dict | None = None) -> None:
        data = json.dumps({"error": code or "Not Found"}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
