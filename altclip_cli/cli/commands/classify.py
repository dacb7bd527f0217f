"""`altclip classify`: zero-shot classification of images against labels in any language."""

from __future__ import annotations

import sys

import click

from ..options import (UsageError, common_options, filter_options, image_input_options, messages, model_options,
                       reuse_index_option, search_filter, server_options, stdin_for, walk_kwargs, walk_options)
from ..formats import FORMATS
from ..zeroshot import label_groups, label_options, scored_records


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(), metavar="IMAGES...")
@label_options
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=None, metavar="K",
              help="Show only the K most likely labels per image [default: all].")
@click.option("--min-prob", type=float, default=None, metavar="P",
              help="Report an image whose best probability is below P (0 < P <= 1) as unsure: its top is null.")
@click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Output format [default: table on a terminal, jsonl otherwise].")
@click.option("--sort-into", type=click.Path(file_okay=False), metavar="DIR",
              help="Put each image into DIR/<label>/ (unsure ones into DIR/_unsure/) as a symbolic link; "
                   "never overwrites, and a second run changes nothing.")
@click.option("--copy", "sort_mode", flag_value="copy", help="With --sort-into: copy the images.")
@click.option("--move", "sort_mode", flag_value="move",
              help="With --sort-into: move the images (an interrupted move loses none; run it again to finish).")
@click.option("--dry-run", is_flag=True, help="With --sort-into: print the plan on stderr and change nothing.")
@reuse_index_option
@filter_options
@image_input_options
@walk_options
@model_options
@server_options
@common_options
def classify(images, labels, labels_file, templates, top_k, min_prob, fmt, sort_into, sort_mode, dry_run, index_dir,
             after, before, near, within, camera, recursive, max_pixels, url_timeout,
             url_max_mb, input_timeout, exact_decode, include_hidden, exclude_dirs, model, device, precision, revision, batch_size, server,
             token_file, quiet):
    """Score IMAGES against labels: which label fits each image best.

    IMAGES are files, folders (-r to include subfolders), globs, http(s) URLs, or - to read a
    list of paths from stdin. Each label is encoded exactly as given, in any language; use
    --template to wrap labels in a sentence. Probabilities are the softmax over the labels.
    When `altclip serve` runs the same model (see --server), it does the model's work.

    \b
    Examples:
      altclip classify cat.jpg -l 猫 -l dog -l "a beach"
      altclip classify photos/ -r --labels-file labels.txt -f csv > scores.csv
      find . -name '*.png' | altclip classify - -l cat -l dog -t "a photo of a {}."
      altclip classify cat.jpg -l cat -l dog --server off     # never through `altclip serve`
      altclip classify photos/ -l "cat|猫|gato" -l "dog|犬|perro" --min-prob 0.6
      altclip classify photos/ -l cat -l dog --min-prob 0.6 --sort-into sorted/ --move
      altclip classify photos/ -r -l beach -l city --index auto --after 2023-06 --before 2023-08

    With --index, --after, --before, --near/--within and --camera classify only the images whose
    date, place or camera the index holds and that fit (as `altclip search` filters them); the
    others are counted on stderr.

    \b
    json is one array, jsonl one object per line, in input order:
      {"image": "cat.jpg", "top": "猫", "scores": [{"label": "猫", "prob": 0.93, "logit": 24.1}, ...]}
      {"image": "bad.jpg", "error": "..."}
    """
    from ...inputs.sources import expand_images
    from ...outputs.records import with_top
    from ..formats import classify_writer
    from ..terminal import isatty

    msgs = messages()
    groups = label_groups(labels, labels_file, templates, images, msgs)
    labels = [g[0] for g in groups]  # each group is shown and reported under its first alternative
    _check_min_prob(min_prob)
    where = search_filter(after, before, near, within, camera)
    if where.active and index_dir is None:
        given = next(f"--{name} {value}" for name, value in (("after", after), ("before", before), ("near", near),
                                                              ("camera", camera)) if value is not None)
        raise UsageError(f"{given} filters by what the index holds of each image: it needs --index",
                         hint="add --index auto (the model's own index) or --index DIR")
    sorter = _sorter(sort_into, sort_mode, dry_run, msgs)
    if fmt is None:
        fmt = "table" if isatty(sys.stdout) else "jsonl"
    sources = list(expand_images(images, recursive=recursive, stdin=stdin_for(images), warn=msgs.warn,
                                 **walk_kwargs(include_hidden, exclude_dirs, index_dir, sort_into)))
    if not sources:
        msgs.warn("no images to classify: the inputs named none")

    writer = classify_writer(fmt, sys.stdout, images=len(sources), labels=labels, top_k=top_k)
    failed = 0
    store = None  # the index of --index, when its vectors are used
    if sources:
        from ..options import pil_pixel_limit

        records, store = scored_records(
            sources, groups, templates, top_k, msgs, index_dir=index_dir, batch_size=batch_size,
            input_timeout=input_timeout, server=server, token_file=token_file, model=model, device=device,
            precision=precision, exact_decode=exact_decode, revision=revision, max_pixels=max_pixels,
            url_timeout=url_timeout, url_max_mb=url_max_mb, where=where)
        with (pil_pixel_limit(max_pixels),
              msgs.progress("classifying", total=len(sources), data_to_stdout=True) as bar):
            for source, record in zip(sources, records):
                if record is None:  # left out by the filters
                    bar.advance()
                    continue
                record = with_top(record, min_prob)
                if "error" in record:
                    failed += 1
                    msgs.error(f"{record['image']}: {record['error']}")
                writer.write(record)
                if sorter is not None and "error" not in record and not sorter(source, record):
                    failed += 1
                bar.advance()
    writer.close()
    if store is not None:
        store.close()
    if failed:
        from ..status import ExitStatus

        msgs.warn(f"{failed} of {len(sources)} images failed")
        click.get_current_context().exit(ExitStatus.PARTIAL)


def _sorter(sort_into, mode, dry_run, msgs):
    """None without --sort-into; else sort(source, record) -> False when the image could not be
    placed, placing it by its top label. The folder is checked, and what an interrupted run left
    there settled, now, before any model work; the sorter closes with the command."""
    if sort_into is None:
        for flag, given in (("--copy" if mode == "copy" else "--move", mode), ("--dry-run", dry_run)):
            if given:
                raise UsageError(f"{flag} needs --sort-into DIR", hint="add --sort-into DIR, or leave out " + flag)
        return None
    from pathlib import Path

    from ...inputs.names import display
    from ...outputs.sortinto import Sorter, check_root, folder_name

    root = Path(sort_into)
    check_root(root, create=not dry_run)
    mode = mode or "link"
    sorter = Sorter(root, mode, dry_run=dry_run)
    click.get_current_context().call_on_close(sorter.close)
    for line in sorter.recovered:
        msgs.note(display(line))

    def sort(source, record) -> bool:
        if source.path is None:
            msgs.warn(f"{record['image']}: not a local file, not sorted")
            return True
        try:
            done = sorter.place(source.path, folder_name(record["top"]))
        except OSError as exc:
            where = f": {exc.filename}" if exc.strerror and exc.filename else ""
            msgs.error(display(f"{record['image']}: cannot {mode} it into {root} ({exc.strerror or exc}{where})"))
            return False
        if done.action == "already sorted":
            msgs.note(display(f"{source.path}: already in a folder of {root}, not sorted again"))
        elif done.action != "already there":
            msgs.note(display(f"{mode} {source.path} -> {done.target}"))
        elif dry_run:
            msgs.note(display(f"{source.path}: already at {done.target}"))
        return True

    return sort


def _check_min_prob(min_prob) -> None:
    if min_prob is not None and not 0 < min_prob <= 1:
        raise UsageError(f"--min-prob {min_prob:g} is outside (0, 1]",
                         hint="give a probability such as --min-prob 0.5")
