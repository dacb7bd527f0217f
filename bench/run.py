"""Benchmark altclip against the reference (transformers' AltCLIPModel), side by side, in one run.

    .venv/bin/python bench/run.py            # 3 repetitions, 64 images, 512 texts (long: ~15 min on 2 cores)
    .venv/bin/python bench/run.py --quick    # 1 repetition, 8 images, 64 texts
    .venv/bin/python bench/run.py --only classify   # the classify rows alone (first ever, cold, again)

Every measurement runs in a fresh process; altclip and the reference alternate, and which goes
first swaps each repetition. The table (medians, ratios altclip / reference, the project's
targets) is printed and written to bench/results.md; the raw samples go to <cache>/last-run.json.
The random full-size checkpoint and the JPEGs are made on the first run and cached (see fixtures.py).
The image tower's limit is measured in the precision altclip computes in on this CPU: bf16 where
the CPU has avx512_bf16 or AMX, fp32 elsewhere (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fixtures  # noqa: E402
import report  # noqa: E402

PYTHON = sys.executable
WORKER = str(HERE / "worker.py")
REFERENCE_CLASSIFY = str(HERE / "reference_classify.py")
CLASSIFY_IMAGE = 8  # a 4000x3000 photo, as a phone takes them
CLASSIFY_LABELS = ["猫", "dog"]
HELP_CALLS = 3  # per repetition


# --- running a child -------------------------------------------------------------------------------


@dataclass
class Child:
    rc: int
    wall_s: float
    rss_mb: float  # peak resident memory of the child (ru_maxrss)
    stdout: str
    stderr: str

    def result(self) -> dict | None:
        """The JSON a worker prints last, or None when it failed."""
        if self.rc != 0 or not self.stdout.strip():
            return None
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_child(cmd: list[str], env: dict | None = None) -> Child:
    """Run `cmd` to completion; wall time and peak RSS come from the kernel's accounting of it alone."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=child_env(env))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return Child(proc.returncode, wall, usage.ru_maxrss / 1024, out.read().decode(errors="replace"),
                     err.read().decode(errors="replace"))


def child_env(extra: dict | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
    return {**env, **(extra or {})}


def altclip_exe() -> str:
    beside = Path(PYTHON).with_name("altclip")
    return str(beside) if beside.exists() else (shutil.which("altclip") or "altclip")


def fresh_home(cache: Path) -> dict:
    """A new ALTCLIP_HOME with an empty label cache that shares one weight cache: a user's state
    after altclip has run once (below fp32, weights cast and cached) but never with these labels."""
    (cache / "homes").mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(dir=cache / "homes"))
    shared = shared_home(cache) / "weights"
    shared.mkdir(exist_ok=True)
    (home / "weights").symlink_to(shared, target_is_directory=True)
    return {"ALTCLIP_HOME": str(home)}


def shared_home(cache: Path) -> Path:
    """The ALTCLIP_HOME that owns the shared weight cache (made by the first classify)."""
    home = cache / "altclip-home"
    home.mkdir(exist_ok=True)
    return home


def failed(what: str, child: Child) -> None:
    tail = "\n    ".join(child.stderr.strip().splitlines()[-6:])
    print(f"bench: {what} failed (exit {child.rc}):\n    {tail}", file=sys.stderr)


# --- measurements: each runs fresh processes and adds to `samples` ---------------------------------


class Bench:
    def __init__(self, args, model: Path, images: list[Path]):
        self.args, self.model, self.images = args, model, images
        self.samples = defaultdict(lambda: defaultdict(list))  # side -> metric -> values
        self.outputs = args.cache / "outputs"  # the last embeddings of each side, for the cross-check
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.loads = []  # the 1-minute load average after each measurement
        self.limit_precision = None  # what altclip computes in on this CPU, from the matmul worker

    def add(self, side: str, **values) -> None:
        for k, v in values.items():
            self.samples[side][k].append(v)
        self.loads.append(os.getloadavg()[0])
        shown = ", ".join(f"{k}={v:.3g}" for k, v in values.items())
        print(f"bench:   {side:9s} {shown}  (load {self.loads[-1]:.2f})", file=sys.stderr)

    def embedding(self, task: str, side: str) -> None:
        count = self.args.images if task == "images" else self.args.texts
        cmd = [PYTHON, WORKER, task, side, "--model", str(self.model), "--count", str(count),
               "--out", str(self.outputs / f"{task}-{side}.npy"), "--precision", self.args.precision]
        if task == "images":
            cmd += ["--images", str(fixtures.images_dir(self.args.cache))]
        env = fresh_home(self.args.cache) if side == "altclip" else None
        child = run_child(cmd, env)
        res = child.result()
        if res is None:
            return failed(f"{task} embedding ({side})", child)
        self.add(side, **{f"{task}_per_s": res["per_s"], f"{task}_load_s": res["load_s"],
                          f"{task}_rss_mb": child.rss_mb})

    def classify(self, side: str) -> None:
        """A cold classify, as a shell user runs it; for altclip also a second call, same labels."""
        if side == "reference":
            child = run_child([PYTHON, REFERENCE_CLASSIFY, self.classify_image(), str(self.model), *CLASSIFY_LABELS])
            if child.rc != 0:
                return failed("reference classify", child)
            return self.add(side, classify_s=child.wall_s, classify_rss_mb=child.rss_mb)
        env = {**fresh_home(self.args.cache), "ALTCLIP_PRECISION": self.args.precision}
        cold = run_child(self.altclip_classify(), env)
        if cold.rc != 0:
            return failed("altclip classify", cold)
        again = run_child(self.altclip_classify(), env)  # same ALTCLIP_HOME: the labels are cached now
        if again.rc != 0:
            return failed("altclip classify (repeat)", again)
        self.add(side, classify_s=cold.wall_s, classify_rss_mb=cold.rss_mb, classify_repeat_s=again.wall_s)

    def first_classify(self) -> None:
        """altclip's very first call: nothing cached, so below fp32 it casts the fp32 weights and
        caches them (in fp32 there is nothing to cast: it is a cold call)."""
        home = shared_home(self.args.cache)
        shutil.rmtree(home)
        env = {"ALTCLIP_HOME": str(home), "ALTCLIP_PRECISION": self.args.precision}
        child = run_child(self.altclip_classify(), env)
        if child.rc != 0:
            return failed("altclip classify (first run)", child)
        self.add("altclip", classify_first_s=child.wall_s, classify_first_rss_mb=child.rss_mb)

    def classify_image(self) -> str:
        return str(self.images[min(CLASSIFY_IMAGE, len(self.images) - 1)])

    def altclip_classify(self) -> list[str]:
        cmd = [altclip_exe(), "classify", self.classify_image(), "--model", str(self.model)]
        for label in CLASSIFY_LABELS:
            cmd += ["-l", label]
        return cmd

    def help(self) -> None:
        for _ in range(HELP_CALLS):
            child = run_child([altclip_exe(), "--help"])
            if child.rc != 0:
                return failed("altclip --help", child)
            self.add("altclip", help_s=child.wall_s)

    def matmul(self) -> None:
        """GFLOP/s in the precision altclip computes in here (the worker skips an emulated bf16)."""
        child = run_child([PYTHON, WORKER, "matmul", "--n", str(self.args.matmul_n),
                           "--precision", self.args.precision])
        res = child.result()
        if res is None:
            return failed("matmul", child)
        self.limit_precision = res["precision"]
        self.add("machine", **{k: v for k, v in res.items() if k.endswith("_gflops")})

    def accuracy(self) -> dict:
        child = run_child([PYTHON, WORKER, "accuracy", "--model", str(self.model),
                           "--images", str(fixtures.images_dir(self.args.cache)),
                           "--count", str(self.args.images), "--texts", str(self.args.texts),
                           "--precision", self.args.precision], fresh_home(self.args.cache))
        res = child.result()
        if res is None:
            failed("accuracy", child)
        return res or {}

    def cross_check(self) -> dict:
        """Cosine (min, mean) of altclip's embeddings against the reference's (fp32), last repetition."""
        import numpy as np

        out = {}
        for task in ("images", "texts"):
            a, r = (self.outputs / f"{task}-altclip.npy"), (self.outputs / f"{task}-reference.npy")
            if a.is_file() and r.is_file():
                cos = np.sum(np.load(a) * np.load(r), -1)
                out[task] = (float(cos.min()), float(cos.mean()))
        return out


def repetition(bench: Bench, rep: int) -> None:
    """One round of every measurement; the side that goes first alternates between rounds.
    altclip's first classify ever (its caches removed) comes right before its cold classify,
    which then finds the weights cached, as every later call does."""
    sides = ["altclip", "reference"] if rep % 2 == 0 else ["reference", "altclip"]
    bench.help()
    for side in sides:
        if side == "altclip":
            bench.first_classify()
        bench.classify(side)
    if bench.args.only == "classify":
        return
    for task in ("images", "texts"):
        for side in sides:
            bench.embedding(task, side)
    bench.matmul()


# --- the report ------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} cores"


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "altclip"))


def markdown(bench: Bench, acc: dict, cross: dict, meta: dict) -> str:
    from altclip_cli.nn.config import read_config

    med = report.medians(bench.samples)
    vision = read_config(bench.model).vision
    prec, asked = bench.limit_precision or acc.get("precision") or "?", bench.args.precision
    lines = [f"Measured {meta['date']} on {meta['machine']} ({meta['versions']}), "
             f"{meta['reps']} repetition(s), {bench.args.images} images, {bench.args.texts} texts; "
             f"load average {meta['load_before']} before, {meta['load_after']} after; 1-minute load during "
             f"the run {load_spread(bench.loads)} (the bench itself accounts for about 2 on 2 cores).",
             f"Command: `{meta['command']}`. Medians; ratios are altclip / reference. "
             f"Random weights with BAAI/AltCLIP's shapes; the reference is fp32 (its default), altclip "
             f"`{asked}`" + ("." if prec == "?" else f" ({prec} on this CPU)."),
             "", *report.comparison_table(med, measured_only=bool(bench.args.only)), ""]
    if bench.args.only == "classify":
        return "\n".join(lines)
    lines += [f"The image tower's limit on this CPU ({prec} matmul rate / FLOPs per image; {prec} is what "
              f"altclip `{asked}` computes in here):", "",
              *report.limit_table(med, vision, prec), "", *report.accuracy_table(acc, cross, asked), ""]
    return "\n".join(lines)


def make_fixtures(args) -> tuple[Path, list[Path]]:
    """The cached checkpoint and images, made in a child process (this one must stay small)."""
    cmd = [PYTHON, str(HERE / "fixtures.py"), "--cache", str(args.cache)] + (["--tiny"] if args.tiny else [])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return fixtures.model_dir(args.cache, args.tiny), fixtures.image_paths(args.cache)[:args.images]


def load_spread(loads: list[float]) -> str:
    return f"median {report.median(loads):.2f}, max {max(loads):.2f}" if loads else "n/a"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repetition, 8 images, 64 texts (a smoke run)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    p.add_argument("--images", type=int, help=f"images to embed (default {fixtures.N_IMAGES}; 8 with --quick)")
    p.add_argument("--texts", type=int, help="texts to embed (default 512; 64 with --quick)")
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE,
                   help="where the checkpoint and images are kept (default $ALTCLIP_BENCH_CACHE or ~/.cache/altclip-bench)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead of the full-size one (to test the bench)")
    p.add_argument("--matmul-n", type=int, default=4096, help="size of the square matmul that measures GFLOP/s")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="altclip's precision (default auto: bf16 on CPUs with avx512_bf16/AMX, fp32 elsewhere)")
    p.add_argument("--only", choices=["classify"],
                   help="measure only the classify rows: first classify ever, cold, again (and --help)")
    p.add_argument("--out", type=Path, help="markdown table (default bench/results.md; <cache>/results-tiny.md with --tiny)")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.images = min(args.images or (8 if args.quick else fixtures.N_IMAGES), fixtures.N_IMAGES)
    args.texts = args.texts or (64 if args.quick else 512)
    args.cache = args.cache.expanduser().resolve()
    args.out = args.out or (args.cache / "results-tiny.md" if args.tiny else HERE / "results.md")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    model, images = make_fixtures(args)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_line(),
            "versions": versions(), "reps": args.reps, "load_before": load_average(),
            "command": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])}
    print(f"bench: model {model}, {len(images)} images, load average {meta['load_before']}", file=sys.stderr)
    bench = Bench(args, model, images)
    for rep in range(args.reps):
        print(f"bench: repetition {rep + 1}/{args.reps}", file=sys.stderr)
        repetition(bench, rep)
    acc, cross = ({}, {}) if args.only else (bench.accuracy(), bench.cross_check())
    meta["load_after"] = load_average()
    text = markdown(bench, acc, cross, meta)
    print(text)
    args.out.write_text(text, encoding="utf-8")
    (args.cache / "last-run.json").write_text(json.dumps({"meta": meta, "samples": bench.samples,
                                                          "accuracy": acc, "cross": cross}, indent=1))
    shutil.rmtree(args.cache / "homes", ignore_errors=True)
    print(f"bench: wrote {args.out} and {args.cache / 'last-run.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
