"""`altclip embed`: embeddings of texts or images, to an .npy file with a sidecar or as jsonl."""

from __future__ import annotations

import sys

import click

from ..options import (UsageError, common_options, image_input_options, messages, model_options, open_kwargs,
                       pil_pixel_limit, reuse_index_option, server_options, walk_options)
from .embed_dataset import check_usage as check_dataset_usage
from .embed_dataset import dataset_options, settings_for
from .embed_dataset import to_dataset as to_dataset_output


@click.command()
@click.argument("images", nargs=-1, type=click.Path(), metavar="[IMAGES]...")
@click.option("--image", "image_mode", is_flag=True,
              help="Embed the IMAGES (files, folders, globs, URLs; - reads paths from stdin).")
@click.option("--text", "text_file", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE|-",
              help="Embed the lines of a UTF-8 text file (row i is line i, empty lines included).")
@click.option("-o", "--output", type=click.Path(), metavar="OUT.npy|DIR/",
              help="Write an (N, D) array here and OUT.jsonl beside it [default: jsonl on stdout]; a folder "
                   "(ending in /) gets a dataset of parts (see --part-size, --shard, --ray).")
@click.option("--no-normalize", is_flag=True, help="Keep the raw projections (default: L2-normalised).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Element type of the array.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run with -o from its last checkpoint (same inputs and options).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=1000, show_default=True, metavar="N",
              help="With -o, make the partial output resumable every N inputs.")
@dataset_options
@reuse_index_option
@image_input_options
@walk_options
@model_options
@server_options
@common_options
def embed(images, image_mode, text_file, output, no_normalize, dtype, resume, checkpoint_every, index_dir, recursive,
          max_pixels, url_timeout, url_max_mb, input_timeout, exact_decode, include_hidden, exclude_dirs, model, device,
          precision, revision, batch_size, server, token_file, quiet, dataset):
    """Embed texts or images into AltCLIP's shared space.

    With -o the rows go to OUT.npy (float32, L2-normalised unless --no-normalize) and
    OUT.jsonl holds one line per input in input order: {"row": i, "image": ...} or
    {"row": i, "text": ...}; an input that failed has {"row": null, ..., "error": ...} and no
    row. OUT.manifest.json ties the two; nothing appears under these names before the run
    is done, and `altclip check OUT.npy` tells whether a pair belongs together (after a
    kill -9 while the files were being replaced, it names that state). Without -o each
    input is one jsonl line on stdout with an "embedding" field. When `altclip serve` runs
    the same model (see --server), it computes the vectors; the files are written here.

    With -o DIR/ (a folder) the rows go to a dataset: DIR/manifest.json and parts
    part-00000.npy + .jsonl (rows numbered within the part), ... of --part-size inputs each,
    each complete (part-NNNNN.done) or absent. --resume redoes only the parts not done;
    --shard I/N does only every N-th part, so the tasks of a job array fill one dataset
    together; --ray hands the parts to Ray actors. `altclip merge DIR -o all.npy` joins the
    parts into what -o all.npy writes in one run, bit for bit.

    \b
    Examples:
      altclip embed --text captions.txt -o captions.npy
      find photos -name '*.jpg' | altclip embed --image - -o photos.npy
      altclip embed --image photos/ -r -o photos.npy --resume
      echo "一只猫" | altclip embed --text -
      altclip embed --image photos/ -r -o vectors/ --shard $SLURM_ARRAY_TASK_ID/8 --resume
      altclip embed --image /shared/photos -r -o /shared/vectors/ --ray
    """
    msgs = messages()
    if text_file is not None and (images or image_mode):
        raise UsageError("give either --text FILE or --image IMAGES, not both")
    if text_file is None and not images:
        if image_mode:
            raise UsageError("--image needs IMAGES", hint="name files or folders, or - to read paths from stdin")
        raise UsageError("nothing to embed", hint="use --text FILE (one text per line) or --image IMAGES")
    if output is None and resume:
        raise UsageError("--resume needs -o OUT.npy")
    if output == "-":
        raise UsageError("-o - is not supported", hint="leave out -o to get jsonl on stdout")
    if index_dir is not None and text_file is not None:
        raise UsageError("--index is for images", hint="leave out --index with --text")
    if index_dir is not None and no_normalize:
        msgs.warn("--index is not used with --no-normalize: the index holds normalised vectors")
        index_dir = None
    from ...outputs.dataset import is_dataset_path

    to_dataset = output is not None and is_dataset_path(output)
    check_dataset_usage(dataset, to_dataset=to_dataset, server=server, index_dir=index_dir)

    kind = "text" if text_file is not None else "image"
    if kind == "text":
        from ...inputs.textfile import read_text_file
        from ..options import stdin_binary

        texts, _ = read_text_file(text_file, stdin=stdin_binary())
        inputs = texts
        names = texts
    else:
        from ...inputs.sources import expand_images
        from ..options import stdin_for, walk_kwargs

        inputs = list(expand_images(images, recursive=recursive, stdin=stdin_for(images), warn=msgs.warn,
                                    **walk_kwargs(include_hidden, exclude_dirs, index_dir)))
        names = [s.name for s in inputs]
    if not inputs:
        msgs.warn("nothing to embed: the input list is empty")

    run = _Run(kind, model, device, precision, batch_size, not no_normalize, msgs, exact_decode, revision,
               input_timeout, index_dir, server=server, token_file=token_file, max_pixels=max_pixels,
               url_timeout=url_timeout, url_max_mb=url_max_mb)
    opener_kw = open_kwargs(max_pixels, url_timeout, url_max_mb)
    with pil_pixel_limit(max_pixels):
        if output is None:
            failed = _to_stdout(run, inputs, opener_kw)
        elif to_dataset:
            return to_dataset_output(run, inputs, names, output, dtype, resume, dataset, opener_kw)
        else:
            failed = _to_file(run, inputs, names, output, dtype, resume, checkpoint_every, opener_kw)
    if failed:
        msgs.warn(f"{failed} of {len(inputs)} inputs failed")
        click.get_current_context().exit(_exit_status().PARTIAL)


class _Run:
    """The model (loaded on first need) and the settings of one embed run."""

    def __init__(self, kind, model, device, precision, batch_size, normalize, msgs, exact_decode=False,
                 revision=None, input_timeout=None, index_dir=None, *, server="off", token_file=None,
                 max_pixels=None, url_timeout=30.0, url_max_mb=64.0):
        self.kind, self.model_name, self.device, self.precision = kind, model, device, precision
        self.exact_decode, self.revision, self.input_timeout = exact_decode, revision, input_timeout
        self.batch_size, self.normalize, self.msgs = batch_size, normalize, msgs
        self.index_dir = index_dir  # --index: vectors of unchanged indexed images from there
        self.server, self.token_file, self.max_pixels = server, token_file, max_pixels
        self.url_timeout, self.url_max_mb = url_timeout, url_max_mb
        self._model = None

    @property
    def model(self):
        """The model in this process, or a server's (options.get_model)."""
        if self._model is None:
            from ..options import get_model

            self._model = get_model(self.server, self.token_file, self.model_name, self.device, self.precision,
                                    self.msgs, exact_decode=self.exact_decode, revision=self.revision,
                                    max_pixels=self.max_pixels, images=self.kind == "image",
                                    url_timeout=self.url_timeout, url_max_mb=self.url_max_mb,
                                    input_timeout=self.input_timeout)
        return self._model

    def batches(self, inputs, opener_kw):
        """Lists of (name, record, embedding or None) in input order (see runtime/rows.py), from
        the model in this process or a server's alike."""
        from ...runtime import rows

        if self.kind == "text":
            return rows.text_batches(self.model, inputs, batch_size=self.batch_size, normalize=self.normalize)
        if not inputs:
            return iter(())

        def batches(sources):
            return rows.image_batches(self.model, sources, batch_size=self.batch_size, normalize=self.normalize,
                                      open_kw=opener_kw, input_timeout=self.input_timeout,
                                      on_error=lambda name, why: self.msgs.error(f"{name}: {why}"))

        if self.index_dir is None:
            return batches(inputs)
        return self._with_index(inputs, batches)

    def _with_index(self, inputs, batches):
        """batches(inputs), with the vectors of the inputs that the --index index holds unchanged
        taken from it (only the others go through the model, and are added to it)."""
        from ...search.reuse import IndexAdditions, indexed_rows, merged_batches, open_for_reuse

        store = open_for_reuse(self.index_dir, self.model, warn=self.msgs.warn)
        hits = indexed_rows(store, inputs) if store is not None else {}
        additions = IndexAdditions.for_run(self.index_dir, self.model, store, warn=self.msgs.warn)

        def embedded(sources):
            model_batches = batches(sources)
            return additions.taking_batches(sources, model_batches) if additions is not None else model_batches

        if not hits:
            if store is not None:
                store.close()
            return embedded(inputs)
        rest = [s for i, s in enumerate(inputs) if i not in hits]
        size = self.batch_size or self.model.default_batch_size("image")
        return merged_batches(inputs, hits, store, embedded(rest) if rest else iter(()), size)


def _to_stdout(run: _Run, inputs, opener_kw) -> int:
    from ..formats import dumps, embedding_line

    stdout = sys.stdout
    failed = row = 0
    with run.msgs.progress("embedding", total=len(inputs), data_to_stdout=True) as bar:
        for batch in run.batches(inputs, opener_kw):
            lines = []
            for _name, record, emb in batch:
                if emb is None:
                    failed += 1
                    lines.append(dumps({"row": None, **record}))
                else:
                    key = "text" if "text" in record else "image"
                    lines.append(embedding_line(row, key, record[key], emb))
                    row += 1
            stdout.write("\n".join(lines) + "\n")
            stdout.flush()
            bar.advance(len(batch))
    return failed


def _to_file(run: _Run, inputs, names, output, dtype, resume, checkpoint_every, opener_kw) -> int:
    import numpy as np

    from ...version import __version__
    from ...outputs.embedfile import EmbeddingOutput, check_writable
    from ...outputs.signals import sigterm_as_interrupt

    msgs = run.msgs
    check_writable(output)  # before loading the model
    try:
        model = run.model
    except KeyboardInterrupt:
        msgs.error(f"interrupted; {output} was not written")
        click.get_current_context().exit(_exit_status().INTERRUPTED)
    settings = settings_for(run, model, dtype)  # everything that changes the numbers: --resume compares it
    out = EmbeddingOutput(output, settings=settings, checkpoint_every=checkpoint_every)
    if out.finish_interrupted_commit():
        msgs.note(f"finished writing {output} and {out.sidecar}, which an interrupted run had left half-replaced")
    start = 0
    if resume:
        done = out.completed(names)
        if done is not None:
            msgs.note(f"{output} is already complete ({done['rows']} rows from {done['inputs']} inputs): nothing to do")
            return int(done.get("failed", 0))
    if resume and out.has_partial():
        start = out.resume_point()
        out.check_inputs(names)
        msgs.note(f"resuming after {start} of {len(inputs)} inputs")
    elif resume:
        msgs.note(f"nothing to resume for {output}: starting from the beginning")
    elif out.has_partial():
        msgs.warn(f"discarding the partial output of an interrupted run ({out.part.name}); "
                  "pass --resume to continue it instead")
    failed = out.failed_in_checkpoint() if start else 0
    with sigterm_as_interrupt() as terminated:
        try:
            with msgs.progress("embedding", total=len(inputs)) as bar:
                bar.advance(start)
                for batch in run.batches(inputs[start:], opener_kw):
                    if not out.is_open:
                        out.open(model.embed_dim)
                    rows = [emb for _n, _r, emb in batch if emb is not None]
                    failed += len(batch) - len(rows)
                    out.add([(n, r) for n, r, _e in batch], np.stack(rows) if rows else None)
                    bar.advance(len(batch))
            if not out.is_open:
                out.open(model.embed_dim)  # no inputs left: still write a whole (N, D) array
            out.commit(failed=failed, extra={"model": run.model_name, "altclip": __version__})
        except KeyboardInterrupt:
            status = _exit_status()
            code = status.TERMINATED if terminated.received else status.INTERRUPTED
            if out.committed:  # the signal came during the commit, which finished first
                msgs.error(f"interrupted after writing {out.rows} rows to {output} and {out.sidecar}")
                click.get_current_context().exit(code)
            if out.stop():
                msgs.error(f"interrupted after {out.inputs_done} of {len(inputs)} inputs; {output} was not written",
                           hint=f"run the same command with --resume to continue from input {out.inputs_done + 1}")
            else:
                msgs.error(f"interrupted; {output} was not written")
            click.get_current_context().exit(code)
        except BaseException:
            try:
                if out.stop():
                    msgs.note(f"the first {out.inputs_done} inputs are kept; --resume continues from there")
            except OSError:
                out.discard()
            raise
    msgs.note(f"wrote {out.rows} row{'' if out.rows == 1 else 's'} to {output} and {out.sidecar}")
    return failed


def _exit_status():
    from ..status import ExitStatus

    return ExitStatus
