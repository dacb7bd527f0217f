"""`altclip merge`: a dataset's parts joined into one array and sidecar."""

from __future__ import annotations

import click

from ..options import common_options, messages


@click.command(short_help="Join a dataset's parts (embed -o DIR/) into one OUT.npy + OUT.jsonl.")
@click.argument("folder", type=click.Path(file_okay=False), metavar="DIR")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), metavar="OUT.npy",
              help="Write the (N, D) array here and OUT.jsonl (rows numbered from 0) and OUT.manifest.json beside it.")
@common_options
def merge(folder, output, quiet):
    """Join the parts of a dataset written by `altclip embed ... -o DIR/` into OUT.npy,
    OUT.jsonl and OUT.manifest.json: row for row and bit for bit what `altclip embed ...
    -o OUT.npy` writes in one run over the same inputs, committed the same way (nothing
    appears under these names before it is done; `altclip check OUT.npy` accepts it). Each
    part is checked against its .done record (sizes and sha256); a dataset with missing
    parts is refused, and they are named.

    \b
    Examples:
      altclip merge vectors/ -o photos.npy
      altclip merge vectors/ -o photos.npy && altclip check photos.npy
    """
    from ...outputs.dataset import merge as merge_parts
    from ...outputs.dataset import open_complete
    from ...outputs.embedfile import check_writable
    from ...outputs.signals import sigterm_as_interrupt
    from ..status import ExitStatus

    msgs = messages()
    manifest = open_complete(folder, verb="merge")
    check_writable(output)
    with sigterm_as_interrupt() as terminated:
        try:
            with msgs.progress("merging", total=manifest["inputs"]) as bar:
                out = merge_parts(folder, output, advance=bar.advance)
        except KeyboardInterrupt:
            msgs.error(f"interrupted; {output} was not written")
            click.get_current_context().exit(ExitStatus.TERMINATED if terminated.received else ExitStatus.INTERRUPTED)
    msgs.note(f"wrote {out.rows} row{'' if out.rows == 1 else 's'} from {manifest['parts']} parts to {output} "
              f"and {out.sidecar}")
