"""Benchmark search's metadata filters: a warm search of a million indexed photos, with and without
each filter.

    .venv/bin/python bench/filters.py                   # 1,000,000 photos, 768-dim vectors (a 3.1 GB file)
    .venv/bin/python bench/filters.py --rows 100000     # a quick run

What it times is `altclip_cli.search.run.rank_below`, the whole search after the query is encoded:
the index opened, its snapshot taken (the filter in SQL: a date range, a camera, a bounding box
around a place, then the exact distance on what the box kept, and the count of the photos
without the facts asked about), the vectors ranked, the paths and facts of the top k read.
The index is synthetic: random unit vectors, and per photo a capture time over ten years (90%
have one), a place near one of 50 cities (60%), one of 20 cameras (80%).

- command line: each search opens the index anew (as each `altclip search` does), files and
  vectors in the page cache (the search run once before the timed ones);
- server: a long-lived reader's SnapshotCache (as `altclip serve` keeps per index), which holds
  the folder's rows and, once a filtered search read them, its photos' dates, places and cameras
  as columns: any filter then runs over those in numpy, a value never used before as fast as a
  repeated one. Reading them into the cache (once per folder and index version) is timed apart.

The markdown table goes to stdout with the command line and the CPU: the median seconds of
--reps runs and the difference from the same search without a filter.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import sqlite3
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
from altclip_cli.search.filters import parse_filter  # noqa: E402
from altclip_cli.search.run import rank_below  # noqa: E402
from altclip_cli.search.store import IndexStore, SnapshotCache  # noqa: E402

GOAL_S = 0.1  # what a filter may add to a warm search
IDENTITY = {"model": "bench", "weights": "bench-weights"}
CAMERAS = [f"{make} {model}" for make, model in [
    ("Canon", "EOS R5"), ("Canon", "EOS 5D Mark IV"), ("Canon", "EOS 80D"), ("NIKON CORPORATION", "NIKON D750"),
    ("NIKON CORPORATION", "NIKON Z 6"), ("Apple", "iPhone 12"), ("Apple", "iPhone 13 Pro"), ("Apple", "iPhone 8"),
    ("SONY", "ILCE-7M3"), ("SONY", "ILCE-6400"), ("FUJIFILM", "X-T3"), ("FUJIFILM", "X100V"), ("samsung", "SM-G991B"),
    ("Google", "Pixel 7"), ("OLYMPUS CORPORATION", "E-M10"), ("Panasonic", "DMC-GX80"), ("LEICA", "Q2"),
    ("HUAWEI", "P30"), ("Xiaomi", "Mi 11"), ("GoPro", "HERO9 Black")]]
FILTERS = [  # (name, the options)
    ("--after 2020 (a third of the photos)", dict(after="2020")),
    ("--after 2019-07 --before 2019-08 (a month)", dict(after="2019-07", before="2019-08")),
    ("--near (a city) --within 5km", dict(near="48.8566,2.3522", within="5km")),
    ("--camera canon (3 of 20 cameras)", dict(camera="canon")),
    ("--camera 'iphone 12'", dict(camera="iphone 12")),
    ("all four together", dict(after="2016", before="2023", near="48.8566,2.3522", within="50km", camera="canon")),
    ("--after 2015 --sort date", dict(after="2015", sort="date")),
]


def build(folder: Path, rows: int, dim: int, seed: int = 0) -> None:
    """An index of `rows` synthetic photos below /photos (see the module doc)."""
    rng = np.random.default_rng(seed)
    with IndexStore.open(folder, identity={**IDENTITY, "dim": dim}, write=True, create=True) as store:
        for start in range(0, rows, 65_536):
            n = min(65_536, rows - start)
            v = rng.standard_normal((n, dim), dtype=np.float32)
            store.append_vectors(v / np.linalg.norm(v, axis=1, keepdims=True))
        store.commit(upserts=[])  # the vectors committed; the rows come next, written directly
    db = sqlite3.connect(folder / "index.sqlite3", isolation_level=None)
    pick = random.Random(seed)
    cities = [(pick.uniform(-50, 65), pick.uniform(-170, 175)) for _ in range(49)] + [(48.8566, 2.3522)]
    start = datetime(2014, 1, 1).timestamp()

    def photos():
        for i in range(rows):
            local = int(start + pick.random() * 10 * 365.25 * 86400) if pick.random() < 0.9 else None
            taken = datetime.fromtimestamp(local).isoformat() if local is not None else None
            lat = lon = None
            if pick.random() < 0.6:
                c = cities[pick.randrange(len(cities))]
                lat, lon = c[0] + pick.gauss(0, 0.1), c[1] + pick.gauss(0, 0.1)
            camera = CAMERAS[pick.randrange(len(CAMERAS))] if pick.random() < 0.8 else None
            local = None if local is None else local - int(datetime(1970, 1, 1).timestamp())  # naive seconds
            yield (f"/photos/{i // 1000:04d}/IMG_{i:07d}.jpg", 1_000_000 + i, 1, None, i, 1, taken, local, lat, lon,
                   camera)

    db.execute("BEGIN")
    db.executemany("INSERT INTO files (path, size, mtime_ns, content_key, vec_row, facts, taken, taken_local, lat, "
                   "lon, camera) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", photos())
    db.execute("COMMIT")
    db.close()


def median_s(fn, reps: int) -> float:
    fn()  # warm: pages in the cache, and (for the server) the rows in its cache
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None,
                   help="where to write the index [default: a temporary folder under $TMPDIR]")
    args = p.parse_args(argv)

    started = datetime.now(timezone.utc)
    rng = np.random.default_rng(1)
    query = rng.standard_normal(args.dim).astype(np.float32)
    query /= np.linalg.norm(query)
    identity = {**IDENTITY, "dim": args.dim}
    with tempfile.TemporaryDirectory(prefix="altclip-filters-bench-", dir=args.dir) as tmp:
        folder = Path(tmp) / "index"
        t = time.perf_counter()
        build(folder, args.rows, args.dim)
        t_build = time.perf_counter() - t

        def search(where=None, cache=None):
            return rank_below(identity, folder, "/photos", query, args.k, where=where, cache=cache)

        results = []  # (name, kept, command line s, server s)
        cache = SnapshotCache()
        try:
            results.append(("no filter", search().searched, median_s(search, args.reps),
                            median_s(lambda: search(cache=cache), args.reps)))
            for name, options in FILTERS:
                where = parse_filter(**options)
                results.append((name, search(where).searched, median_s(lambda: search(where), args.reps),
                                median_s(lambda: search(where, cache), args.reps)))
            every = parse_filter(**FILTERS[5][1])  # all three groups of facts
            loads = []
            for _ in range(args.reps):
                cache.close()
                search(cache=cache)  # the folder's rows cached, as a server that searched it has
                t = time.perf_counter()
                search(every, cache)
                loads.append(time.perf_counter() - t)
            facts_load = statistics.median(loads) - results[6][3]
        finally:
            cache.close()
        size_gb = sum(f.stat().st_size for f in folder.iterdir()) / 1e9

    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/filters.py", *(argv or sys.argv[1:])])
    load = os.getloadavg()
    print(f"Measured {started:%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} cores "
          f"(Python {platform.python_version()}, numpy {np.__version__}, SQLite {sqlite3.sqlite_version}); load "
          f"average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} after the run.")
    print(f"Command: `{cmd}`. {args.rows:,} synthetic photos, vectors of {args.dim} float32 ({size_gb:.2f} GB "
          f"with the database, built in {t_build:.0f} s); a search of all of them for the top {args.k}; "
          f"medians of {args.reps}; the difference is from the same search without a filter.")
    print()
    print("| filter | photos kept | command line: s (difference) | server: s (difference) | adds <= 0.1 s |")
    print("|---|---:|---:|---:|---|")
    base_here, base_server = results[0][2], results[0][3]
    for name, kept, here, server in results:
        if name == "no filter":
            print(f"| {name} | {kept:,} | {here:.3f} | {server:.3f} | |")
            continue
        adds = max(here - base_here, server - base_server)
        print(f"| {name} | {kept:,} | {here:.3f} ({here - base_here:+.3f}) | "
              f"{server:.3f} ({server - base_server:+.3f}) | {'yes' if adds <= GOAL_S else 'no'} |")
    print()
    print(f"Server: reading the folder's dates, places and cameras into its cache, once per folder and "
          f"index version (the first filtered search after a change): {facts_load:.3f} s.")

if __name__ == "__main__":
    main()
