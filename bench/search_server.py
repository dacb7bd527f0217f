"""`altclip search` as a shell pays it, through a warm `altclip serve`, on a 100,000-file index.

    .venv/bin/python bench/search_server.py            # the full-size random model (bench/fixtures.py), 5 repetitions
    .venv/bin/python bench/search_server.py --tiny     # the tiny model: checks the script, times mean little

A tree of small PNGs (bench/index.py's: 100 folders x 1,000 files, 16 distinct images, each file
its own copy) is indexed once, a server started on it, and then each row is a whole `altclip
search "a dog running on the beach" --dir TREE --index INDEX -f jsonl` process (median of
--reps), through the server's socket unless it says in-process:
- the first search after the server started: the server walks the tree (and starts watching it);
- searches of the unchanged, watched tree: the server skips the walk;
- the same less the server's own time for the request (from its log line): what the client costs;
- a search right after one file was touched: the server walks that file's folder again (1,000 files);
- `--no-index`: the index searched as it is;
- in-process (`--server off`): the model loaded, the tree walked, the query encoded here;
- `altclip --help`: the floor of any altclip process.
Needs the serve extra (pip install '.[serve]').
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import fixtures  # noqa: E402
from index import build_tree  # noqa: E402
from run import altclip_exe, child_env, load_average, machine_line, shared_home  # noqa: E402
from serve import add_when_idle, loads_line, prepare, start_server, timed, timed_through  # noqa: E402

from altclip_cli.serve import client  # noqa: E402

QUERY = "a dog running on the beach"
GOAL_S = 0.3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=fixtures.DEFAULT_CACHE)
    p.add_argument("--tiny", action="store_true", help="the tiny model (a quick check of the script)")
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=5)
    add_when_idle(p)
    args = p.parse_args(argv)
    model = prepare(args)
    env = {"ALTCLIP_HOME": str(shared_home(args.cache.expanduser().resolve()))}
    exe = altclip_exe()
    started = datetime.now(timezone.utc)
    load_before = load_average()
    rows: dict[str, list[float]] = {}

    with tempfile.TemporaryDirectory(prefix="acsearch", dir="/tmp") as tmp:
        tmp = Path(tmp)
        tree, index = tmp / "tree", tmp / "index"
        log(f"writing {args.files:,} small PNGs ...")
        build_tree(tree, args.files)
        log("indexing them (the distinct images embedded, the others take their vectors by content) ...")
        timed([exe, "index", str(tree), "--index", str(index), "-m", str(model), "-q"], env)
        search = [exe, "search", QUERY, "--dir", str(tree), "--index", str(index), "-m", str(model), "-f", "jsonl"]
        rows["in_process"] = [timed(search + ["--server", "off"], env) for _ in range(max(1, args.reps // 2))]
        rows["help"] = [timed([exe, "--help"], env) for _ in range(3)]

        sock_dir = tmp / "sock"
        sock_dir.mkdir(mode=0o700)
        server, sock = start_server(model, env, sock_dir)
        server_log = sock_dir / "server.log"
        through = search + ["--server", sock]
        try:
            first, first_server = timed_through(through, env, server_log)
            rows["first"], rows["first_server"] = [first], [first_server]
            info = client.health(sock)
            precision = f"{info['device']}, {info['precision']} ({info['precision_requested']})"
            checked = subprocess.run(through + ["--debug"], capture_output=True, env=child_env(env))
            skipped = "nothing changed below" in checked.stderr.decode("utf-8", "replace")
            for key in ("watched", "watched_server", "touched", "no_index"):
                rows[key] = []
            for rep in range(args.reps):
                log(f"repetition {rep + 1} of {args.reps}")
                seconds, serving = timed_through(through, env, server_log)
                rows["watched"].append(seconds)
                rows["watched_server"].append(serving)
                os.utime(next((tree / "d000").iterdir()))  # a change: the next search walks its folder
                rows["touched"].append(timed(through, env))
                rows["no_index"].append(timed(through + ["--no-index"], env))
        finally:
            server.terminate()
            server.wait(60)
    print(report(rows, args, precision, skipped, started, loads_line(load_before, args)))


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def report(rows, args, precision: str, skipped: bool, started, loads: str) -> str:
    def med(key):
        return statistics.median(rows[key])

    flags = (" --tiny" if args.tiny else "") + (f" --files {args.files}" if args.files != 100_000 else "") + \
            (f" --reps {args.reps}" if args.reps != 5 else "") + (" --when-idle" if args.when_idle else "")
    model = "the tiny test model" if args.tiny else "the full-size random checkpoint with BAAI/AltCLIP's shapes"
    out = [f"Measured {started:%Y-%m-%d %H:%M} UTC on {machine_line()}; {model}, {precision}; "
           f"{args.reps} repetitions, medians; "
           f"{loads}. Command: `python bench/search_server.py{flags}`.", "",
           f"`altclip search` over {args.files:,} indexed files, whole process (s). The server skipped the walk "
           f"of the watched tree: {'yes' if skipped else 'NO'}.", "",
           "| measure | seconds | goal | met |", "|---|---:|---|---|"]

    def row(name, value, goal=None):
        met = "" if goal is None else ("yes" if value <= goal else "no")
        out.append(f"| {name} | {value:.3f} | {'' if goal is None else f'<= {goal:g} s'} | {met} |")

    row("through the warm server, the tree unchanged since the server's last walk (watched)", med("watched"), GOAL_S)
    row("the same less the server's own time for the request", med("watched") - med("watched_server"))
    row("the server's own time for that request (query encoding + ranking)", med("watched_server"))
    row("through the server, one file touched before (the server walks its folder again)", med("touched"))
    row("through the server, the first search after it started (walk, then watch)", med("first"))
    row("through the server, `--no-index`", med("no_index"))
    row("in-process (`--server off`): model load, walk, query, ranking", med("in_process"))
    row("`altclip --help`: the start-up floor", med("help"))
    return "\n".join(out)


if __name__ == "__main__":
    main()
