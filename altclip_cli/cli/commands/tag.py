"""`altclip tag`: zero-shot keywords, in any language, into the XMP sidecars photo managers read."""

from __future__ import annotations

import sys

import click

from ..options import (UsageError, common_options, image_input_options, messages, model_options,
                       reuse_index_option, server_options, stdin_for, walk_kwargs, walk_options)
from ..zeroshot import label_groups, label_options, scored_records


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(), metavar="IMAGES...")
@label_options
@click.option("--min-prob", type=float, default=0.3, show_default=True, metavar="P",
              help="Write a label whose probability is at least P (0 <= P <= 1).")
@click.option("--threshold", "thresholds", multiple=True, metavar="LABEL=P",
              help="Another P for one label, named by any of its alternatives (repeatable).")
@click.option("--top", type=click.IntRange(min=1), default=3, show_default=True, metavar="N",
              help="Write at most the N most likely labels that pass.")
@click.option("--root", default="altclip", show_default=True, metavar="NAME",
              help="The keyword tree's root for altclip's keywords (NAME|猫, NAME/猫); only keywords under it "
                   "are ever replaced or removed.")
@click.option("--sidecar-name", "naming", type=click.Choice(["full", "adobe"]), default="full", show_default=True,
              help="Name of a new sidecar: full is photo.jpg.xmp (digiKam, darktable), adobe is photo.xmp "
                   "(Lightroom, Capture One). An existing sidecar under either name is the one updated.")
@click.option("--remove", is_flag=True, help="Remove altclip's keywords (those under --root); no labels, no model.")
@click.option("--dry-run", is_flag=True, help="Print what would change and write nothing.")
@reuse_index_option
@image_input_options
@walk_options
@model_options
@server_options
@common_options
def tag(images, labels, labels_file, templates, min_prob, thresholds, top, root, naming, remove, dry_run, index_dir,
        recursive, max_pixels, url_timeout, url_max_mb, input_timeout, exact_decode, include_hidden, exclude_dirs,
        model, device, precision, revision, batch_size, server, token_file, quiet):
    """Write the labels that fit each photo as XMP keywords into its sidecar, never the photo.

    Labels, templates, --index and the server work as in `altclip classify`. A photo gets each
    label whose probability is at least its threshold, at most --top of them, written as the
    label's first alternative under the --root keyword (altclip|猫) in dc:subject,
    lr:hierarchicalSubject and digiKam:TagsList. Everything else in a sidecar is kept; a second
    identical run changes no file; other labels replace only altclip's keywords.

    \b
    Examples:
      altclip tag photos/ -r -l "猫|cat" -l "beach|playa" -l "snow|雪"
      altclip tag photos/ -r --labels-file keywords.txt --threshold 猫=0.5 --top 2 --index auto
      altclip tag photos/ -r -l dog -l cat --dry-run
      altclip tag photos/ -r --remove                 # altclip's keywords out again

    \b
    jsonl when piped, one object per photo, in input order:
      {"image": "a.jpg", "keywords": ["猫"], "sidecar": "a.jpg.xmp", "changed": true}
      {"image": "bad.jpg", "error": "..."}
    """
    from ...inputs.sources import expand_images
    from ...outputs.sidecars import Batch
    from ..options import pil_pixel_limit
    from ..terminal import isatty

    msgs = messages()
    _check_keyword("--root", root)
    if remove:
        if labels or labels_file or thresholds:
            raise UsageError("--remove takes no labels", hint=f"it removes every keyword under {root!r}; "
                                                              "leave out -l, --labels-file and --threshold")
        groups, limits = [], {}
    else:
        groups = label_groups(labels, labels_file, templates, images, msgs)
        for group in groups:
            _check_keyword(f"label {'|'.join(group)!r}", group[0].strip())
        limits = _limits(groups, min_prob, thresholds)
    sources = list(expand_images(images, recursive=recursive, stdin=stdin_for(images), warn=msgs.warn,
                                 **walk_kwargs(include_hidden, exclude_dirs, index_dir)))
    if not sources:
        msgs.warn("no images to tag: the inputs named none")
    out = _Output(sys.stdout, jsonl=not isatty(sys.stdout), dry_run=dry_run)
    store = None
    if remove or not sources:
        records = ({"image": s.name, "scores": []} if s.error is None else {"image": s.name, "error": s.error}
                   for s in sources)
    else:
        records, store = scored_records(
            sources, groups, templates, None, msgs, index_dir=index_dir, batch_size=batch_size,
            input_timeout=input_timeout, server=server, token_file=token_file, model=model, device=device,
            precision=precision, exact_decode=exact_decode, revision=revision, max_pixels=max_pixels,
            url_timeout=url_timeout, url_max_mb=url_max_mb)
    batch = Batch(naming=naming, dry_run=dry_run)
    waiting = _Waiting(out, msgs, dry_run)
    try:
        with (pil_pixel_limit(max_pixels),
              msgs.progress("tagging", total=len(sources), data_to_stdout=True) as bar):
            for i, (source, record) in enumerate(zip(sources, records)):
                keywords = _keywords(source, record, limits, top, msgs)
                if keywords is not None:
                    batch.stage(i, source.path, root, keywords)
                waiting.add(i, record, keywords)
                if waiting.due():
                    waiting.emit(batch.flush())
                bar.advance()
        waiting.emit(batch.flush())
    finally:
        batch.close()
        if store is not None:
            store.close()
    msgs.note(out.summary())
    if out.failed:
        from ..status import ExitStatus

        msgs.warn(f"{out.failed} of {len(sources)} photos failed")
        click.get_current_context().exit(ExitStatus.PARTIAL)


def _keywords(source, record, limits, top, msgs) -> list[str] | None:
    """The keywords for a photo's record, most likely first; None (the error said) when the photo
    failed or has no sidecar."""
    from ...inputs.names import display

    if "error" in record:
        msgs.error(f"{display(record['image'])}: {record['error']}")
        return None
    if source.path is None:
        record["error"] = "not a local file, so it has no sidecar"
        msgs.error(f"{display(record['image'])}: {record['error']}")
        return None
    keywords = []
    for score in record["scores"]:  # most likely first
        keyword = score["label"].strip()
        if score["prob"] >= limits[score["label"]] and keyword not in keywords and len(keywords) < top:
            keywords.append(keyword)
    return keywords


class _Waiting:
    """Photos whose output waits for their sidecars to be in place (outputs.sidecars.Batch): written
    in input order after each flush, which comes every GROUP photos or SECONDS seconds."""

    GROUP = 256
    SECONDS = 2.0

    def __init__(self, out, msgs, dry_run: bool):
        self.out, self.msgs, self.dry_run = out, msgs, dry_run
        self.items: list[tuple[int, dict, list[str] | None]] = []
        self.since = 0.0

    def add(self, key: int, record: dict, keywords: list[str] | None) -> None:
        import time

        if not self.items:
            self.since = time.monotonic()
        self.items.append((key, record, keywords))

    def due(self) -> bool:
        import time

        return len(self.items) >= self.GROUP or (bool(self.items) and time.monotonic() - self.since >= self.SECONDS)

    def emit(self, done: dict) -> None:
        from ...inputs.names import display

        for key, record, keywords in self.items:
            name = display(record["image"])
            result = done.get(key)
            if keywords is None:
                self.out.write({"image": name, "error": record["error"]}, None)
            elif isinstance(result, Exception):
                message, hint = _failure(result)
                self.msgs.error(display(f"{name}: {message}"), hint)
                self.out.write({"image": name, "error": message}, None)
            else:
                if self.dry_run and result.changed:
                    self.msgs.note(display(f"would {_VERB[result.action]} {result.sidecar}: "
                                           f"{', '.join(keywords) or 'no keywords'}"))
                self.out.write({"image": name, "keywords": keywords, "sidecar": display(str(result.sidecar)),
                                "changed": result.changed}, result)
        self.items = []


def _failure(exc: Exception) -> tuple[str, str | None]:
    """(message, hint) for a sidecar that could not be updated."""
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write its sidecar{where} ({exc.strerror or exc})", None
    return exc.message, exc.hint


_VERB = {"created": "create", "changed": "change", "removed": "remove"}


class _Output:
    """Per-photo records on stdout (jsonl when piped, a line each on a terminal) and the counts
    for the summary."""

    def __init__(self, stream, *, jsonl: bool, dry_run: bool):
        self.stream, self.jsonl, self.dry_run = stream, jsonl, dry_run
        self.actions: dict[str, int] = {}
        self.per_keyword: dict[str, int] = {}
        self.tagged = self.failed = 0

    def write(self, record: dict, done) -> None:
        from ..formats import dumps

        if done is None:
            self.failed += 1
        else:
            self.actions[done.action] = self.actions.get(done.action, 0) + 1
            self.tagged += bool(record["keywords"])
            for k in record["keywords"]:
                self.per_keyword[k] = self.per_keyword.get(k, 0) + 1
        if self.jsonl:
            self.stream.write(dumps(record) + "\n")
        elif "error" not in record:
            self.stream.write(f"{record['image']}: {', '.join(record['keywords']) or '-'}"
                              f"{'' if record['changed'] else '  (unchanged)'}\n")
        self.stream.flush()

    def summary(self) -> str:
        counts = ", ".join(f"{self.actions.get(a, 0)} {a}" for a in ("created", "changed", "unchanged", "removed"))
        keywords = ", ".join(f"{k} {n}" for k, n in sorted(self.per_keyword.items(), key=lambda kv: -kv[1]))
        head = "dry run, nothing written: " if self.dry_run else ""
        return (f"{head}{self.tagged} photos with keywords ({keywords or 'none'}); "
                f"sidecars: {counts}, {self.failed} failed")


def _check_keyword(what: str, keyword: str) -> None:
    from ...outputs.xmp import keyword_problem

    problem = keyword_problem(keyword)
    if problem:
        raise UsageError(f"{what} {problem}, so it cannot be written as a keyword",
                         hint="put a spelling without it first, as in -l \"AC-DC|AC/DC\"")


def _limits(groups, min_prob, thresholds) -> dict[str, float]:
    """Each label (a group's first alternative) -> the probability it needs."""
    if not 0 <= min_prob <= 1:
        raise UsageError(f"--min-prob {min_prob:g} is outside [0, 1]", hint="give a probability such as --min-prob 0.5")
    limits = {g[0]: min_prob for g in groups}
    for given in thresholds:
        label, sep, value = given.rpartition("=")
        try:
            p = float(value)
        except ValueError:
            p = None
        if not sep or not label or p is None or not 0 <= p <= 1:
            raise UsageError(f"--threshold {given!r} is not LABEL=P with 0 <= P <= 1",
                             hint="write it like --threshold 猫=0.4")
        matches = [g[0] for g in groups if label in g]
        if not matches:
            raise UsageError(f"--threshold {given!r} names no label given",
                             hint="name a label (any of its alternatives) given with -l or --labels-file")
        for m in matches:
            limits[m] = p
    return limits
