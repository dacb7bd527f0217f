"""Running a call that might hang without hanging the test run."""
from __future__ import annotations

import threading
import time


def in_thread(fn, limit: float):
    """(out, seconds): out holds fn()'s result under "value" or its exception under "error", and
    the seconds it took; fails the test (instead of hanging it) when fn has not returned after
    `limit` seconds (the daemon thread is left behind)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"still running after {limit} s"
    return out, time.monotonic() - start
