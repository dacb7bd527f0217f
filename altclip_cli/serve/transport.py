"""Where `altclip serve` listens and who may talk to it. Standard library only.

Unix socket (the default): `$XDG_RUNTIME_DIR/altclip/altclip.sock`, else
`<tempdir>/altclip-<uid>/altclip.sock`. The socket's folder must be a real folder owned by this
user with no access for group or others (0700): it is what keeps other users out (a socket's own
mode is not honoured everywhere). altclip creates it so, and refuses one that is not. The name is
claimed with a lock file beside the socket, held for the server's life (git's
unix-stream-server recipe): a second server fails at once, saying one is running; a socket left
by a server that died (nothing answers) is replaced.

TCP (`--host/--port`): loopback by default. Any other address needs a bearer token. Without a
token, every request's Host header must name the address the server was asked to bind (or an
--allow-host name), against DNS rebinding, and a browser page's cross-site requests are refused
by their Origin header; with one, the token is what lets a request in, whatever name it uses.
"""
from __future__ import annotations

import errno
import hmac
import ipaddress
import os
import socket
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AltclipError

SOCKET_NAME = "altclip.sock"
DEFAULT_PORT = 8790
BACKLOG = 128


class TransportError(AltclipError):
    """The server cannot listen where it was asked to (exit 1)."""


class ServerRunning(TransportError):
    """Another server already holds the socket."""


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/altclip/altclip.sock, else a per-user folder in the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "altclip" / SOCKET_NAME
    return Path(tempfile.gettempdir()) / f"altclip-{os.getuid()}" / SOCKET_NAME


# --- the Unix socket ----------------------------------------------------------------------------------


def prepare_socket_dir(folder: Path) -> None:
    """Create `folder` (mode 0700) if it is missing, then check it (socket_folder_problem)."""
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise TransportError(f"cannot create {folder}: its parent folder does not exist",
                             hint="create the parent folder first, or choose another --socket") from None
    except OSError as exc:
        raise TransportError(f"cannot create {folder} ({exc.strerror or exc})") from None
    problem = socket_folder_problem(folder)
    if problem is not None:
        raise TransportError(*problem)


def socket_folder_problem(folder: Path) -> tuple[str, str] | None:
    """(why, hint) when `folder` cannot keep a socket private, else None: it must be a folder,
    not a symlink, owned by this user, with no permission bits for group or others."""
    try:
        st = os.lstat(folder)
    except OSError as exc:
        return f"cannot read {folder} ({exc.strerror or exc})", "choose another --socket"
    if stat.S_ISLNK(st.st_mode):
        return (f"{folder} is a symbolic link; the socket's folder must be a real folder",
                "remove the link, or choose another --socket")
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder", "choose another --socket"
    if st.st_uid != os.getuid():
        return (f"{folder} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): whoever owns it could "
                "reach or replace the socket", "choose a folder of your own with --socket")
    if st.st_mode & 0o077:
        return (f"{folder} has mode {stat.S_IMODE(st.st_mode):04o}: other users could reach the socket; its "
                "folder must be private (0700)", f"chmod 700 {folder}, or choose another --socket")
    return None


def socket_problem(path: Path) -> str | None:
    """Why the socket at `path` is not one of this user's servers as `altclip serve` makes them
    (a socket of ours in a private folder of ours), or None. Whoever reads the default socket
    without being told to (`--server auto`, `altclip info`) asks this first: another user who
    owns its folder would otherwise answer in the server's name."""
    path = Path(path)
    problem = socket_folder_problem(path.parent)
    if problem is not None:
        return problem[0]
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if not stat.S_ISSOCK(st.st_mode):
        return "it is not a socket"
    if st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not to you"
    return None


@dataclass
class SocketClaim:
    """The lock on a socket path, held while the server runs; `replaced_stale` says whether a
    dead server's socket was removed."""

    path: Path
    lock_fd: int
    replaced_stale: bool = False
    inode: tuple[int, int] | None = field(default=None)  # the socket we bound, to remove only ours

    def bind(self) -> socket.socket:
        """Bind and listen; the socket file is made 0600 (its folder already keeps others out)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self.inode = (st.st_dev, st.st_ino)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot listen on {self.path} ({exc.strerror or exc})") from None
        return sock

    def release(self) -> None:
        """Remove our socket file (not one that replaced it) and drop the lock."""
        try:
            st = os.stat(self.path)
            if self.inode == (st.st_dev, st.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing the descriptor drops the lock
            self.lock_fd = -1


def claim_socket(path: Path) -> SocketClaim:
    """Take the lock beside `path`; a held lock means a server is running. With the lock held,
    a socket nobody answers on is stale and removed; one that answers (a server that does not
    use the lock) or a file that is not a socket is an error."""
    import fcntl

    path = Path(path)
    if len(os.fsencode(str(path))) > 100:  # sun_path holds 104-108 bytes depending on the system
        raise TransportError(f"the socket path {path} is too long for a Unix socket ({len(str(path))} characters)",
                             hint="choose a shorter --socket path")
    prepare_socket_dir(path.parent)
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise TransportError(f"cannot open the lock file {lock_path} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        pid = _read_pid(fd)
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ServerRunning(f"a server is already running on {path}" + (f" (pid {pid})" if pid else ""),
                                hint="use it, stop it first, or pass --socket PATH for another one") from None
        raise TransportError(f"cannot lock {lock_path} ({exc.strerror or exc})") from None
    try:
        replaced = _remove_stale(path)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return SocketClaim(path, fd, replaced)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _remove_stale(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{path} exists and is not a socket; altclip does not replace it",
                             hint="remove it yourself, or choose another --socket")
    if answers(path):
        raise ServerRunning(f"a server is already running on {path} (it answers, but holds no altclip lock)",
                            hint="stop it first, or pass --socket PATH for another one")
    os.unlink(path)
    return True


def answers(path: Path, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        return True
    except TimeoutError:
        return True  # a full backlog: alive, just busy
    except OSError:
        return False  # refused (stale) or gone
    finally:
        sock.close()


# --- TCP ----------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    name = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except OSError as exc:
        raise TransportError(f"cannot resolve {host} ({exc.strerror or exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        hint = "another program uses this port: choose another --port" if exc.errno == errno.EADDRINUSE else None
        raise TransportError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", hint=hint) from None
    return sock


def read_token(path: str, warn=lambda message: None) -> str:
    """The bearer token in `path` (surrounding whitespace removed); a warning when the file is
    readable by others."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as exc:
        raise TransportError(f"cannot read the token file {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise TransportError(f"the token file {path} is not UTF-8 text") from None
    if not token or any(c.isspace() for c in token):
        raise TransportError(f"the token file {path} must hold one token (no spaces)",
                             hint="e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE")
    if mode & 0o077:
        warn(f"the token file {path} has mode {stat.S_IMODE(mode):04o}: other users may read it (chmod 600)")
    return token


@dataclass(frozen=True)
class HostPolicy:
    """Which Host (and Origin) headers a TCP server without a token answers: the name it was
    asked to bind, the address the connection came in on, and `localhost` when that address is
    loopback, always with the bound port; and the names of --allow-host (NAME: with the bound
    port; NAME:PORT: with that port, as a tunnel's far end is named). Anything else (a
    DNS-rebinding page's own name) is refused. A server with a token has no Host policy: a page
    that rebinds a name to it still lacks the token."""

    bound: str
    port: int
    allowed: tuple[str, ...] = ()  # --allow-host values

    def allows(self, host_header: str | None, local_ip: str | None) -> bool:
        if not host_header:
            return False
        parsed = split_host(host_header)
        if parsed is None:
            return False
        name, port = parsed
        port = port if port is not None else 80
        for extra in self.allowed:
            named = split_host(extra)
            if named is not None and named[0] == name and (named[1] if named[1] is not None else self.port) == port:
                return True
        if port != self.port:
            return False
        names = {self.bound.strip("[]").lower().rstrip(".")}
        if local_ip:
            ip = local_ip.split("%")[0].lower()
            names.add(ip)
            mapped = _unmapped(ip)
            if mapped:
                names.add(mapped)
            if _is_loopback_ip(ip):
                names.add("localhost")
        return name in names


def token_matches(authorization: str | None, token: str) -> bool:
    """True when an Authorization header carries `token` in the Bearer scheme, its name in any
    case (RFC 7235: `bearer` is Bearer); compared in constant time."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8"))


def split_host(value: str) -> tuple[str, int | None] | None:
    """("name", port or None) from a Host header value; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, _, port_text = value.partition(":")
        port_text = port_text if _ else None
    try:
        port = int(port_text) if port_text is not None else None
    except ValueError:
        return None
    return name.rstrip("."), port


def _is_loopback_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback or bool(_unmapped(text) and
                                                               ipaddress.ip_address(_unmapped(text)).is_loopback)
    except ValueError:
        return False


def _unmapped(text: str) -> str | None:
    """The IPv4 address inside an IPv4-mapped IPv6 one (::ffff:127.0.0.1), else None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped) if mapped else None
