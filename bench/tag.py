"""Benchmark `altclip tag --index`: keywords for a large library from the vectors an index already holds.

    .venv/bin/python bench/tag.py --tiny              # 100,000 photos, the tiny random checkpoint
    .venv/bin/python bench/tag.py --tiny --photos 20000 --profile /tmp/tag.prof
    .venv/bin/python bench/tag.py --cache /tmp/firstrun-bench   # the full-size random checkpoint

What it does, every command a fresh process (`python -m altclip_cli ...`, as a shell user runs it):

1. Writes --photos small JPEGs (64x48, about 2-3 KB; --distinct different pictures, each file its
   own copy) in --folders folders, and indexes them once with `altclip index TREE --index DIR`
   (timed, reported apart). Equal contents share one vector, so this index embeds only the
   distinct pictures and gives every other file its vector by content: the index then holds a
   row for each of the photos, as a library's index does, and the bench does not wait for
   100,000 forward passes. The tag runs below never see the difference: they look each photo up
   by path, size and mtime.
2. Times three `altclip tag TREE -r --index DIR -l ... --min-prob 0 --top 3` runs (5 label
   groups, in several languages): the first (every sidecar created), an identical re-run
   (nothing changes: altclip's summary must say so), and a run with 5 other labels (every
   sidecar changed). The goal: the run with new labels within 2 minutes on 2 cores.
3. Checks, for each run, that no image tower ran: an import hook in the child (bench/index.py's)
   counts the batches through `AltCLIP.encode_pixel_batch`; it must be 0. The model is loaded
   (the labels go through the text tower), and the hook also gives the load's time.

--tiny uses tests/tiny.py's checkpoint (fast to load, a small text tower: what remains is
altclip's own work per photo: the walk, the index lookup, scoring, the XMP and the renames);
without it the full-size random checkpoint with BAAI/AltCLIP's shapes (bench/fixtures.py, 3.5 GB,
made once in --cache), which adds its load and 10 labels through its text tower. --profile FILE
runs the new-labels run once more under cProfile (after the timed runs; not in the table).
The markdown table goes to stdout (and --out FILE), with the command, the CPU and the load.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import fixtures  # noqa: E402
from index import PYTHON, LoadSampler, altclip_version, child_env, log, run_child, version  # noqa: E402
from run import cpu_name  # noqa: E402

GOAL_S = 120.0
# Two sets of five label groups; the first alternative is the keyword written.
LABELS = ["猫|cat|gato", "beach|playa|plage", "雪|snow|nieve", "ein Haus|house", "дерево|tree"]
OTHER_LABELS = ["dog|perro|犬", "mountain|montaña|山", "une voiture|car", "a river|river|rio", "고양이|kitten"]


def small_jpegs(count: int) -> list[bytes]:
    """`count` distinct 64x48 JPEGs of coloured noise over a gradient, about 2-3 KB each."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(fixtures.SEED)
    out = []
    for _ in range(count):
        base = rng.integers(0, 256, 3).astype(np.float32)
        ramp = np.linspace(-60, 60, 64, dtype=np.float32)[None, :, None]
        pixels = base + ramp + rng.normal(0, 25, (48, 64, 3)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def build_tree(root: Path, photos: int, folders: int, distinct: int) -> int:
    """The photo tree; returns its size in bytes."""
    jpegs = small_jpegs(distinct)
    per = -(-photos // folders)
    total = 0
    for n in range(photos):
        folder = root / f"d{n // per:03d}"
        if n % per == 0:
            folder.mkdir(parents=True)
        data = jpegs[n % len(jpegs)]
        (folder / f"IMG_{n % per:05d}.jpg").write_bytes(data)
        total += len(data)
    return total


def tag_cmd(tree: Path, index_dir: Path, model: Path, labels: list[str]) -> list[str]:
    cmd = ["tag", str(tree), "-r", "--index", str(index_dir), "-m", str(model), "--min-prob", "0", "--top", "3"]
    for label in labels:
        cmd += ["-l", label]
    return cmd


def summary_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "photos with keywords" in ln]
    return lines[-1] if lines else "(no summary line)"


def sidecar_count(line: str, action: str) -> int:
    m = re.search(rf"(\d+) {action}\b", line)
    return int(m.group(1)) if m else -1


def timed_tag(name: str, cmd: list[str], env: dict, tmp: Path, expect: str, photos: int) -> dict:
    log(f"{name}: altclip tag ... ({photos:,} photos) ...")
    child = run_child(cmd, env, True, tmp).check(name)
    line = summary_line(child.stderr)
    if sidecar_count(line, expect) != photos or sidecar_count(line, "failed") != 0:
        sys.exit(f"bench: {name}: expected {photos:,} sidecars {expect}, altclip said: {line}")
    batches = child.marks.get("batches", 0)
    if batches:
        sys.exit(f"bench: {name}: the image tower ran ({batches} batches) although every photo is indexed")
    log(f"{name}: {child.wall_s:.1f} s; {line}")
    return {"name": name, "child": child, "line": line, "batches": batches}


def profile_run(cmd: list[str], env: dict, out: Path) -> float:
    """The command once under cProfile (its output to `out`); its wall time, with the profiler's cost."""
    log(f"profiling one run into {out} ...")
    start = time.perf_counter()
    subprocess.run([PYTHON, "-m", "cProfile", "-o", str(out), "-m", "altclip_cli", *cmd], env=env,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def report(args, argv, started, load_before, load_after, during, res) -> str:
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/tag.py", *argv])
    n = args.photos
    model = "tests/tiny.py's tiny random checkpoint" if args.tiny else \
        "bench/fixtures.py's random checkpoint with BAAI/AltCLIP's shapes"
    runs = res["runs"]
    new = runs[-1]["child"]
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {cpu_name()}, {os.cpu_count()} cores (Python "
        f"{platform.python_version()}, altclip {altclip_version()}, torch {version('torch')}); load average "
        f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after"
        + (f"; 1-minute load during the run median {statistics.median(during):.2f}, max {max(during):.2f}."
           if during else "."),
        f"Command: `{cmd}`. Model: {model}. {n:,} photos (64x48 JPEGs, {res['bytes'] / n / 1024:.1f} KB on "
        f"average, {args.distinct} distinct pictures, each file its own copy) in {args.folders} folders, "
        f"all in the index; files in the page cache. Each row is one fresh process: "
        f"`altclip tag TREE -r --index DIR -m MODEL -l ... (5 label groups) --min-prob 0 --top 3`, "
        f"stdout (jsonl) to /dev/null.",
        "",
        "| run | whole process (s) | sidecars/s | model load (s) | image-tower batches | CPU user+sys (s) | "
        "peak RSS (MB) | altclip's summary (sidecars) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        c = r["child"]
        counts = r["line"].split("sidecars: ")[-1]
        load = f"{c.load_s:.1f}" if c.load_s is not None else "-"
        lines.append(f"| {r['name']} | {c.wall_s:.1f} | {n / c.wall_s:,.0f} | {load} | {r['batches']} | "
                     f"{c.cpu_s:.1f} | {c.rss_mb:,.0f} | {counts} |")
    first = res["index"]
    lines += [
        "",
        "| measure | value | goal | met |",
        "|---|---:|---|---|",
        f"| tag {n:,} indexed photos with new labels, whole process (s) | {new.wall_s:.1f} | <= {GOAL_S:g} s | "
        f"{'yes' if new.wall_s <= GOAL_S else 'no'} |",
        f"| image-tower batches in the three tag runs | {sum(r['batches'] for r in runs)} | 0 | "
        f"{'yes' if not any(r['batches'] for r in runs) else 'no'} |",
        f"| the index, made once before (`altclip index TREE`; {first.marks.get('batches', 0)} batches: "
        f"only the distinct pictures) (s) | {first.wall_s:.1f} | (not a goal) | |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=100_000, help="photos in the library [100,000]")
    p.add_argument("--folders", type=int, default=100, help="folders they are spread over [100]")
    p.add_argument("--distinct", type=int, default=256, help="distinct pictures among them [256]")
    p.add_argument("--tiny", action="store_true", help="the tiny random checkpoint instead of the full-size one")
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE)
    p.add_argument("--tmp", type=Path, default=None, help="where the photo tree goes [default: $TMPDIR]")
    p.add_argument("--profile", type=Path, default=None, metavar="FILE",
                   help="also run the new-labels run once under cProfile, its stats to FILE")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)

    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    sampler = LoadSampler()
    model = fixtures.ensure_model(args.cache, args.tiny)  # minutes the first time at full size
    env = child_env(args.cache)
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="altclip-tag-bench-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        tree, index_dir = tmp / "library", tmp / "library-index"
        log(f"writing {args.photos:,} small JPEGs to {tree} ...")
        res["bytes"] = build_tree(tree, args.photos, args.folders, args.distinct)
        log("indexing the library once (embeds the distinct pictures only) ...")
        first = run_child(["index", str(tree), "-m", str(model), "--index", str(index_dir)], env, True, tmp)
        first.check("the index")
        if f"{args.photos:,} added" not in first.stderr:
            sys.exit(f"bench: the index did not add every photo:\n{first.stderr[-2000:]}")
        res["index"] = first
        res["runs"] = [
            timed_tag("first run (every sidecar created)", tag_cmd(tree, index_dir, model, LABELS), env, tmp,
                      "created", args.photos),
            timed_tag("identical re-run (nothing changes)", tag_cmd(tree, index_dir, model, LABELS), env, tmp,
                      "unchanged", args.photos),
            timed_tag("other labels (every sidecar changed)", tag_cmd(tree, index_dir, model, OTHER_LABELS), env,
                      tmp, "changed", args.photos),
        ]
        if args.profile:
            res["profile_s"] = profile_run(tag_cmd(tree, index_dir, model, LABELS), env, args.profile)
            log(f"profiled run (labels changed back): {res['profile_s']:.1f} s with the profiler")
        log(f"removing {tmp} ...")
        shutil.rmtree(tree, ignore_errors=True)
    during = sampler.stop()
    text = report(args, argv, started, load_before, os.getloadavg(), during, res)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
