"""What a warm `altclip serve` saves: the same work in-process (a fresh `altclip` process that
loads the model) and through a server that has it loaded already.

    .venv/bin/python bench/serve.py              # the full-size random model (bench/fixtures.py), 3 repetitions
    .venv/bin/python bench/serve.py --tiny       # the tiny model: checks the script, times mean little

Measured, each a median over the repetitions:
- `echo "a cat" | altclip embed --text -`, whole process, in-process (--server off), through the
  warm server (`--server SOCKET`: the command's own client), and as a whole process of a bare
  stdlib client (`python -c` with altclip_cli.serve.client);
- classify of one JPEG with two labels (labels cached), the same three ways; through the server
  also less the server's own time for the command's requests (from its per-request log lines):
  what the command adds to the model's work;
- one request from a client that is already running (the server's own overhead);
- images/s: one in-process embedding run over N JPEGs (model load excluded) against 8
  concurrent clients sending the same JPEGs to the server one per request.
Needs the serve extra (pip install '.[serve]').
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import fixtures  # noqa: E402
from run import altclip_exe, child_env, load_average, machine_line, run_child, shared_home  # noqa: E402

from altclip_cli.serve import client  # noqa: E402

PYTHON = sys.executable
LABELS = ["猫", "dog"]
CLIENT = """
import json, sys
from altclip_cli.serve.client import post_json
print(json.dumps(post_json(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))["results"][0])[:80])
"""
IN_PROCESS_RATE = """
import json, sys, time
import altclip_cli
model = altclip_cli.load(sys.argv[1], device="cpu")
paths = sys.argv[2:]
start = time.perf_counter()
n = sum(r.embedding is not None for r in model.stream_images(paths))
print(json.dumps({"images": n, "seconds": time.perf_counter() - start, "precision": model.precision}))
"""


IDLE_WAIT = {"on": False, "waited": 0.0}  # --when-idle


def cpu_idle_share(seconds: float = 0.5) -> float:
    """The share of the machine's CPU time that was idle over `seconds` (/proc/stat)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, all

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_idle(limit: float = 600.0) -> None:
    """With --when-idle, until the CPU is 90% idle for half a second (others' jobs on a shared
    machine), at most `limit` seconds."""
    if not IDLE_WAIT["on"]:
        return
    start = time.monotonic()
    while cpu_idle_share() < 0.9 and time.monotonic() - start < limit:
        pass
    IDLE_WAIT["waited"] += time.monotonic() - start


def loads_line(load_before: str, args) -> str:
    """The load averages before and after a run, and how long --when-idle waited."""
    loads = f"load average {load_before} before, {load_average()} after"
    if args.when_idle:
        loads += f"; each measurement started when the CPU was 90% idle ({IDLE_WAIT['waited']:.0f} s waited)"
    return loads


def add_when_idle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--when-idle", action="store_true",
                   help="start each whole-process measurement when the CPU is 90%% idle (a shared machine)")


def prepare(args) -> Path:
    """--when-idle taken into account, the fixtures made (their progress on stderr), and the
    model folder --tiny picks."""
    IDLE_WAIT["on"] = args.when_idle
    cache = args.cache.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([PYTHON, str(HERE / "fixtures.py"), "--cache", str(cache)] + (["--tiny"] if args.tiny else []),
                   check=True, stdout=sys.stderr)
    return fixtures.model_dir(cache, args.tiny)


def timed(cmd: list[str], env: dict, stdin: bytes | None = None) -> float:
    wait_idle()
    start = time.perf_counter()
    proc = subprocess.run(cmd, input=stdin, capture_output=True, env=child_env(env))
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr.decode()[-2000:]}")
    return seconds


def start_server(model: Path, env: dict, folder: Path) -> tuple[subprocess.Popen, str]:
    sock = str(folder / "s.sock")
    log = open(folder / "server.log", "wb")
    proc = subprocess.Popen([altclip_exe(), "serve", "-m", str(model), "--socket", sock],  # one log line a request
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=child_env(env))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: the server exited:\n{(folder / 'server.log').read_text()}")
        try:
            client.health(sock)
            return proc, sock
        except client.ServerDown:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("bench: the server did not start in 300 s")


def server_ms(log: Path, start: int) -> float:
    """The server's own time (ms) for the POST requests logged after byte `start` of its log."""
    text = log.read_bytes()[start:].decode("utf-8", "replace")
    return sum(float(m.group(1)) for m in re.finditer(r" POST /v1/\S+ 200 ([\d.]+) ms", text))


def timed_through(cmd: list[str], env: dict, log: Path, stdin: bytes | None = None) -> tuple[float, float]:
    """(whole process seconds, the server's seconds for its requests) of a command using the server."""
    start = log.stat().st_size
    seconds = timed(cmd, env, stdin)
    time.sleep(0.05)  # the log line is written as the answer goes out
    return seconds, server_ms(log, start) / 1000


def concurrent_rate(sock: str, paths: list[Path], clients: int = 8) -> float:
    todo = list(paths)
    lock = threading.Lock()
    errors = []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop()
            try:
                client.post_json(sock, "/v1/embed", {"images": [str(path)]})
            except client.ServerError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise SystemExit(f"bench: {len(errors)} requests failed: {errors[0]}")
    return len(paths) / seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE)
    p.add_argument("--tiny", action="store_true", help="the tiny model (a quick check of the script)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--images", type=int, default=32, help="JPEGs for the images/s rows")
    p.add_argument("--no-rate", action="store_true", help="leave out the images/s rows (the slow part)")
    add_when_idle(p)
    args = p.parse_args(argv)
    model = prepare(args)
    cache = args.cache.expanduser().resolve()
    images = fixtures.image_paths(cache)[:args.images]
    photo = images[min(8, len(images) - 1)]
    env = {"ALTCLIP_HOME": str(shared_home(cache))}  # weights already cast and cached, as after a first run
    exe = altclip_exe()
    embed_base = [exe, "embed", "-m", str(model), "--text", "-"]
    classify_base = [exe, "classify", str(photo), "-m", str(model), "-f", "json"] + sum((["-l", x] for x in LABELS), [])
    embed_cmd, classify_cmd = embed_base + ["--server", "off"], classify_base + ["--server", "off"]  # in-process
    timed(embed_cmd, env, b"a cat\n")  # warm-up: the weight cache and the page cache
    timed(classify_cmd, env)  # and the labels

    load_before = load_average()
    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="acbench"))
    server, sock = start_server(model, env, folder)
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("embed_cli", "embed_client", "classify_cli", "classify_client", "embed_req",
                                     "classify_req", "rate_local", "rate_server", "embed_via", "embed_via_server",
                                     "classify_via", "classify_via_server")}
    log = folder / "server.log"
    through = ["--server", sock]
    try:
        embed_client = [PYTHON, "-c", CLIENT, sock, "/v1/embed", json.dumps({"texts": ["a cat"]})]
        classify_body = {"images": [str(photo)], "labels": LABELS}
        classify_client = [PYTHON, "-c", CLIENT, sock, "/v1/classify", json.dumps(classify_body)]
        client.post_json(sock, "/v1/classify", classify_body)  # the server's first classify (labels)
        for rep in range(args.reps):
            print(f"bench: repetition {rep + 1} of {args.reps}", file=sys.stderr)
            rows["embed_cli"].append(timed(embed_cmd, env, b"a cat\n"))
            rows["embed_client"].append(timed(embed_client, env))
            rows["classify_cli"].append(timed(classify_cmd, env))
            rows["classify_client"].append(timed(classify_client, env))
            for key, cmd, stdin in (("embed_via", embed_base + through, b"a cat\n"),
                                    ("classify_via", classify_base + through, None)):
                seconds, serving = timed_through(cmd, env, log, stdin)
                rows[key].append(seconds)
                rows[key + "_server"].append(serving)
            for key, path, body in (("embed_req", "/v1/embed", {"texts": ["a cat"]}),
                                    ("classify_req", "/v1/classify", classify_body)):
                wait_idle()
                start = time.perf_counter()
                client.post_json(sock, path, body)
                rows[key].append(time.perf_counter() - start)
            if args.no_rate:
                continue
            child = run_child([PYTHON, "-c", IN_PROCESS_RATE, str(model), *map(str, images)], env)
            result = child.result()
            if result is None:
                raise SystemExit(f"bench: the in-process run failed:\n{child.stderr[-2000:]}")
            rows["rate_local"].append(result["images"] / result["seconds"])
            rows["rate_server"].append(concurrent_rate(sock, images))
        stats = client.health(sock)["batching"]
    finally:
        server.terminate()
        server.wait(60)
    print(table(rows, args, model, len(images), stats, loads_line(load_before, args)))


def command_flags(args) -> str:
    flags = [" --tiny"] if args.tiny else []
    flags += [f" --reps {args.reps}"] if args.reps != 3 else []
    flags += [" --no-rate"] if args.no_rate else ([f" --images {args.images}"] if args.images != 32 else [])
    flags += [" --when-idle"] if args.when_idle else []
    return "".join(flags)


def table(rows, args, model, n_images, stats, loads) -> str:
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    added = {kind: statistics.median(a - b for a, b in zip(rows[f"{kind}_via"], rows[f"{kind}_via_server"]))
             for kind in ("embed", "classify")}  # what the command adds to the server's work
    info = subprocess.run([altclip_exe(), "info"], capture_output=True, text=True, env=child_env({})).stdout
    precision = next((line for line in info.splitlines() if line.startswith("precision:")), "precision: ?")
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line()}; {precision}; "
        f"{'the tiny test model' if args.tiny else 'random weights with BAAI/AltCLIP shapes'} ({model.name}); "
        f"{args.reps} repetitions, medians; {loads}. Command: `python bench/serve.py{command_flags(args)}`.",
        "",
        "| measure | in-process (`altclip ...`) | through the warm server | server / in-process |",
        "|---|---:|---:|---:|",
        f"| `echo \"a cat\" \\| altclip embed --text -` in-process; a bare stdlib client (`python -c`) asking the "
        f"server, whole process (s) | {med['embed_cli']:.2f} | "
        f"{med['embed_client']:.2f} | {med['embed_client'] / med['embed_cli']:.2f}x |",
        f"| `altclip embed --text -` through the server (`--server SOCKET`), whole process (s) | "
        f"{med['embed_cli']:.2f} | {med['embed_via']:.3f} | {med['embed_via'] / med['embed_cli']:.2f}x |",
        f"| the same less the server's time for its requests ({med['embed_via_server'] * 1000:.0f} ms) (s) | "
        f"n/a | {added['embed']:.3f} | |",
        f"| classify 1 JPEG, 2 labels in-process; a bare stdlib client, whole process (s) | {med['classify_cli']:.2f} | "
        f"{med['classify_client']:.2f} | {med['classify_client'] / med['classify_cli']:.2f}x |",
        f"| `altclip classify` 1 JPEG, 2 labels, `--server SOCKET`, whole process (s) | {med['classify_cli']:.2f} | "
        f"{med['classify_via']:.3f} | {med['classify_via'] / med['classify_cli']:.2f}x |",
        f"| the same less the server's time for its requests ({med['classify_via_server'] * 1000:.0f} ms) (s) | "
        f"n/a | {added['classify']:.3f} | |",
        f"| one request from a running client: embed 1 text (ms) | n/a | {med['embed_req'] * 1000:.1f} | |",
        f"| one request from a running client: classify 1 JPEG, 2 labels (ms) | n/a | {med['classify_req'] * 1000:.1f} | |",
    ]
    if "rate_local" in med:
        lines.append(f"| image embedding, {n_images} JPEGs (images/s): one in-process run (load excluded) vs 8 concurrent "
                     f"clients | {med['rate_local']:.2f} | {med['rate_server']:.2f} | "
                     f"{med['rate_server'] / med['rate_local']:.2f}x |")
    lines += [
        "",
        f"Server batching over the run: {stats['batches']} forward passes for {stats['items']} inputs, "
        f"{stats['multi_job_batches']} passes shared by several requests (at most {stats['largest_batch_jobs']}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
