"""classify over a folder of photos: synonym groups, --min-prob (unsure), the summary table on a
terminal, and --sort-into through the command (links, copies, moves, clashes, re-runs; the sorter
itself in test_sortinto.py)."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from oracle import Reference, require
from test_cli import invoke, jsonl, write_image


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """cwd with a.png, b.png, c.png (random pixels) and bad.jpg (text)."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("a.png", "b.png", "c.png"), start=1):
        write_image(tmp_path / name, i)
    (tmp_path / "bad.jpg").write_text("not an image")
    return tmp_path


# --- synonym groups ----------------------------------------------------------------------------------

GROUPS = [["cat", "猫", "gato", "кошка"], ["dog", "犬"], ["a|b"]]


@pytest.mark.parametrize("templates", [[], ["a photo of {}.", "{}, in a picture"]])
def test_group_probs_are_a_softmax_over_the_reference_group_means(photos, model, templates):
    require("transformers")
    ref = Reference(model)
    args = ["-l", "cat|猫|gato|кошка", "-l", "dog|犬", "-l", r"a\|b"]
    result = invoke("classify", "a.png", "b.png", *args, *[x for t in templates for x in ("-t", t)], "-m", model)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)

    rows = []
    for group in GROUPS:  # every alternative in every template, normalised, averaged, normalised again
        texts = [t.replace("{}", a) for a in group for t in templates] if templates else group
        mean = ref.text_embeddings(texts).mean(axis=0)
        rows.append(mean / np.linalg.norm(mean))
    images = ref.image_embeddings([photos / "a.png", photos / "b.png"])
    scale = float(ref.model.logit_scale.detach().exp())
    logits = images @ np.stack(rows).T * scale
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)

    names = [g[0] for g in GROUPS]
    for record, p, lg in zip(records, probs, logits):
        assert sorted(s["label"] for s in record["scores"]) == sorted(names)
        assert record["top"] == names[int(np.argmax(p))]
        for s in record["scores"]:
            j = names.index(s["label"])
            assert s["prob"] == pytest.approx(p[j], rel=1e-5, abs=1e-6)
            assert s["logit"] == pytest.approx(lg[j], rel=1e-5, abs=1e-5)


def test_labels_file_takes_groups(photos, model):
    (photos / "labels.txt").write_text("cat|猫\n\ndog\n", encoding="utf-8")
    a = invoke("classify", "a.png", "--labels-file", "labels.txt", "-m", model)
    b = invoke("classify", "a.png", "-l", "cat|猫", "-l", "dog", "-m", model)
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout
    assert sorted(s["label"] for s in jsonl(a.stdout)[0]["scores"]) == ["cat", "dog"]


@pytest.mark.parametrize("args, message", [
    (["-l", "cat|"], "error: label 1 ('cat|') has an empty alternative"),
    (["-l", "dog", "-l", "|"], "error: label 2 ('|') is only |"),
    (["-l", "a|| b"], "error: label 1 ('a|| b') has an empty alternative"),
    (["-l", "x", "--min-prob", "0"], "error: --min-prob 0 is outside (0, 1]"),
    (["-l", "x", "--min-prob", "1.5"], "error: --min-prob 1.5 is outside (0, 1]"),
    (["-l", "x", "--min-prob", "-0.1"], "error: --min-prob -0.1 is outside (0, 1]"),
])
def test_bad_groups_and_min_prob_are_usage_errors(photos, tmp_path, args, message):
    # The model folder does not exist: the error comes before any model work.
    result = invoke("classify", "a.png", *args, "-m", tmp_path / "no-model")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == message
    assert lines[1].startswith("hint: ") and len(lines) == 2


# --- --min-prob ----------------------------------------------------------------------------------------

LABEL_ARGS = ["-l", "cat", "-l", "dog", "-l", "car"]


def _best(model):
    """Each photo's best probability, from a run without --min-prob."""
    result = invoke("classify", "a.png", "b.png", "c.png", *LABEL_ARGS, "-m", model)
    return {r["image"]: (r["top"], r["scores"][0]["prob"]) for r in jsonl(result.stdout)}


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_min_prob_json_and_jsonl(photos, model, fmt):
    best = _best(model)
    cut = sorted(p for _, p in best.values())[1]  # the lowest is unsure, the other two are not
    result = invoke("classify", "a.png", "bad.jpg", "b.png", "c.png", *LABEL_ARGS, "--min-prob", cut,
                    "-f", fmt, "-m", model)
    assert result.exit_code == 3
    records = json.loads(result.stdout) if fmt == "json" else jsonl(result.stdout)
    assert records[1] == {"image": "bad.jpg", "error": "not an image, or in a format Pillow cannot read"}
    for r in records[:1] + records[2:]:
        assert list(r) == ["image", "top", "scores"] and len(r["scores"]) == 3
        label, prob = best[r["image"]]
        assert r["top"] == (label if prob >= cut else None)
    assert sum(r.get("top", 0) is None for r in records) == 1


def test_min_prob_csv(photos, model):
    best = _best(model)
    cut = sorted(p for _, p in best.values())[1]
    result = invoke("classify", "a.png", "b.png", "c.png", "bad.jpg", *LABEL_ARGS, "--min-prob", cut,
                    "-f", "csv", "-k", "1", "-m", model)
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["image", "rank", "label", "prob", "logit", "error", "top"]
    for row in rows[1:4]:
        label, prob = best[row[0]]
        assert row[6] == (label if prob >= cut else "")
    assert rows[4][0] == "bad.jpg" and rows[4][6] == ""


def test_min_prob_one_keeps_scores_and_marks_the_table(photos, model):
    result = invoke("classify", "a.png", *LABEL_ARGS, "--min-prob", "1", "-f", "table", "-m", model)
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0].split() == ["a.png", "(unsure)"]
    result = invoke("classify", "a.png", *LABEL_ARGS, "--min-prob", "1", "-m", model)
    record = jsonl(result.stdout)[0]
    assert record["top"] is None and len(record["scores"]) == 3


# --- the summary table ---------------------------------------------------------------------------------

@pytest.fixture
def terminal(monkeypatch):
    from altclip_cli.cli import terminal

    monkeypatch.setattr(terminal, "isatty", lambda stream: True)


def _many(folder, n):
    folder.mkdir()
    for i in range(n):
        write_image(folder / f"p{i:03d}.png", 100 + i, size=(8, 8))
    return sorted(str(p.relative_to(folder.parent)) for p in folder.iterdir())


def _counts(lines):
    """The count table at the end: {label: n}."""
    start = max(i for i, line in enumerate(lines) if line.split() == ["label", "images"])
    return {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1]) for line in lines[start + 2:] if line.strip()}


@pytest.mark.parametrize("n", [1, 3])
def test_a_few_images_keep_the_per_image_view(photos, model, terminal, n):
    names = ["a.png", "b.png", "c.png"][:n]
    result = invoke("classify", *names, *LABEL_ARGS, "-m", model)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    titles = [line.strip() for line in lines if line.strip() in names]
    assert titles == names
    assert lines[1].split() == ["label", "prob"] and "█" in result.stdout
    assert "images" not in result.stdout


def test_200_images_give_one_summary_table_and_counts(photos, model, terminal):
    names = _many(photos / "many", 200)
    result = invoke("classify", "many", "bad.jpg", "-l", "cat|猫", "-l", "dog", "-l", "car", "-m", model)
    assert result.exit_code == 3
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["image", "best", "prob", "runner-up"]
    rows = [line.split() for line in lines[2:202]]
    assert [r[0] for r in rows] == names
    jl = {r["image"]: r for r in jsonl(invoke("classify", "many", *["-l", "cat|猫", "-l", "dog", "-l", "car"],
                                               "-f", "jsonl", "-m", model).stdout)}
    for r in rows:
        want = jl[r[0]]["scores"]
        assert r[1:] == [want[0]["label"], f"{100 * want[0]['prob']:.1f}%", want[1]["label"],
                         f"{100 * want[1]['prob']:.1f}%"]
    counts = _counts(lines)
    assert sum(counts[label] for label in ("cat", "dog", "car")) == 200 and counts["(failed)"] == 1
    for label in ("cat", "dog", "car"):
        assert counts[label] == sum(r["top"] == label for r in jl.values())
    assert "bad.jpg" not in result.stdout and "error: bad.jpg" in result.stderr


def test_summary_with_top_k_and_unsure(photos, model, terminal):
    _many(photos / "many", 5)
    result = invoke("classify", "many", *LABEL_ARGS, "-k", "3", "--min-prob", "1", "-m", model)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["image", "best", "prob", "2nd", "3rd"]
    assert all(line.split()[1] == "(unsure)" for line in lines[2:7])
    assert _counts(lines) == {"cat": 0, "dog": 0, "car": 0, "(unsure)": 5}


# --- --sort-into ---------------------------------------------------------------------------------------

def _tops(model, *names):
    result = invoke("classify", *names, *LABEL_ARGS, "-f", "jsonl", "-m", model)
    return {r["image"]: r.get("top") for r in jsonl(result.stdout)}


def _tree(root):
    return sorted((str(p.relative_to(root)), p.is_symlink()) for p in root.rglob("*") if not p.is_dir())


def test_sort_into_links_then_a_second_run_changes_nothing(photos, model):
    tops = _tops(model, "a.png", "b.png", "c.png")
    result = invoke("classify", "a.png", "b.png", "c.png", "bad.jpg", *LABEL_ARGS, "--sort-into", "out", "-m", model)
    assert result.exit_code == 3
    out = photos / "out"
    for name, top in tops.items():
        link = out / top / name
        assert link.is_symlink() and link.resolve() == (photos / name).resolve()
    assert (photos / "bad.jpg").exists() and not list(out.rglob("bad.jpg"))
    before = _tree(out)
    again = invoke("classify", "a.png", "b.png", "c.png", "bad.jpg", *LABEL_ARGS, "--sort-into", "out", "-m", model)
    assert again.exit_code == 3 and _tree(out) == before


def test_sort_into_copy_with_a_name_clash_and_unsure(photos, model):
    tops = _tops(model, "a.png")
    (photos / "out" / "_unsure").mkdir(parents=True)
    (photos / "out" / "_unsure" / "a.png").write_bytes(b"another photo")
    args = ("a.png", *LABEL_ARGS, "--min-prob", "1", "--sort-into", "out", "--copy", "-m", model)
    assert invoke("classify", *args).exit_code == 0
    assert (photos / "out" / "_unsure" / "a.png").read_bytes() == b"another photo"  # never overwritten
    copy = photos / "out" / "_unsure" / "a-1.png"
    assert not copy.is_symlink() and copy.read_bytes() == (photos / "a.png").read_bytes()
    before = _tree(photos / "out")
    assert invoke("classify", *args).exit_code == 0 and _tree(photos / "out") == before
    assert tops["a.png"] is not None


def test_sort_into_move_and_dry_run(photos, model):
    tops = _tops(model, "a.png", "b.png", "c.png")
    data = {n: (photos / n).read_bytes() for n in tops}
    plan = invoke("classify", ".", *LABEL_ARGS, "--sort-into", "out", "--move", "--dry-run", "-m", model)
    assert plan.exit_code == 3
    assert not (photos / "out").exists() and all((photos / n).exists() for n in tops)
    for name, top in tops.items():
        assert f"move ./{name} -> out/{top}/{name}" in plan.stderr
    moved = invoke("classify", ".", *LABEL_ARGS, "--sort-into", "out", "--move", "-m", model)
    assert moved.exit_code == 3
    for name, top in tops.items():
        assert not (photos / name).exists() and (photos / "out" / top / name).read_bytes() == data[name]
    assert (photos / "bad.jpg").exists()


@pytest.mark.parametrize("args", [["--min-prob", "0.5", "--copy"], ["--move"], ["--dry-run"]])
def test_sort_options_need_sort_into(photos, tmp_path, args):
    result = invoke("classify", "a.png", "-l", "x", *args, "-m", tmp_path / "no-model")
    if args[0] == "--min-prob":
        args = args[2:]
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == f"error: {args[0]} needs --sort-into DIR"


def test_sort_into_folder_that_cannot_be_created(photos, tmp_path):
    (photos / "file").write_text("x")
    result = invoke("classify", "a.png", "-l", "x", "--sort-into", "file/sub", "-m", tmp_path / "no-model")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: --sort-into file/sub: cannot create it") and lines[1].startswith("hint: ")
