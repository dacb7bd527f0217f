"""`altclip classify`: zero-shot classification of images against labels in any language."""

from __future__ import annotations

import sys

import click

from ...errors import InputError
from ..options import (UsageError, common_options, image_input_options, messages, model_options, open_kwargs,
                       reuse_index_option, server_options, stdin_for, walk_kwargs, walk_options)
from ..formats import FORMATS


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(), metavar="IMAGES...")
@click.option("-l", "--label", "labels", multiple=True, metavar="LABEL",
              help='A label, in any language (repeatable; kept in the order given). "cat|猫|gato" is one label '
                   'of synonyms, reported as its first; write a literal | as \\|.')
@click.option("--labels-file", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
              help="One label per line, as -l takes it (UTF-8; blank lines skipped); - reads stdin.")
@click.option("-t", "--template", "templates", multiple=True, metavar='"... {} ..."',
              help="Text around each label, {} marks the label; several are averaged (prompt ensemble).")
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
@image_input_options
@walk_options
@model_options
@server_options
@common_options
def classify(images, labels, labels_file, templates, top_k, min_prob, fmt, sort_into, sort_mode, dry_run, index_dir, recursive, max_pixels, url_timeout,
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
    groups = _collect_labels(labels, labels_file, images)
    labels = [g[0] for g in groups]  # each group is shown and reported under its first alternative
    _check_templates(templates)
    _check_min_prob(min_prob)
    _warn_duplicates(labels, msgs)
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
        from ..options import get_model, pil_pixel_limit

        model_ = get_model(server, token_file, model, device, precision, msgs, exact_decode=exact_decode,
                           revision=revision, max_pixels=max_pixels, scores=True, url_timeout=url_timeout,
                           url_max_mb=url_max_mb, input_timeout=input_timeout)
        templates = list(templates) or None
        opener_kw = open_kwargs(max_pixels, url_timeout, url_max_mb, model_.draft_min_side)
        records, store = _records(model_, sources, groups, templates, top_k, index_dir, msgs, batch_size,
                                  input_timeout, opener_kw)
        with (pil_pixel_limit(max_pixels),
              msgs.progress("classifying", total=len(sources), data_to_stdout=True) as bar):
            for source, record in zip(sources, records):
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


def _records(model, sources, groups, templates, top_k, index_dir, msgs, batch_size, input_timeout, opener_kw):
    """(classify's records in input order, the --index store or None), scored from the model's
    vectors (and the index's, with --index), in this process or through a server alike (model:
    a runtime.embedder.Embedder). groups: each label's synonyms."""
    from ...inputs.sources import display, open_source, reason
    from ...outputs.records import error_record, score_record

    labels = [g[0] for g in groups]
    label_emb = model.group_embeddings(groups, templates, batch_size=batch_size)
    results, store = _image_results(model, sources, index_dir, msgs, lambda s: open_source(s, **opener_kw),
                                    batch_size, input_timeout)

    def records():
        for r in results:
            name = display(r.source.name)
            if r.embedding is None:
                yield error_record(name, reason(r.error, r.source.name))
            else:
                probs, logits = model.scores(r.embedding[None], label_emb)
                yield score_record(name, labels, probs[0], logits[0], top_k)

    return records(), store


def _image_results(model, sources, index_dir, msgs, open_fn, batch_size, input_timeout):
    """(ImageResults in input order, the --index store or None): with --index, the vectors of the
    images that the index holds unchanged come from it, and only the others go through the model
    (and are added to it)."""
    store, hits, additions = None, {}, None
    if index_dir is not None:
        from ...search.reuse import IndexAdditions, indexed_rows, open_for_reuse

        store = open_for_reuse(index_dir, model, warn=msgs.warn)
        hits = indexed_rows(store, sources) if store is not None else {}
        additions = IndexAdditions.for_run(index_dir, model, store, warn=msgs.warn)
    rest = [s for i, s in enumerate(sources) if i not in hits] if hits else sources
    results = model.stream_images(rest, open_fn=open_fn, batch_size=batch_size,
                                  input_timeout=input_timeout) if rest else iter(())
    if additions is not None and rest:
        results = additions.taking(rest, results)
    if hits:
        from ...search.reuse import merged_results

        results = merged_results(sources, hits, store, results)
    return results, store


def _collect_labels(given, labels_file, images) -> list[list[str]]:
    """-l labels then the file's, in order, each split into its synonyms; an empty label or
    alternative is a usage error naming it."""
    labels = list(given)
    for i, label in enumerate(labels, start=1):
        if not label.strip():
            raise UsageError(f"label {i} (-l {label!r}) is empty", hint="give every -l a non-empty label")
    if labels_file is not None:
        from ...inputs.textfile import read_text_file
        from ..options import stdin_binary

        if labels_file == "-" and "-" in images:
            raise UsageError("stdin cannot hold both the image list and the labels",
                             hint="put the labels in a file, or give them with -l")
        try:
            lines, name = read_text_file(labels_file, stdin=stdin_binary())
        except InputError as exc:
            raise UsageError(exc.message, hint=exc.hint) from None
        labels += [line for line in lines if line.strip()]
    if not labels:
        raise UsageError("no labels given", hint="pass labels with -l LABEL (repeatable) or --labels-file FILE")
    return [_synonyms(i, label) for i, label in enumerate(labels, start=1)]


def _synonyms(i: int, label: str) -> list[str]:
    """"cat|猫|gato" -> ["cat", "猫", "gato"]; "\\|" is a literal | (other backslashes stay as they are)."""
    parts, cur, chars = [], [], iter(label)
    for c in chars:
        if c == "\\":
            nxt = next(chars, "")
            cur.append("|" if nxt == "|" else c + nxt)
        elif c == "|":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    for part in parts:
        if not part.strip():
            what = "is only |" if not "".join(parts).strip() else "has an empty alternative"
            raise UsageError(f"label {i} ({label!r}) {what}",
                             hint=r'separate synonyms with | as in "cat|猫|gato"; write a literal | as \|')
    return parts


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


def _check_templates(templates) -> None:
    for template in templates:
        if "{}" not in template:
            raise UsageError(f"template {template!r} has no {{}} where the label goes",
                             hint='write it like --template "a photo of {}."')


def _warn_duplicates(labels, msgs) -> None:  # labels: the names the records use
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    for label, count in seen.items():
        if count > 1:
            msgs.warn(f"label {label!r} is given {count} times; each is scored as its own row, "
                      "so they share the probability")
