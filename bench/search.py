"""Benchmark `altclip search`'s ranking: exact top-k over a million memory-mapped vectors.

    .venv/bin/python bench/search.py                     # 1,000,000 x 768 float32 (a 3.1 GB file), tiny text tower
    .venv/bin/python bench/search.py --text-model full   # also the text tower with BAAI/AltCLIP's shapes
    .venv/bin/python bench/search.py --rows 100000       # a quick run

What it times is `altclip_cli.search.rank.ExactRanker.top_k`, the search command's ranking, on
random unit vectors written to a file and opened with np.memmap, as an index's vector file is:

- cold: the file's pages dropped from the page cache first (written, fsync'ed, then
  posix_fadvise(POSIX_FADV_DONTNEED)); the share of the file still resident is checked with
  mincore(2) and printed. Each cold repetition drops the pages again;
- warm: the same search again with the file in the page cache (median of --reps);
- 16 queries ranked in one pass, and a search restricted to half of the rows (every other one,
  as a folder whose files were indexed interleaved with others);
- the query's text embedding, apart: the tiny test model's text tower, and with
  --text-model full the bench's random checkpoint with BAAI/AltCLIP's shapes (bench/fixtures.py;
  made on first use, 3.5 GB; altclip's cache for it in <bench cache>/altclip-home, as run.py
  keeps it), first call (tokenizer load included) and warm median, the model loaded (not timed).

The markdown table goes to stdout with the command line and the CPU.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import ctypes.util
import mmap
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from run import cpu_name  # noqa: E402
from altclip_cli.search.rank import DEFAULT_CHUNK_ROWS, ExactRanker  # noqa: E402

WARM_GOAL_S = 0.5
COLD_GOAL_S = 5.0
QUERY_TEXT = "a dog running on the beach at sunset"


def write_vectors(path: Path, rows: int, dim: int, seed: int = 0) -> None:
    """Random unit vectors, written chunk by chunk (little memory), then fsync'ed."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        for start in range(0, rows, DEFAULT_CHUNK_ROWS):
            n = min(DEFAULT_CHUNK_ROWS, rows - start)
            block = rng.standard_normal((n, dim), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            f.write(block.tobytes())
        f.flush()
        os.fsync(f.fileno())


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """The share of the file's pages in the page cache (mincore(2)); None where it cannot be asked."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not hasattr(mmap, "PAGESIZE"):
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    size = path.stat().st_size
    if size == 0:
        return 0.0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            view = np.frombuffer(mm, dtype=np.uint8)  # read-only: only its address is used
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
            failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) != 0
            del view
            return None if failed else int((np.frombuffer(vec, np.uint8) & 1).sum()) / pages
        finally:
            mm.close()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def unit(rng, n: int, dim: int) -> np.ndarray:
    q = rng.standard_normal((n, dim), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def bench_ranking(path: Path, rows: int, dim: int, k: int, reps: int) -> dict:
    rng = np.random.default_rng(1)
    q1, q16 = unit(rng, 1, dim), unit(rng, 16, dim)
    half = np.arange(0, rows, 2, dtype=np.int64)
    out: dict = {"resident_before_cold": []}

    def ranker():
        return ExactRanker(np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim)))

    def cold(queries):
        # Pages that a live mapping holds are not dropped: every earlier mapping is gone by now
        # (each ranker lives inside one call of this function).
        gc.collect()
        drop_from_page_cache(path)
        out["resident_before_cold"].append(resident_fraction(path))
        r = ranker()  # a fresh mapping, as a new `altclip search` process has
        return timed(lambda: r.top_k(queries, k))

    out["cold"] = [cold(q1) for _ in range(reps)]
    out["cold16"] = [cold(q16)]
    r = ranker()
    r.top_k(q1, k)  # warm the page cache
    out["warm"] = [timed(lambda: r.top_k(q1, k)) for _ in range(reps)]
    out["warm16"] = [timed(lambda: r.top_k(q16, k)) for _ in range(reps)]
    out["warm_half"] = [timed(lambda: r.top_k(q1, k, rows=half)) for _ in range(reps)]
    # Sanity: the chunked result is the full sort's (on a slice small enough to sort whole).
    sample = np.asarray(np.memmap(path, dtype=np.float32, mode="r", shape=(rows, dim))[:200_000])
    got = ExactRanker(sample).top_k(q1, k).rows[0]
    want = np.argsort(-(sample @ q1[0]), kind="stable")[:k]
    out["check"] = bool(np.array_equal(got, want))
    return out


def bench_text(model_dir: Path, reps: int, home: Path) -> tuple[float, float, str]:
    """(first call, warm median, precision) of encoding one query text, the model already loaded
    (altclip's cache in `home`: the bench's own, never the user's)."""
    os.environ["ALTCLIP_HOME"] = str(home)
    from altclip_cli.runtime.altclip import load

    model = load(str(model_dir), device="cpu", precision="auto")
    first = timed(lambda: model.encode_texts([QUERY_TEXT]))
    warm = statistics.median(timed(lambda: model.encode_texts([QUERY_TEXT])) for _ in range(reps))
    return first, warm, model.precision


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import write_model

    return write_model(folder / "altclip-tiny")


def blas() -> str:
    try:
        info = np.show_config(mode="dicts")
        lib = info["Build Dependencies"]["blas"]
        return f"{lib.get('name', '?')} {lib.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older numpy
        return "?"


def fmt_s(xs) -> str:
    return f"{statistics.median(xs):.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None,
                   help="where to write the vector file [default: a temporary folder under $TMPDIR]")
    p.add_argument("--text-model", choices=["tiny", "full", "none"], default="tiny",
                   help="time the query's text embedding with the tiny test model, the full-size random "
                        "checkpoint (bench/fixtures.py, 3.5 GB, made on first use), or not at all")
    args = p.parse_args(argv)

    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory(prefix="altclip-search-bench-", dir=args.dir) as tmp:
        path = Path(tmp) / "vectors.f32"
        t_write = timed(lambda: write_vectors(path, args.rows, args.dim))
        res = bench_ranking(path, args.rows, args.dim, args.k, args.reps)
        size_gb = path.stat().st_size / 1e9
        text_rows = []
        if args.text_model != "none":
            tiny_first, tiny_warm, tiny_prec = bench_text(tiny_model(Path(tmp)), args.reps, Path(tmp) / "home")
            text_rows.append(("tiny test model (width 32, 2 layers)", tiny_first, tiny_warm, tiny_prec))
        if args.text_model == "full":
            import fixtures

            first, warm, prec = bench_text(fixtures.ensure_model(fixtures.DEFAULT_CACHE), args.reps,
                                           fixtures.DEFAULT_CACHE / "altclip-home")  # as run.py's
            text_rows.append(("BAAI/AltCLIP's shapes (XLM-R large), random weights", first, warm, prec))

    resident = [r for r in res["resident_before_cold"] if r is not None]
    resident_txt = f"{100 * max(resident):.1f}%" if resident else "not measurable here"
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/search.py", *(argv or sys.argv[1:])])
    load = os.getloadavg()
    print(f"Measured {started:%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} cores "
          f"(Python {platform.python_version()}, numpy {np.__version__} with {blas()}); load average "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} after the run.")
    print(f"Command: `{cmd}`. {args.rows:,} random unit vectors of {args.dim} float32 ({size_gb:.2f} GB, "
          f"written in {t_write:.1f} s), np.memmap, chunks of {DEFAULT_CHUNK_ROWS:,} rows, top {args.k}; "
          f"medians of {args.reps}. Cold: the file's pages dropped with posix_fadvise(DONTNEED) after fsync "
          f"before each cold run (resident before it, by mincore: at most {resident_txt}). "
          f"Chunked top-k equal to a full sort on the first 200,000 rows: {'yes' if res['check'] else 'NO'}.")
    print()
    print("| measure | seconds | goal | met |")
    print("|---|---:|---|---|")

    def row(name, xs, goal=None):
        med = statistics.median(xs)
        met = "" if goal is None else ("yes" if med <= goal else "no")
        print(f"| {name} | {med:.3f} | {'' if goal is None else f'<= {goal:g} s'} | {met} |")

    row("1 query, cold (page cache dropped)", res["cold"], COLD_GOAL_S)
    row("1 query, warm", res["warm"], WARM_GOAL_S)
    row("16 queries in one pass, cold (1 run)", res["cold16"])
    row("16 queries in one pass, warm", res["warm16"])
    row("1 query over half the rows (every other one), warm", res["warm_half"])
    for name, first, warm, prec in text_rows:
        print(f"| query text embedding, {name}, {prec}: first call / warm | {first:.3f} / {warm:.3f} | "
              "(not part of the goals) | |")
    if not text_rows:
        print("| query text embedding | n/a | | |")


if __name__ == "__main__":
    main()
