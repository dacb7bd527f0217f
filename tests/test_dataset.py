"""`altclip embed -o DIR/` (a dataset of parts), --shard I/N, `altclip merge` and read_dataset: the
parts joined are bit for bit one run's output, a part is complete or absent whatever kills its
writer, --resume redoes only what is missing, and writers that disagree are refused."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from altclip_cli.outputs.manifest import check_pair
from embedhooks import interrupted_after
from test_cli import SAFE_ENV, invoke, write_image

BASE = ["-b", "4", "--precision", "fp32"]


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """cwd with imgs/: 30 images, two of them not images (one at the end of a part of 8, where a
    batch counted in good images would start the next part off its boundary)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        write_image(folder / f"p{i:02d}.png", 100 + i, size=(40 + i, 32))
    (folder / "p07.png").write_text("not an image")
    (folder / "p18.png").write_text("not an image")
    return folder


def _single(model, *extra, inputs=("--image", "imgs")):
    result = invoke("embed", *inputs, "-o", "all.npy", "-m", model, *BASE, *extra)
    assert result.exit_code in (0, 3), result.stderr
    return result


def _assert_merge_equals_single(folder="ds", out="merged.npy"):
    result = invoke("merge", folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    merged = Path(out)
    assert merged.read_bytes() == Path("all.npy").read_bytes()
    assert merged.with_suffix(".jsonl").read_bytes() == Path("all.jsonl").read_bytes()
    ours, single = (json.loads(Path(p).read_text()) for p in (merged.with_suffix(".manifest.json"), "all.manifest.json"))
    for m in (ours, single):
        m["npy"].pop("name"), m["jsonl"].pop("name")
    assert ours == single  # same settings, rows, inputs digest, sha256s
    assert check_pair(merged)[0] == []
    return result


def test_three_shards_then_merge_equal_one_run_bit_for_bit(photos, model):
    _single(model)
    codes = []
    for shard in ("0/3", "1/3", "2/3"):
        result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8",
                        "--shard", shard)
        codes.append(result.exit_code)
    assert codes == [3, 0, 3]  # p07 is in part 0 (shard 0), p18 in part 2 (shard 2)
    assert "1 of 8 inputs failed" in invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE,
                                            "--shard", "2/3", "--resume").stderr
    names = sorted(os.listdir("ds"))
    assert names == ["manifest.json"] + [f"part-{p:05d}{s}" for p in range(4)
                                         for s in (".done", ".jsonl", ".manifest.json", ".npy")]
    manifest = json.loads(Path("ds/manifest.json").read_text())
    assert (manifest["inputs"], manifest["parts"], manifest["part_size"], manifest["dim"]) == (30, 4, 8, 16)
    assert manifest["settings"]["precision"] == "fp32" and manifest["altclip"]
    # Each part is a pair of its own, rows numbered within it; part 0's 7 rows for 8 inputs.
    assert check_pair(Path("ds/part-00000.npy"))[0] == []
    part0 = [json.loads(line) for line in Path("ds/part-00000.jsonl").read_text().splitlines()]
    assert [r["row"] for r in part0] == [0, 1, 2, 3, 4, 5, 6, None]
    assert np.load("ds/part-00003.npy").shape == (6, 16)
    _assert_merge_equals_single()


def test_texts_into_a_dataset_equal_one_run(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    Path("t.txt").write_text("".join(f"caption {i} " + "word " * (i % 7) + "\n" for i in range(45)))
    _single(model, inputs=("--text", "t.txt"))
    result = invoke("embed", "--text", "t.txt", "-o", "ds/", "-m", model, *BASE, "--part-size", "12")
    assert result.exit_code == 0, result.stderr
    assert "ds is complete (4 parts, 45 inputs)" in result.stderr
    _assert_merge_equals_single()


def test_read_dataset_maps_the_parts_as_one_array(photos, model):
    import altclip_cli

    _single(model)
    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8").exit_code == 3
    data = altclip_cli.read_dataset("ds")
    whole = np.load("all.npy")
    assert data.vectors.shape == whole.shape == (28, 16) and len(data.vectors.parts) == 4
    assert isinstance(data.vectors.parts[0], np.memmap)
    np.testing.assert_array_equal(np.asarray(data.vectors), whole)
    np.testing.assert_array_equal(data.vectors[5:17], whole[5:17])
    np.testing.assert_array_equal(data.vectors[-1], whole[-1])
    assert list(data.records) == [json.loads(line) for line in Path("all.jsonl").read_text().splitlines()]
    assert list(data.records)[7] == {"row": None, "image": "imgs/p07.png", "error": list(data.records)[7]["error"]}
    assert data.manifest["inputs"] == len(data) == 30


def test_merge_and_read_dataset_refuse_missing_parts_and_name_them(photos, model):
    import altclip_cli
    from altclip_cli.errors import AltclipError

    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "4",
                  "--shard", "1/4").exit_code == 3  # part 1 holds p07
    result = invoke("merge", "ds", "-o", "m.npy")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: cannot merge ds: 6 of 8 parts are missing (part-00000, part-00002, part-00003, part-00004, "
        "part-00006, part-00007)",
        "hint: run the embed command (or the shard tasks that own them) again with --resume"]
    assert not Path("m.npy").exists()
    with pytest.raises(AltclipError, match="6 of 8 parts are missing"):
        altclip_cli.read_dataset("ds")
    assert invoke("merge", "imgs", "-o", "m.npy").stderr.startswith("error: cannot merge imgs: it is not an altclip dataset")


def test_merge_refuses_a_part_changed_after_it_was_written(photos, model):
    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8").exit_code == 3
    array = np.load("ds/part-00001.npy")
    array[0, 0] += 1
    with open("ds/part-00001.npy", "r+b") as f:  # same size: only the sha256 tells
        f.seek(128)
        f.write(array.tobytes())
    result = invoke("merge", "ds", "-o", "m.npy")
    assert result.exit_code == 1
    assert "part-00001.npy is not the file its part's .done record describes" in result.stderr
    assert not Path("m.npy").exists() and not Path("m.npy.part").exists()


# --- a part is complete or absent ---------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    from altclip_cli.cli import main
    from altclip_cli.outputs.embedfile import EmbeddingOutput

    real_add = EmbeddingOutput.add
    def add(self, items, array):
        real_add(self, items, array)
        if self.path.name == "part-00002.npy" and self.inputs_done >= 4:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of part 2
    EmbeddingOutput.add = add
    main(sys.argv[1:])
""")


def test_a_part_killed_mid_write_is_absent_and_resume_redoes_only_it(photos, model):
    _single(model)
    args = ["embed", "--image", "imgs", "-o", "ds/", "-m", str(model), *BASE, "--part-size", "8"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **SAFE_ENV})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p for p in range(4) if Path(f"ds/part-{p:05d}.done").exists()] == [0, 1]
    assert not Path("ds/part-00002.npy").exists() and not Path("ds/part-00002.jsonl").exists()
    staging = [p for p in os.listdir("ds") if p.startswith(".staging-")]
    assert len(staging) == 1  # the killed writer's, with its half-written part
    assert sorted(os.listdir(Path("ds") / staging[0])) == ["part-00002.jsonl.part", "part-00002.npy.part"]
    done_before = {p: os.stat(f"ds/part-0000{p}.npy").st_ino for p in (0, 1)}

    result = invoke(*args, "--resume")
    assert result.exit_code == 3, result.stderr
    assert "resuming: 2 of 4 parts are already complete" in result.stderr
    assert "wrote 2 parts to ds" in result.stderr
    assert "2 of 30 inputs failed" in result.stderr  # the earlier parts' failures counted too
    assert {p: os.stat(f"ds/part-0000{p}.npy").st_ino for p in (0, 1)} == done_before  # not redone
    assert not [p for p in os.listdir("ds") if p.startswith(".")]  # the dead writer's staging removed
    _assert_merge_equals_single()


def test_ctrl_c_during_a_part_leaves_it_absent(photos, model):
    args = ["embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8"]
    with interrupted_after(4):  # half-way through the first part
        result = invoke(*args)
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-2:] == [
        "error: interrupted after 0 of 4 parts; ds keeps the parts done",
        "hint: run the same command with --resume to do the rest"]
    assert os.listdir("ds") == ["manifest.json"]  # no part, no staging folder
    assert invoke(*args, "--resume").exit_code == 3


def test_resume_on_a_complete_dataset_writes_nothing(photos, model):
    args = ["embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8"]
    assert invoke(*args).exit_code == 3
    before = {p: os.stat(Path("ds") / p).st_mtime_ns for p in os.listdir("ds")}
    result = invoke(*args, "--resume")
    assert result.exit_code == 3  # still says that 2 inputs failed
    assert "wrote 0 parts to ds (4 of 4 parts of this run complete, 28 rows)" in result.stderr
    assert {p: os.stat(Path("ds") / p).st_mtime_ns for p in os.listdir("ds")} == before


# --- writers that disagree ----------------------------------------------------------------------------------

def test_resume_with_other_settings_is_refused_as_for_a_file(photos, model):
    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8",
                  "--shard", "0/2").exit_code == 3
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, "-b", "4", "--precision", "bf16",
                    "--part-size", "8", "--shard", "1/2", "--resume")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: cannot resume: the earlier run used precision 'fp32', this one 'bf16'",
        "hint: give the earlier run's --precision to continue it, or run without --resume to start again"]
    other = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--no-normalize",
                   "--part-size", "8", "--shard", "1/2")
    assert other.exit_code == 1
    assert other.stderr.splitlines() == [
        "error: ds/manifest.json was written for other settings: the earlier run used normalize True, this one False",
        "hint: give the earlier run's --no-normalize to continue it, or write the dataset to another folder"]
    assert not Path("ds/part-00001.done").exists()


def test_shards_with_other_inputs_or_part_size_are_refused(photos, model):
    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "8",
                  "--shard", "0/2").exit_code == 3
    fewer = invoke("embed", "--image", *sorted(str(p) for p in photos.iterdir())[:-1], "-o", "ds/", "-m", model,
                   *BASE, "--part-size", "8", "--shard", "1/2")
    assert fewer.exit_code == 1
    assert "error: ds/manifest.json is for other inputs (30 inputs; this run has 29)" in fewer.stderr
    reordered = invoke("embed", "--image", *sorted((str(p) for p in photos.iterdir()), reverse=True), "-o", "ds/",
                       "-m", model, *BASE, "--part-size", "8", "--shard", "1/2")
    assert "the same number but other names or another order" in reordered.stderr
    size = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "12",
                  "--shard", "1/2")
    assert size.exit_code == 1
    assert size.stderr.splitlines() == ["error: ds/manifest.json has part_size 8, this run 12",
                                        "hint: give the same --part-size in every task, or use another folder"]
    # Without --part-size a later task takes the dataset's.
    assert invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--shard", "1/2").exit_code == 0
    assert invoke("merge", "ds", "-o", "m.npy").exit_code == 0


def _race(folder, i, queue):
    from altclip_cli.outputs.dataset import ensure_manifest, make_manifest

    settings = {"kind": "text", "model": "m", "weights": "w", "precision": "fp32", "device_type": "cpu",
                "dtype": "float32", "normalize": True, "exact_decode": None}
    manifest = make_manifest(settings=settings, dim=4, names=[f"t{j}" for j in range(10)], part_size=4,
                             extra={"model": f"path-{i}", "altclip": "0"})
    queue.put(ensure_manifest(Path(folder), manifest, resume=False)["model"])


def test_the_manifest_is_created_once_when_tasks_race(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "ds", i, queue)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    winners = {queue.get(timeout=5) for _ in procs}
    assert len(winners) == 1  # every task read back the one manifest that was linked first
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["model"] in winners
    assert os.listdir(tmp_path / "ds") == ["manifest.json"]  # no temporary files left


# --- the batch rule and the command line --------------------------------------------------------------------

def test_a_part_size_that_splits_a_batch_is_refused(photos, model):
    result = invoke("embed", "--image", "imgs", "-o", "ds/", "-m", model, *BASE, "--part-size", "10")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: --part-size 10 is not a multiple of the batch (4 images): the parts would be batched unlike one "
        "run over all inputs, and their rows would differ from it in the last bits",
        "hint: use --part-size 12 (or a -b/--batch-size that divides 10)"]
    assert not Path("ds").exists()


@pytest.mark.parametrize("args, message", [
    (["-o", "x.npy", "--shard", "0/2"], "error: --shard needs -o DIR/ (a dataset folder)"),
    (["--part-size", "8"], "error: --part-size needs -o DIR/ (a dataset folder)"),
    (["-o", "ds/", "--workers", "2"], "error: --workers needs --ray"),
    (["-o", "ds/", "--shard", "0/2", "--ray=auto"], "error: give either --ray or --shard, not both"),
    (["-o", "ds/", "--shard", "2/2"], "error: Invalid value for '--shard': '2/2': I must be 0 to N-1"),
    (["-o", "ds/", "--shard", "x"], "error: Invalid value for '--shard': 'x' is not I/N"),
])
def test_dataset_options_misused_are_usage_errors(photos, model, args, message):
    result = invoke("embed", "--image", "imgs", "-m", model, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message)


def test_a_folder_with_other_files_is_not_made_a_dataset(photos, model):
    result = invoke("embed", "--image", "imgs", "-o", "imgs/", "-m", model, *BASE)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: imgs is not empty and holds no altclip dataset (it has 'p00.png')",
        "hint: name an empty or new folder for the dataset"]


def test_an_existing_empty_folder_without_a_slash_is_a_dataset(photos, model):
    Path("out").mkdir()
    assert invoke("embed", "--image", "imgs", "-o", "out", "-m", model, *BASE, "--part-size", "16").exit_code == 3
    assert json.loads(Path("out/manifest.json").read_text())["parts"] == 2


def test_a_resumed_single_file_with_failures_is_bit_equal(photos, model):
    """With batches as fixed spans of inputs, a checkpoint still falls on a batch's end, and a
    resumed run with a failure before it batches the rest as the uninterrupted run does."""
    _single(model)
    reference = Path("all.npy").read_bytes()
    with interrupted_after(9):
        assert invoke("embed", "--image", "imgs", "-o", "all.npy", "-m", model, *BASE,
                      "--checkpoint-every", "1").exit_code == 130
    assert invoke("embed", "--image", "imgs", "-o", "all.npy", "-m", model, *BASE, "--resume").exit_code == 3
    assert Path("all.npy").read_bytes() == reference
