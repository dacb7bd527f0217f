"""The one opener for local image files (inputs/files.py): only regular files are read; a FIFO,
a device, a socket or a folder is refused unread with the standard words, a size cap refuses
a file before it is read, and a read that hangs ends at its deadline."""
from __future__ import annotations

import os
import socket
import stat
import threading
import time

import pytest

from bounded import in_thread

from altclip_cli.errors import InputError
from altclip_cli.inputs import files
from altclip_cli.inputs.files import open_regular, read_regular, within
from altclip_cli.inputs.images import open_image


def finishes(fn, limit: float = 20):
    """fn()'s result, or its exception; the test fails (instead of hanging) past `limit` seconds."""
    return in_thread(fn, limit)[0]


def refused(fn, limit: float = 20) -> str:
    out = finishes(fn, limit)
    assert isinstance(out.get("error"), InputError), out
    return out["error"].message


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "stuck.png"
    os.mkfifo(path)
    yield path
    try:  # release a reader that may be blocked in open()
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("opener", [open_regular, read_regular, open_image], ids=["open", "read", "open_image"])
def test_a_fifo_is_refused_unread(fifo, opener):
    assert refused(lambda: opener(fifo, name="stuck.png")) == "stuck.png: not a regular file (a FIFO)"


@pytest.mark.parametrize("opener", [open_regular, read_regular, open_image], ids=["open", "read", "open_image"])
def test_a_character_device_is_refused_not_read(opener, monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    assert refused(lambda: opener("/dev/zero")) == "/dev/zero: not a regular file (a character device)"
    assert "/dev/zero" not in opened  # never opened: opening some devices does something


def test_a_socket_and_a_folder_are_refused(tmp_path):
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        assert refused(lambda: open_regular(sock_path, name="s.png")) == "s.png: not a regular file (a socket)"
    assert refused(lambda: open_image(tmp_path, name="pics")) == "pics: is a directory, not an image file"
    assert refused(lambda: read_regular(tmp_path, name="pics")) == "pics: is a directory, not an image file"


def test_a_path_swapped_for_a_fifo_after_its_stat_still_cannot_block(fifo, tmp_path, monkeypatch):
    """stat() saw a regular file; by the time of the open the name is a FIFO: the non-blocking open
    returns at once and the descriptor's own fstat refuses it."""
    regular = tmp_path / "ok.png"
    regular.write_bytes(b"x")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: real_stat(regular if str(path) == str(fifo) else path,
                                                                     *a, **k))
    assert refused(lambda: open_regular(fifo, name="stuck.png")) == "stuck.png: not a regular file (a FIFO)"


def test_missing_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert refused(lambda: open_image(tmp_path / "gone.png", name="gone.png")) == "gone.png: no such file"
    assert refused(lambda: open_image(empty, name="empty.png")) == "empty.png: the file is empty (zero bytes)"
    assert refused(lambda: read_regular(empty, name="empty.png")) == "empty.png: the file is empty (zero bytes)"
    with open_regular(empty, empty_ok=True) as f:
        assert f.read() == b""
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    assert refused(lambda: open_regular(broken, name="broken.png")) == "broken.png: no such file"
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.png"
        locked.write_bytes(b"x")
        locked.chmod(0)
        assert refused(lambda: open_regular(locked, name="locked.png")) == "locked.png: permission denied"


def test_a_file_over_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A sparse 64 GiB file: refused from its size, not read into memory."""
    big = tmp_path / "huge.tif"
    with open(big, "wb") as f:
        f.truncate(64 << 30)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    message = refused(lambda: read_regular(big, name="huge.tif", max_bytes=1_000_000, limit="the server's cap"))
    assert message == (f"huge.tif: the file is {64 << 30:,} bytes, over the limit of 1,000,000 bytes "
                       "(the server's cap)")
    assert opened == []


def test_a_regular_file_reads_whole_and_opens_blocking(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"\x89PNG" * 1000)
    assert read_regular(path, max_bytes=4000, timeout=10) == b"\x89PNG" * 1000
    with open_regular(path) as f:
        assert os.get_blocking(f.fileno()) and f.read(4) == b"\x89PNG"
        assert stat.S_ISREG(os.fstat(f.fileno()).st_mode)


def test_a_read_that_hangs_ends_at_its_deadline(tmp_path, monkeypatch):
    """A hung network mount: stat() itself never returns. The deadline names the input."""
    release = threading.Event()
    monkeypatch.setattr(files.os, "stat", lambda *a, **k: release.wait() and None)
    try:
        start = time.monotonic()
        out = finishes(lambda: read_regular(tmp_path / "a.png", name="nfs/a.png", timeout=0.5), limit=10)
        assert time.monotonic() - start < 8
    finally:
        release.set()
    error = out["error"]
    assert isinstance(error, InputError)
    assert error.message == "nfs/a.png: no data after 0.5 s (a hung network mount?)"
    assert error.hint == "raise the input timeout (--input-timeout) if this input is only slow"


def test_within_hands_back_the_result_or_the_exception():
    assert within(5, "x", lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        within(5, "x", lambda: 1 / 0)
