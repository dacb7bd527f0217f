"""Zero-shot scoring from the command line, shared by `classify` and `tag`: the label options, label
groups ("cat|猫|gato"), templates, and the records of a run, in this process or through a server,
with the vectors of an --index where it holds them."""

from __future__ import annotations

import click

from ..errors import InputError
from .options import UsageError, get_model, open_kwargs

_LABEL_OPTIONS = (
    click.option("-l", "--label", "labels", multiple=True, metavar="LABEL",
                 help='A label, in any language (repeatable; kept in the order given). "cat|猫|gato" is one label '
                      'of synonyms, reported as its first; write a literal | as \\|.'),
    click.option("--labels-file", type=click.Path(dir_okay=False, allow_dash=True), metavar="FILE",
                 help="One label per line, as -l takes it (UTF-8; blank lines skipped); - reads stdin."),
    click.option("-t", "--template", "templates", multiple=True, metavar='"... {} ..."',
                 help="Text around each label, {} marks the label; several are averaged (prompt ensemble)."),
)


def label_options(f):
    """-l/--label, --labels-file and -t/--template, as classify and tag take them."""
    for option in reversed(_LABEL_OPTIONS):
        f = option(f)
    return f


def label_groups(labels, labels_file, templates, images, msgs) -> list[list[str]]:
    """The label groups of -l and --labels-file, each a list of synonyms whose first names it; the
    templates checked, and a warning for a label given twice."""
    groups = collect_labels(labels, labels_file, images)
    check_templates(templates)
    warn_duplicates([g[0] for g in groups], msgs)
    return groups


def scored_records(sources, groups, templates, top_k, msgs, *, index_dir, batch_size, input_timeout, server,
                   token_file, model, device, precision, exact_decode, revision, max_pixels, url_timeout,
                   url_max_mb, where=None):
    """(records in input order, the --index store or None) for the sources against the label
    groups: classify's records ({"image", "scores": [...]} or {"image", "error"}), from the model
    of the options, in this process or through `altclip serve` alike. The caller closes the store.
    where: a search.filters.SearchFilter over the --index index's facts: the record of a source it
    leaves out is None (the model never sees it)."""
    model_ = get_model(server, token_file, model, device, precision, msgs, exact_decode=exact_decode,
                       revision=revision, max_pixels=max_pixels, scores=True, url_timeout=url_timeout,
                       url_max_mb=url_max_mb, input_timeout=input_timeout)
    opener_kw = open_kwargs(max_pixels, url_timeout, url_max_mb, model_.draft_min_side)
    keep, given = None, len(sources)
    if where is not None and where.active:
        keep = _kept_by_filter(model_, sources, index_dir, where, msgs)
        sources = [sources[i] for i in keep]
    records, store = _records(model_, sources, groups, list(templates) or None, top_k, index_dir, msgs, batch_size,
                              input_timeout, opener_kw)
    return (records if keep is None else _spread(records, keep, given)), store


def _kept_by_filter(model, sources, index_dir, where, msgs) -> list[int]:
    """The positions of the sources `where` keeps by the facts the --index index holds of them,
    the others counted on stderr."""
    from ..search.filters import missing_lines
    from ..search.reuse import filtered_positions
    from ..search.run import index_folder
    from ..search.store import INDEX_DB, IndexStore, IndexStoreError

    folder = index_folder(index_dir, model.weights_id)
    if not (folder / INDEX_DB).exists():
        msgs.warn(f"--index: there is no index in {folder}: the filters keep no image "
                  f"(`altclip index` the images first)")
        return []
    try:
        with IndexStore.open(folder) as store:  # any model's index holds the same facts
            kept, counts = filtered_positions(store, sources, where)
    except IndexStoreError as exc:
        raise IndexStoreError(f"--index: {exc.message}", hint=exc.hint) from None
    msgs.note(f"{counts['kept']:,} of {counts['total']:,} image{'' if counts['total'] == 1 else 's'} "
              f"{'matches' if counts['kept'] == 1 else 'match'} the filters")
    if counts["not_indexed"]:
        n = counts["not_indexed"]
        msgs.note(f"{n:,} image{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} not in the index as "
                  f"{'it is' if n == 1 else 'they are'} now (new, changed, or not a local file): left out by the "
                  "filters (`altclip index` them first)")
    for line in missing_lines(counts["missing"], counts["unread"]):
        msgs.note(line)
    return kept


def _spread(records, keep: list[int], length: int):
    """The records of the kept positions in place, None at the others (up to `length`)."""
    records = iter(records)
    kept = set(keep)
    for i in range(length):
        yield next(records) if i in kept else None


def _records(model, sources, groups, templates, top_k, index_dir, msgs, batch_size, input_timeout, opener_kw):
    """(classify's records in input order, the --index store or None), scored from the model's
    vectors (and the index's, with --index), in this process or through a server alike (model:
    a runtime.embedder.Embedder). groups: each label's synonyms."""
    from ..inputs.sources import display, open_source, reason
    from ..outputs.records import error_record, score_record

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
        from ..search.reuse import IndexAdditions, indexed_rows, open_for_reuse

        store = open_for_reuse(index_dir, model, warn=msgs.warn)
        hits = indexed_rows(store, sources) if store is not None else {}
        additions = IndexAdditions.for_run(index_dir, model, store, warn=msgs.warn)
    rest = [s for i, s in enumerate(sources) if i not in hits] if hits else sources
    results = model.stream_images(rest, open_fn=open_fn, batch_size=batch_size,
                                  input_timeout=input_timeout) if rest else iter(())
    if additions is not None and rest:
        results = additions.taking(rest, results)
    if hits:
        from ..search.reuse import merged_results

        results = merged_results(sources, hits, store, results)
    return results, store


def collect_labels(given, labels_file, images) -> list[list[str]]:
    """-l labels then the file's, in order, each split into its synonyms; an empty label or
    alternative is a usage error naming it."""
    labels = list(given)
    for i, label in enumerate(labels, start=1):
        if not label.strip():
            raise UsageError(f"label {i} (-l {label!r}) is empty", hint="give every -l a non-empty label")
    if labels_file is not None:
        from ..inputs.textfile import read_text_file
        from .options import stdin_binary

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
    return [synonyms(i, label) for i, label in enumerate(labels, start=1)]


def synonyms(i: int, label: str) -> list[str]:
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


def check_templates(templates) -> None:
    for template in templates:
        if "{}" not in template:
            raise UsageError(f"template {template!r} has no {{}} where the label goes",
                             hint='write it like --template "a photo of {}."')


def warn_duplicates(labels, msgs) -> None:  # labels: the names the records use
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    for label, count in seen.items():
        if count > 1:
            msgs.warn(f"label {label!r} is given {count} times; each is scored as its own row, "
                      "so they share the probability")
