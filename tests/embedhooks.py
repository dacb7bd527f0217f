"""Fault injection for embed tests: stop a run as Ctrl-C would, after a given number of inputs."""
from __future__ import annotations

from contextlib import contextmanager

import pytest


@contextmanager
def interrupted_after(count: int):
    """Inside the block, `altclip embed -o` raises KeyboardInterrupt once `count` inputs are
    written to its .part files (where a Ctrl-C between two batches would land)."""
    from altclip_cli.outputs.embedfile import EmbeddingOutput

    real_add = EmbeddingOutput.add

    def add(self, items, array):
        real_add(self, items, array)
        if self.inputs_done >= count:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EmbeddingOutput, "add", add)
        yield


def ray_worker_setup() -> None:
    """A Ray worker_process_setup_hook: when the file ALTCLIP_TEST_KILL_TRIGGER names exists, the
    first actor to have written 4 inputs of a part removes it and kill -9s itself (once)."""
    import os
    import signal

    from altclip_cli.outputs.embedfile import EmbeddingOutput

    trigger = os.environ.get("ALTCLIP_TEST_KILL_TRIGGER")
    if not trigger:
        return
    real_add = EmbeddingOutput.add

    def add(self, items, array):
        real_add(self, items, array)
        if self.inputs_done >= 4 and self.path.name.startswith("part-"):
            try:
                os.unlink(trigger)
            except FileNotFoundError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    EmbeddingOutput.add = add
