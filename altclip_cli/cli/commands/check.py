"""`altclip check`: do an embedding array and its sidecar belong together?"""

from __future__ import annotations

import click

from ..options import common_options, messages


@click.command(short_help="Check that OUT.npy and OUT.jsonl belong together.")
@click.argument("output", type=click.Path(dir_okay=False), metavar="OUT.npy")
@click.option("--repair", is_flag=True,
              help="Finish a write that was interrupted while the files were being replaced.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON object on stdout.")
@common_options
def check(output, repair, as_json, quiet):
    """Check that OUT.npy and its sidecar OUT.jsonl are the pair `altclip embed -o OUT.npy`
    committed, unchanged: their sizes and sha256 against OUT.manifest.json, and the sidecar's
    row numbers against the array's shape. Exit 0 when they belong together, 1 (with each
    problem named) when they do not or cannot be shown to.

    \b
    Examples:
      altclip check photos.npy && python train.py photos.npy
      altclip check photos.npy --repair     # after a run killed while it replaced the files
    """
    from pathlib import Path

    from ...outputs.embedfile import finish_interrupted_commit
    from ...outputs.manifest import check_pair, sidecar_path
    from ..formats import dumps

    msgs = messages()
    path = Path(output)
    if repair and finish_interrupted_commit(path):
        msgs.note(f"finished the interrupted write of {path}")
    problems, manifest = check_pair(path)
    if as_json:
        click.echo(dumps({"output": str(path), "ok": not problems, "problems": problems,
                          "rows": (manifest or {}).get("rows"), "dim": (manifest or {}).get("dim")}))
    for problem in problems:
        msgs.error(problem)
    if problems:
        journal = any("was interrupted" in p for p in problems)
        msgs.error(f"{path} and its sidecar cannot be trusted as a pair",
                   hint=f"altclip check {output} --repair" if journal else
                   "write them again with altclip embed ... -o " + str(output))
        click.get_current_context().exit(1)
    msgs.note(f"ok: {path} and {sidecar_path(path).name} belong together "
              f"({manifest['rows']} rows of {manifest['dim']}, model {manifest.get('model', '?')})")
