"""How many threads a run uses: torch's intra-op threads for the model and the decode workers
that prepare images ahead of it. Both share the same cores, so they are planned together.
Planned below the runtime (no torch import): the decode pipeline uses it too."""
from __future__ import annotations

import os
from dataclasses import dataclass

MAX_DECODE_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on (containers often allow fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPlan:
    torch_threads: int   # intra-op threads for the model on the CPU
    decode_workers: int  # image decode + preprocessing threads


def plan_threads(device_type: str = "cpu", cores: int | None = None) -> ThreadPlan:
    """On a GPU the CPU only decodes: every core may. On the CPU the model and the decoders
    compete: decoding a (draft-scaled) photo costs a few percent of encoding it, so small CPUs
    give the model every core and one decoder (which sleeps while the look-ahead queue is
    full); from 5 cores on, a quarter of them decode and the model gets the rest, so the two
    never add up to more threads than cores (a preempted OpenMP thread stalls the whole matmul)."""
    cores = cores or available_cores()
    if device_type != "cpu":
        return ThreadPlan(torch_threads=cores, decode_workers=min(MAX_DECODE_WORKERS, cores))
    if cores <= 4:
        return ThreadPlan(torch_threads=cores, decode_workers=1)
    decode = min(MAX_DECODE_WORKERS, cores // 4)
    return ThreadPlan(torch_threads=cores - decode, decode_workers=decode)
