"""`altclip index`: keep a model's index of the images below some folders up to date (for
`altclip search`, and for `classify`/`embed --index`)."""

from __future__ import annotations

import click

from ..options import (common_options, excluded_dirs, index_decode_options, index_option, messages, model_options,
                       server_options, walk_options)


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True), metavar="[PATHS]...")
@index_option(help="Where the index lives; auto: one per model under ALTCLIP_HOME/indexes. A DIR inside a "
                   "walked folder stores paths relative to it, so the two can move together.")
@walk_options
@click.option("--retry-failed", is_flag=True, help="Try again the images that failed before, changed or not.")
@click.option("--rebuild", is_flag=True, help="Start the index over (a damaged one too) and embed every image.")
@click.option("--compact", is_flag=True,
              help="Rewrite the vector file without the vectors no file uses any more (done on its own when a "
                   "quarter of it, and at least 4,096 vectors, are unused).")
@click.option("--wait", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Wait this long for another run updating the same index [default: fail at once].")
@click.option("--commit-every", type=click.IntRange(min=1), default=256, show_default=True, metavar="N",
              help="Commit to the index every N images embedded (a killed run loses at most these).")
@index_decode_options
@model_options
@server_options
@common_options
def index(paths, index_dir, include_hidden, exclude_dirs, retry_failed, rebuild, compact, wait, commit_every,
          max_pixels, input_timeout, exact_decode, model, device, precision, revision, batch_size, server, token_file,
          quiet):
    """Index the images below PATHS (default: the current folder) for `altclip search`.

    New and changed images (by size and modification time) are embedded, deleted ones dropped,
    and renamed or copied ones take their vector from the file with the same content without
    running the model. An image that fails is named on stderr and recorded; it is tried again
    once it changes (or with --retry-failed). Run it again at any time: an unchanged tree takes
    a walk and no model. Interrupted or killed, it keeps what it committed (every --commit-every
    images). When `altclip serve` runs the same model (see --server), its warm model indexes
    over its Unix socket (with its own batch size, input timeout and commits).

    \b
    Examples:
      altclip index ~/Pictures
      altclip index photos --index photos/.altclip-index     # the index moves with the folder
      altclip index --exclude-dir Trash --include-hidden ~/Pictures

    \b
    Exit codes: 0 done, 1 error (another run holds the index, a damaged index, ...),
    3 done but some images failed, 130/143 interrupted (the work so far is kept).
    """
    import os

    from ...outputs.signals import sigterm_as_interrupt
    from ...search.run import index_folder, index_paths
    from ...search.summary import UpdateSummary
    from ..status import ExitStatus
    from ..options import connect_server, load_model, open_kwargs
    from ..terminal import isatty

    msgs = messages()
    roots = list(paths) or ["."]
    excludes = excluded_dirs(exclude_dirs)
    summary = UpdateSummary()
    compacted = None  # (vector rows before, after) when the run compacted the index
    remote = connect_server(server, token_file, model, device, precision, msgs, exact_decode=exact_decode,
                            revision=revision, max_pixels=max_pixels)
    if remote is not None and not remote.searches:  # over TCP the server may not see these folders
        remote = None
    what = ", ".join(roots)
    with sigterm_as_interrupt() as terminated:
        try:
            if remote is not None:
                folder = index_folder(index_dir, remote.weights_id)
                summary, compacted = _index_on_server(remote, roots, os.path.abspath(folder),
                                                      include_hidden, excludes, retry_failed, rebuild, compact,
                                                      wait, msgs)
            else:
                from ...search.update import model_identity

                identity = model_identity(model, revision=revision, progress=not msgs.quiet and isatty(msgs.stream))
                folder = index_folder(index_dir, identity["weights"])

                def get_model():
                    return load_model(model, device, precision, msgs, exact_decode=exact_decode, revision=revision)

                kw = {"include_hidden": include_hidden, "open_kw": open_kwargs(max_pixels, 30.0, 64.0),
                      "batch_size": batch_size, "input_timeout": input_timeout, "msgs": msgs,
                      "retry_failed": retry_failed, "commit_every": commit_every}
                if excludes is not None:
                    kw["exclude_dirs"] = excludes
                with _pixel_limit(max_pixels):
                    compacted = index_paths(get_model, identity, os.path.expanduser(folder), roots,
                                            rebuild=rebuild, compact=compact, wait=wait, summary=summary, **kw)
        except KeyboardInterrupt:
            code = ExitStatus.TERMINATED if terminated.received else ExitStatus.INTERRUPTED
            if remote is not None:
                msgs.error(f"interrupted; the server (pid {remote.info.get('pid')}) goes on updating the index",
                           hint="run the same command again to see where it stands")
                click.get_current_context().exit(code)
            done = summary.added + summary.updated + summary.renamed
            msgs.error(f"interrupted; the index keeps what was done ({done:,} image{'' if done == 1 else 's'} "
                       f"indexed, {summary.failed:,} failed)", hint="run the same command again to go on from there")
            click.get_current_context().exit(code)
    msgs.note(summary.line(what))
    if compacted is not None and compacted[0] > compacted[1]:
        dropped = compacted[0] - compacted[1]
        msgs.note(f"compacted the index's vectors: {dropped:,} no longer used dropped ({compacted[1]:,} kept)")
    if summary.still_failing:
        msgs.note(f"{summary.still_failing:,} image{'s' if summary.still_failing > 1 else ''} that failed before "
                  "and did not change since were not tried again (--retry-failed tries them)")
    if summary.failed:
        click.get_current_context().exit(ExitStatus.PARTIAL)


def _index_on_server(remote, roots, index, include_hidden, excludes, retry_failed, rebuild, compact, wait, msgs):
    """`altclip index` by the server (POST /v1/index), its messages printed here: (its
    UpdateSummary, its compaction (rows before, after) or None)."""
    from ...paths import real_root
    from ...search.summary import UpdateSummary
    from ...search.update import not_utf8_warning, storable
    from ..messages import ServerProgress, replay
    from ..terminal import isatty

    paths = []
    for root in roots:  # named as the index names them (a request holds UTF-8 text only)
        real = real_root(root)
        if storable(real):
            paths.append((root, real))
        else:
            msgs.warn(not_utf8_warning(real))
    if not paths:
        return UpdateSummary(), None
    bar = ServerProgress(msgs) if not msgs.quiet and isatty(msgs.stream) else None
    try:
        answer = remote.index(paths, index=index, include_hidden=include_hidden, exclude_dirs=excludes,
                              retry_failed=retry_failed, rebuild=rebuild, compact=compact, wait=wait, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    replay(answer.get("messages", []), msgs)
    compacted = answer.get("compacted")
    return UpdateSummary.from_dict(answer.get("update") or {}), (tuple(compacted) if compacted else None)


def _pixel_limit(max_pixels):
    """options.pil_pixel_limit, which imports PIL: only when --max-pixels changes anything."""
    from contextlib import nullcontext

    from ..options import pil_pixel_limit

    return nullcontext() if max_pixels is None else pil_pixel_limit(max_pixels)
