"""Benchmark `altclip index`: re-indexing an unchanged tree, and indexing throughput against `altclip embed`.

    .venv/bin/python bench/index.py            # 100,000 files, 3 re-index runs; 64 JPEGs, 2 repetitions (~10 min on 2 cores)
    .venv/bin/python bench/index.py --quick    # 10,000 files; 16 JPEGs, 1 repetition

Two measurements, in one run, every one a fresh process, as a shell user runs the commands:

1. Re-indexing an unchanged tree: 100 folders x 1,000 small PNGs (16 distinct 16x16 images,
   each file its own copy, so 100,000 inodes as a photo tree has; equal contents share one
   vector, so the first index embeds only 16 images). The first `altclip index` (timed, reported
   apart) fills the index; then `python -m altclip_cli index TREE -m MODEL --index DIR -q` runs
   --reindex-reps times on the unchanged tree (median; goal <= 5 s). Such a run stats every file
   and compares it with the database, whatever the files hold. One more run, instrumented, checks
   that the model was not loaded and torch not imported, and gives altclip's own timing line; the
   walk, the SELECT of the rows and the model's identity are also timed in this process, apart.
2. Indexing throughput against `altclip embed` on the same JPEGs (bench/fixtures.py's, 640x480
   to 4000x3000), the full-size random checkpoint with BAAI/AltCLIP's shapes: `altclip embed
   --image IMG... -o out.npy` and `altclip index FOLDER --index DIR` (a fresh index every time)
   alternate, which goes first swapping each repetition; images/s of the whole process and after
   the model is loaded (from an import hook in the child that notes when `runtime.altclip.load`
   returns, adds up the wall time in `AltCLIP.encode_pixel_batch`, the image tower, and notes the
   time at exit), and images per CPU-second (user + system, from os.wait4), which other processes
   competing for the cores move far less than the wall time. Goal: index / embed >= 0.95. The
   vectors of the two are compared (cosine), as a check that both computed the same thing.

The checkpoint and the JPEGs are cached (see fixtures.py; the checkpoint takes a few minutes to
make the first time); altclip's weight cache is the bench's (<cache>/altclip-home, as run.py and
search.py keep it). Temporary trees go under $TMPDIR (--tmp elsewhere) and are removed. The
markdown table goes to stdout (and to --out FILE) with the command line, the CPU and the load;
every child's numbers to <cache>/index-last-run.json.
"""
from __future__ import annotations

import argparse
import json
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
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import fixtures  # noqa: E402
from run import cpu_name  # noqa: E402

PYTHON = sys.executable
REINDEX_GOAL_S = 5.0
RATIO_GOAL = 0.95
FILES_PER_FOLDER = 1000
DISTINCT_PNGS = 16

# Run in the child before altclip's CLI: when altclip_cli.runtime.altclip is imported (only then:
# importing it here would import torch), wrap its `load` to note when it is called and returns, and
# AltCLIP.encode_pixel_batch (the image tower on a batch) to add up its wall time; at exit, write
# those, the exit time and whether torch was imported to $ALTCLIP_BENCH_MARKS.
HOOK = r"""
import atexit, importlib.machinery, json, os, sys, time
_marks = {"started": time.time()}
class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != "altclip_cli.runtime.altclip":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            load = module.load
            def timed_load(*a, **k):
                _marks["load_called"] = time.time()
                try:
                    return load(*a, **k)
                finally:
                    _marks["load_returned"] = time.time()
            module.load = timed_load
            forward = module.AltCLIP.encode_pixel_batch
            def timed_forward(self, pixels):
                t = time.perf_counter()
                try:
                    return forward(self, pixels)
                finally:
                    _marks["forward_s"] = _marks.get("forward_s", 0.0) + time.perf_counter() - t
                    _marks["batches"] = _marks.get("batches", 0) + 1
            module.AltCLIP.encode_pixel_batch = timed_forward
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _Finder())
def _write():
    _marks["exit"] = time.time()
    _marks["torch_imported"] = "torch" in sys.modules
    with open(os.environ["ALTCLIP_BENCH_MARKS"], "w") as f:
        json.dump(_marks, f)
atexit.register(_write)
sys.argv = ["altclip", *sys.argv[1:]]
from altclip_cli.cli import main
main()
"""


# --- children --------------------------------------------------------------------------------------


@dataclass
class Child:
    rc: int
    wall_s: float
    rss_mb: float  # peak resident memory of the child (ru_maxrss)
    cpu_s: float  # user + system CPU time of the child
    stderr: str
    marks: dict  # from the hook; {} for a plain run

    def check(self, what: str) -> "Child":
        if self.rc != 0:
            sys.exit(f"bench: {what} failed with exit status {self.rc}:\n{self.stderr[-3000:]}")
        return self

    @property
    def load_s(self) -> float | None:
        m = self.marks
        return m["load_returned"] - m["load_called"] if "load_returned" in m else None

    @property
    def before_load_s(self) -> float | None:
        m = self.marks
        return m["load_called"] - m["started"] if "load_called" in m else None

    @property
    def after_load_s(self) -> float | None:
        m = self.marks
        return m["exit"] - m["load_returned"] if "load_returned" in m and "exit" in m else None

    @property
    def forward_s(self) -> float | None:
        return self.marks.get("forward_s")

    @property
    def outside_s(self) -> float | None:
        """After the model load, the wall time not spent in the image tower: waiting for decoding,
        hashing, writing the output or the index, exiting."""
        after, fwd = self.after_load_s, self.forward_s
        return after - fwd if after is not None and fwd is not None else None


def run_child(args: list[str], env: dict, hooked: bool, tmp: Path) -> Child:
    """`python -m altclip_cli ARGS` (hooked: through HOOK) to completion; wall time and peak RSS
    from the kernel's accounting of the child alone."""
    marks_file = tmp / "marks.json"
    marks_file.unlink(missing_ok=True)
    cmd = [PYTHON, "-c", HOOK, *args] if hooked else [PYTHON, "-m", "altclip_cli", *args]
    env = {**env, "ALTCLIP_BENCH_MARKS": str(marks_file)} if hooked else env
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    marks = json.loads(marks_file.read_text()) if hooked and marks_file.exists() else {}
    return Child(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime,
                 stderr, marks)


def child_env(cache: Path) -> dict:
    home = cache / "altclip-home"  # run.py's and search.py's: its weight cache is warm after their runs
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "ALTCLIP_HOME": str(home), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}


class LoadSampler:
    """The 1-minute load average every few seconds while the bench runs (other processes competing
    for the cores show up as a load well above the bench's own, about 2)."""

    def __init__(self, every_s: float = 5.0):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.samples


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- 1. re-indexing an unchanged tree --------------------------------------------------------------


def small_pngs(count: int) -> list[bytes]:
    """`count` distinct 16x16 PNGs (a colour and a pixel pattern each), ~100 bytes."""
    import io

    from PIL import Image

    out = []
    for i in range(count):
        image = Image.new("RGB", (16, 16), (37 * i % 256, 91 * i % 256, 173 * i % 256))
        image.putpixel((i % 16, i // 16), (255, 255, 255))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_tree(root: Path, files: int) -> None:
    pngs = small_pngs(DISTINCT_PNGS)
    for n in range(files):
        folder = root / f"d{n // FILES_PER_FOLDER:03d}"
        if n % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True)
        (folder / f"{n % FILES_PER_FOLDER:04d}.png").write_bytes(pngs[n % len(pngs)])


def in_process_parts(tree: Path, index_dir: Path, model: Path, reps: int) -> dict:
    """Medians of the re-index's parts, timed in this process: the walk, the SELECT of the rows and
    the model's identity (sampled sha256 of the weights file)."""
    from altclip_cli.search.store import IndexStore
    from altclip_cli.search.update import model_identity
    from altclip_cli.inputs.walk import walk_images

    real = os.path.realpath(tree)
    walk, select, ident, found = [], [], [], 0
    for _ in range(reps):
        t = time.perf_counter()
        found = len(walk_images(real).files)
        walk.append(time.perf_counter() - t)
        t = time.perf_counter()
        with IndexStore.open(index_dir) as store:
            rows = len(store.rows_under(real))
        select.append(time.perf_counter() - t)
        t = time.perf_counter()
        model_identity(str(model), progress=False)
        ident.append(time.perf_counter() - t)
    return {"walk": statistics.median(walk), "select": statistics.median(select),
            "identity": statistics.median(ident), "walked": found, "rows": rows}


def bench_reindex(args, tmp: Path, env: dict, model: Path) -> dict:
    tree, index_dir = tmp / "tree", tmp / "tree-index"
    log(f"writing {args.files:,} small PNGs to {tree} ...")
    t = time.perf_counter()
    build_tree(tree, args.files)
    res = {"build_s": time.perf_counter() - t}
    cmd = ["index", str(tree), "-m", str(model), "--index", str(index_dir), "--precision", args.precision]
    log("first index of the tree (loads the model, embeds the distinct images) ...")
    first = run_child(cmd, env, True, tmp).check("the first index")
    if f"{args.files:,} added" not in summary_line(first.stderr):
        sys.exit(f"bench: the first index did not add every file: {summary_line(first.stderr)}")
    res["first"] = first
    res["help"] = [run_child(["--help"], env, False, tmp).check("altclip --help").wall_s for _ in range(3)]
    log(f"re-indexing the unchanged tree {args.reindex_reps} times ...")
    runs = []
    for _ in range(args.reindex_reps):
        c = run_child(cmd + ["-q"], env, False, tmp).check("a re-index")
        if c.stderr.strip():
            log(f"unexpected stderr from a re-index: {c.stderr.strip()[:500]}")
        runs.append(c)
    res["runs"] = runs
    checked = run_child(cmd, env, True, tmp).check("the instrumented re-index")  # not -q: its summary line
    line = summary_line(checked.stderr)
    if f"no changes ({args.files:,} files" not in line:
        sys.exit(f"bench: the re-index of the unchanged tree changed something: {line}")
    res["checked"], res["line"] = checked, line.replace(str(tree), "TREE")
    log("timing the walk, the SELECT and the model identity in this process ...")
    res["parts"] = in_process_parts(tree, index_dir, model, args.reindex_reps)
    return res


def summary_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("indexed ")]
    return lines[-1] if lines else "(no summary line)"


# --- 2. indexing throughput against embed ----------------------------------------------------------


def bench_throughput(args, tmp: Path, env: dict, model: Path, images: list[Path]) -> dict:
    folder = tmp / "images"
    folder.mkdir()
    linked = []
    for src in images:  # the cached files themselves (hard links), for both commands
        dst = folder / src.name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        linked.append(dst)
    out, index_dir = tmp / "embed.npy", tmp / "images-index"
    embed_cmd = ["embed", "--image", *map(str, linked), "-o", str(out), "-m", str(model),
                 "--precision", args.precision, "-q"]
    index_cmd = ["index", str(folder), "--index", str(index_dir), "-m", str(model), "--precision", args.precision]
    runs: dict[str, list[Child]] = {"embed": [], "index": []}
    log("warming up: one image through altclip embed (makes altclip's weight cache if it is cold) ...")
    run_child(["embed", "--image", str(linked[0]), "-o", str(tmp / "warm.npy"), "-m", str(model),
               "--precision", args.precision, "-q"], env, False, tmp).check("the warm-up embed")
    check = None
    for rep in range(args.reps):
        for side in (("embed", "index") if rep % 2 == 0 else ("index", "embed")):
            log(f"repetition {rep + 1}/{args.reps}: altclip {side}, {len(linked)} images ...")
            if side == "embed":
                out.unlink(missing_ok=True)
                for sidecar in tmp.glob("embed.*"):
                    sidecar.unlink()
                runs["embed"].append(run_child(embed_cmd, env, True, tmp).check("altclip embed"))
            else:
                shutil.rmtree(index_dir, ignore_errors=True)
                c = run_child(index_cmd, env, True, tmp).check("altclip index")
                if f"{len(linked):,} added" not in summary_line(c.stderr):
                    sys.exit(f"bench: altclip index did not add every image: {summary_line(c.stderr)}")
                runs["index"].append(c)
            if out.exists() and (index_dir / "index.sqlite3").exists():
                check = compare_vectors(out, index_dir, linked)
    return {"runs": runs, "cosine": check, "n": len(linked)}


def compare_vectors(npy: Path, index_dir: Path, paths: list[Path]) -> float:
    """The smallest cosine between embed's rows and the index's vectors of the same files."""
    import numpy as np

    from altclip_cli.search.store import IndexStore

    emb = np.load(npy)
    with IndexStore.open(index_dir) as store:
        found = store.lookup(paths)
        rows = [found[p][2] for p in paths]
        vec = store.vectors_at(rows)
    a = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    b = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


# --- the report ------------------------------------------------------------------------------------


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    found = sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))
    return ", ".join(found)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def altclip_version() -> str:
    import altclip_cli

    return altclip_cli.__version__


def med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def report(args, argv, started, load_before, load_after, during, re_res, tp_res, precision) -> str:
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/index.py", *argv])
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {cpu_name()} ({cpu_flags() or 'flags ?'}), {os.cpu_count()} cores "
        f"(Python {platform.python_version()}, altclip {altclip_version()}, "
        f"torch {version('torch')}; altclip precision {precision}); load average "
        f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after"
        + (f"; 1-minute load during the run median {statistics.median(during):.2f}, max {max(during):.2f} "
           f"(the bench itself accounts for about 2 while it embeds)." if during else "."),
        f"Command: `{cmd}`. Every row is a fresh process (`python -m altclip_cli ...`) unless it says "
        f"in-process; the model is bench/fixtures.py's random checkpoint with BAAI/AltCLIP's shapes, "
        f"altclip's weight cache warm.",
        "",
    ]
    if re_res is not None:
        runs, checked, parts, first = re_res["runs"], re_res["checked"], re_res["parts"], re_res["first"]
        reindex = med(c.wall_s for c in runs)
        loaded = "load" if checked.marks.get("load_called") else "no load"
        torch = "torch imported" if checked.marks.get("torch_imported") else "no torch"
        clean = not checked.marks.get("load_called") and not checked.marks.get("torch_imported")
        n = args.files
        lines += [
            f"Re-indexing an unchanged tree of {n:,} files ({n // FILES_PER_FOLDER} folders x {FILES_PER_FOLDER:,}; "
            f"{DISTINCT_PNGS} distinct 16x16 PNGs, each file its own copy; files in the page cache), "
            f"median of {len(runs)}; altclip's own line: `{re_res['line']}`.",
            "",
            "| measure | value | goal | met |",
            "|---|---:|---|---|",
            f"| re-index {n:,} unchanged files, whole process (s) | {reindex:.2f} | <= {REINDEX_GOAL_S:g} s | "
            f"{'yes' if reindex <= REINDEX_GOAL_S else 'no'} |",
            f"| model loaded / torch imported during a re-index | {loaded}, {torch} | neither | "
            f"{'yes' if clean else 'no'} |",
            f"| peak RSS of a re-index (MB) | {med(c.rss_mb for c in runs):,.0f} | | |",
            f"| in-process: walk (os.scandir + stat, {parts['walked']:,} files) (s) | {parts['walk']:.2f} | | |",
            f"| in-process: open the index + SELECT its {parts['rows']:,} rows (s) | {parts['select']:.2f} | | |",
            f"| in-process: model identity (sampled sha256 of the 3.5 GB weights) (s) | {parts['identity']:.3f} | | |",
            f"| `altclip --help`, whole process: the start-up floor (s) | {med(re_res['help']):.2f} | | |",
            f"| first index of the tree, whole process (s; {DISTINCT_PNGS} images embedded, the rest take their "
            f"vectors by content; model load {first.load_s:.1f} s) | {first.wall_s:.1f} | (not a goal) | |",
            "",
        ]
    if tp_res is not None:
        e, i = tp_res["runs"]["embed"], tp_res["runs"]["index"]
        n = tp_res["n"]

        def rate(cs, attr):  # images over the median time, so that rates and times agree
            return n / med(getattr(c, attr) for c in cs)

        def row(name, ev, iv, fmt, goal=None):
            ratio = iv / ev if ev else float("nan")
            met = "" if goal is None else ("yes" if ratio >= goal else "no")
            return (f"| {name} | {fmt.format(ev)} | {fmt.format(iv)} | {ratio:.2f} | "
                    f"{'' if goal is None else f'>= {goal:g}'} | {met} |")

        cos = tp_res["cosine"]
        lines += [
            f"Indexing against embedding: {n} bench JPEGs (640x480 to 4000x3000), `altclip embed --image IMG... "
            f"-o out.npy` and `altclip index FOLDER --index DIR` (a fresh index each time), alternating, "
            f"medians of {len(e)}. Same vectors: smallest cosine embed vs index "
            f"{'n/a' if cos is None else f'{cos:.6f}'}.",
            "",
            "| measure | altclip embed | altclip index | index / embed | goal | met |",
            "|---|---:|---:|---:|---|---|",
            row("images/s, whole process", rate(e, "wall_s"), rate(i, "wall_s"), "{:.2f}", RATIO_GOAL),
            row("images/s after the model is loaded", rate(e, "after_load_s"), rate(i, "after_load_s"), "{:.2f}",
                RATIO_GOAL),
            row("images per CPU-second (robust to other processes competing)", rate(e, "cpu_s"), rate(i, "cpu_s"),
                "{:.3f}", RATIO_GOAL),
            row("whole process (s)", med(c.wall_s for c in e), med(c.wall_s for c in i), "{:.1f}"),
            row("start-up before the model load (s)", med(c.before_load_s for c in e),
                med(c.before_load_s for c in i), "{:.2f}"),
            row("model load (s; the weights are memory-mapped: the image tower pages them in)",
                med(c.load_s for c in e), med(c.load_s for c in i), "{:.2f}"),
            row("after the load: in the image tower (s)", med(c.forward_s for c in e), med(c.forward_s for c in i),
                "{:.1f}"),
            row("after the load: outside the image tower (s)", med(c.outside_s for c in e),
                med(c.outside_s for c in i), "{:.2f}"),
            row("CPU time, user + system (s)", med(c.cpu_s for c in e), med(c.cpu_s for c in i), "{:.1f}"),
            row("peak RSS (MB)", med(c.rss_mb for c in e), med(c.rss_mb for c in i), "{:,.0f}"),
            "",
        ]
    return "\n".join(lines)


def save_raw(path: Path, re_res, tp_res) -> None:
    """Every child's numbers, for a closer look than the medians."""
    def child(c: Child) -> dict:
        return {"wall_s": c.wall_s, "cpu_s": c.cpu_s, "rss_mb": c.rss_mb, "marks": c.marks,
                "load_s": c.load_s, "after_load_s": c.after_load_s, "forward_s": c.forward_s}

    raw: dict = {}
    if re_res is not None:
        raw["reindex"] = {"runs": [child(c) for c in re_res["runs"]], "checked": child(re_res["checked"]),
                          "first": child(re_res["first"]), "help_s": re_res["help"], "parts": re_res["parts"],
                          "build_s": re_res["build_s"]}
    if tp_res is not None:
        raw["throughput"] = {side: [child(c) for c in cs] for side, cs in tp_res["runs"].items()}
        raw["throughput"].update(images=tp_res["n"], min_cosine=tp_res["cosine"])
    path.write_text(json.dumps(raw, indent=1) + "\n", encoding="utf-8")


def detect_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    flags = cpu_flags()
    return "bf16 (auto)" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32 (auto)"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10,000 files; 16 images and 1 repetition (the re-index still runs 3 times)")
    p.add_argument("--files", type=int, default=None, help="files in the unchanged tree [100,000; quick: 10,000]")
    p.add_argument("--reindex-reps", type=int, default=3)
    p.add_argument("--images", type=int, default=None, help="bench JPEGs, at most 64 [64; quick: 16]")
    p.add_argument("--reps", type=int, default=None, help="embed/index repetitions [2; quick: 1]")
    p.add_argument("--only", choices=["reindex", "throughput"], default=None, help="run one of the two")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE)
    p.add_argument("--tmp", type=Path, default=None, help="where the temporary trees go [default: $TMPDIR]")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    args.files = args.files or (10_000 if args.quick else 100_000)
    args.images = min(fixtures.N_IMAGES, args.images or (16 if args.quick else 64))
    args.reps = args.reps or (1 if args.quick else 2)

    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    sampler = LoadSampler()
    model = fixtures.ensure_model(args.cache)  # a few minutes the first time
    images = fixtures.ensure_images(args.cache, args.images)
    env = child_env(args.cache)
    re_res = tp_res = None
    with tempfile.TemporaryDirectory(prefix="altclip-index-bench-", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        if args.only != "reindex":  # first: the model's weight cache is made here if it is cold
            tp_res = bench_throughput(args, tmp, env, model, images)
        if args.only != "throughput":
            re_res = bench_reindex(args, tmp, env, model)
        log(f"removing {tmp} ...")
    during = sampler.stop()
    save_raw(args.cache / "index-last-run.json", re_res, tp_res)
    text = report(args, argv, started, load_before, os.getloadavg(), during, re_res, tp_res,
                  detect_precision(args.precision))
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
