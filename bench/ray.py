"""Benchmark `altclip embed -o DIR/ --ray` against one process on the same inputs.

    .venv/bin/python bench/ray.py                 # tiny model, 512 small JPEGs: Ray's overhead (~4 min)
    .venv/bin/python bench/ray.py --full          # also the full-size random checkpoint, 32 photos (~25 min on 2 cores)

Every row is a fresh process, as a shell user runs the command, timed from start to exit:

- `single`: `altclip embed --image IMG... -o single.npy` (one process, all cores);
- `dataset`: the same into `-o ds/ --part-size P` without Ray (the part machinery alone);
- `ray N`: the same with `--ray --workers N` (a local Ray started for the run, actors of one
  CPU each, Ray's start and stop included);
- `ray 1, parts of B`: one actor with parts as small as a batch, so that the difference from
  `ray 1` over the difference in part count is Ray's cost per part (scheduling, the summary, the
  part's commit);
- `ray start+stop`: `ray.init(include_dashboard=False); ray.shutdown()` alone.

The overhead rows use the tiny random checkpoint (fixtures') on --inputs web-sized JPEGs
(256x256): the model and decoding cost little, so what is left is start-up and per-part cost.
--full adds the random checkpoint with BAAI/AltCLIP's shapes on the bench photos (fixtures.py:
640x480 to 4000x3000, decoded at reduced scale as altclip does), repeated to --full-inputs,
where the model dominates: per-actor throughput. Every output is
checked to equal `single` bit for bit (merge) where the thread count allows: single uses every
core, a Ray actor one thread, so on the CPU only the 1-actor rows are compared with a
one-thread single run.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures  # noqa: E402


REPS = 2  # each row is the fastest of REPS runs (set by --reps)


def _run(cmd: list[str], env: dict, cwd: Path, before=lambda: None) -> float:
    best = float("inf")
    for _ in range(REPS):
        before()
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        if proc.returncode not in (0, 3):
            sys.exit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return best


def measure(model: Path, paths: list[Path], tmp: Path, env: dict, batch: int, part: int) -> list[tuple]:
    altclip = [sys.executable, "-m", "altclip_cli", "embed", "--image", *map(str, paths), "-m", str(model),
               "-b", str(batch), "-q"]
    rows = []

    def fresh(name: str) -> Path:
        shutil.rmtree(tmp / name, ignore_errors=True)
        return tmp / name

    rows.append(("single (all cores)", _run(altclip + ["-o", str(tmp / "single.npy")], env, tmp), 1))
    rows.append(("single, 1 thread", _run(altclip + ["-o", str(tmp / "single1.npy")],
                                          {**env, "OMP_NUM_THREADS": "1"}, tmp), 1))
    rows.append((f"dataset, parts of {part}, no Ray",
                 _run(altclip + ["-o", f"{tmp / 'ds'}/", "--part-size", str(part)], env, tmp, lambda: fresh("ds")),
                 -(-len(paths) // part)))
    for workers in (1, 2):
        out = tmp / f"ray{workers}"
        rows.append((f"ray, {workers} actor{'s' if workers > 1 else ''}, parts of {part}",
                     _run(altclip + ["-o", f"{out}/", "--part-size", str(part), "--workers", str(workers), "--ray"],
                          env, tmp, lambda: fresh(out.name)), -(-len(paths) // part)))
    rows.append((f"ray, 1 actor, parts of {batch}",
                 _run(altclip + ["-o", f"{tmp / 'ray-small'}/", "--part-size", str(batch), "--workers", "1", "--ray"],
                      env, tmp, lambda: fresh("ray-small")), -(-len(paths) // batch)))
    start_stop = [sys.executable, "-c", "import ray; ray.init(include_dashboard=False, logging_level='ERROR'); "
                                        "ray.shutdown()"]
    rows.append(("ray start+stop alone", _run(start_stop, env, tmp), 0))
    # The 1-actor dataset against the one-thread single run, bit for bit.
    merge = [sys.executable, "-m", "altclip_cli", "merge", str(tmp / "ray1"), "-o", str(tmp / "merged.npy"), "-q"]
    _run(merge, env, tmp)
    same = (tmp / "merged.npy").read_bytes() == (tmp / "single1.npy").read_bytes()
    return rows, same


def small_jpegs(folder: Path, count: int) -> list[Path]:
    """`count` web-sized JPEGs (256x256, as img2dataset stores them): decoding costs little."""
    import numpy as np

    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:05d}.jpg")
        fixtures.synthetic_photo(256, 256, rng).save(paths[-1], quality=90)
    return paths


def table(title: str, rows: list[tuple], inputs: int, same: bool) -> str:
    base = rows[0][1]
    out = [f"### {title}", "", f"{inputs} inputs; ray 1 actor merged == single 1 thread, bit for bit: {same}", "",
           "| run | parts | wall s | inputs/s | vs single |", "|---|---:|---:|---:|---:|"]
    for name, took, parts in rows:
        rate = f"{inputs / took:.1f}" if parts else ""
        out.append(f"| {name} | {parts or ''} | {took:.2f} | {rate} | {took / base:.2f}x |")
    by = {name: (took, parts) for name, took, parts in rows}
    big = next(v for k, v in by.items() if k.startswith("ray, 1 actor, parts of") and v[1] == min(
        p for n, (_t, p) in by.items() if n.startswith("ray, 1 actor")))
    small = next(v for k, v in by.items() if k.startswith("ray, 1 actor, parts of") and v is not big)
    per_part = (small[0] - big[0]) / max(1, small[1] - big[1])
    out += ["", f"Ray's cost per part (1 actor, {small[1]} parts against {big[1]}): {per_part * 1000:.0f} ms"]
    return "\n".join(out)


def main() -> None:
    global REPS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--full", action="store_true", help="also the full-size checkpoint (--full-inputs JPEGs)")
    p.add_argument("--full-inputs", type=int, default=32)
    p.add_argument("--reps", type=int, default=REPS, help="runs per row, the fastest kept")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    REPS = args.reps
    try:
        import ray  # noqa: F401
    except ImportError:
        sys.exit("bench: needs Ray: pip install '.[ray]'")
    env = {**os.environ, "ALTCLIP_HOME": str(args.cache / "altclip-home"), "HF_HUB_OFFLINE": "1",
           "ALTCLIP_DEVICE": "cpu", "ALTCLIP_PRECISION": "fp32", "NO_COLOR": "1"}
    jpegs = fixtures.ensure_images(args.cache)
    report = [f"## altclip embed --ray on {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
              f"load {os.getloadavg()[0]:.2f}", "", "`" + " ".join(["python", "bench/ray.py", *sys.argv[1:]]) + "`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = small_jpegs(tmp / "small", args.inputs)
        rows, same = measure(fixtures.ensure_model(args.cache, tiny=True), paths, tmp, env, batch=16, part=256)
        report.append(table(f"tiny random model, {args.inputs} web-sized JPEGs (256x256): overhead, fp32, -b 16",
                            rows, len(paths), same))
        if args.full:
            paths = [jpegs[i % len(jpegs)] for i in range(args.full_inputs)]
            rows, same = measure(fixtures.ensure_model(args.cache), paths, tmp, env, batch=8, part=16)
            report.append("")
            report.append(table("full-size random checkpoint (BAAI/AltCLIP's shapes), the bench's photos "
                                "(0.3-12 MP), fp32, -b 8", rows, len(paths), same))
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
