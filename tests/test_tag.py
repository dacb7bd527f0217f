"""`altclip tag`: keywords chosen as classify scores them, written into XMP sidecars (both names)
that independent readers (exiftool, exiv2) read back; existing sidecar content kept; re-runs
that change nothing; altclip's keywords replaced and removed alone; malformed sidecars, read-only
folders and undecodable photos named; escaping; kill -9 in the middle of a run."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from oracle import in_ci
from test_cli import invoke, jsonl, write_image
from test_index import FP32, index, loads, tower  # noqa: F401 (loads, tower: fixtures)

from altclip_cli.outputs.xmp import DC, DIGIKAM, LR, RDF, Packet

XMP = "http://ns.adobe.com/xap/1.0/"


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """cwd with a.png, b.jpg, c.png (random pixels)."""
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(("a.png", "b.jpg", "c.png"), start=1):
        write_image(tmp_path / name, i)
    return tmp_path


def tag(*args, model, input=None):
    return invoke("tag", *args, "-m", model, input=input)


def classify_scores(model, *args) -> dict[str, list[dict]]:
    """classify's scores per image for the same inputs: the oracle of keyword selection."""
    result = invoke("classify", *args, "-m", model)
    assert result.exit_code in (0, 3), result.stderr
    return {r["image"]: r["scores"] for r in jsonl(result.stdout) if "scores" in r}


def keywords_in(path: Path) -> dict[str, list[str]]:
    """The three keyword fields of a sidecar, read with xml.etree alone."""
    root = ET.parse(path).getroot()
    out = {}
    for key, prop in (("subject", f"{{{DC}}}subject"), ("hier", f"{{{LR}}}hierarchicalSubject"),
                      ("tags", f"{{{DIGIKAM}}}TagsList")):
        out[key] = [li.text for el in root.iter(prop) for li in el.iter(f"{{{RDF}}}li")]
    return out


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


LABELS = ["-l", "猫|cat", "-l", "plage|beach", "-l", "قطة", "-l", "café"]


# --- which keywords -------------------------------------------------------------------------------

@pytest.mark.parametrize("min_prob,top", [(0.0, 2), (0.0, 4), (0.26, 3), (1.0, 3)])
def test_keywords_are_the_labels_classify_scores_at_least_the_threshold(photos, model, min_prob, top):
    scores = classify_scores(model, "a.png", "b.jpg", *LABELS)
    result = tag("a.png", "b.jpg", *LABELS, "--min-prob", min_prob, "--top", top, model=model)
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["image"] for r in records] == ["a.png", "b.jpg"]
    for r in records:
        want = [s["label"] for s in scores[r["image"]] if s["prob"] >= min_prob][:top]
        assert r["keywords"] == want
        assert r["sidecar"] == r["image"] + ".xmp" and r["changed"] is bool(want)
        if want:
            fields = keywords_in(photos / r["sidecar"])
            assert fields == {"subject": want, "hier": [f"altclip|{k}" for k in want],
                              "tags": [f"altclip/{k}" for k in want]}
        else:
            assert not (photos / r["sidecar"]).exists()  # a photo with no keyword gets no sidecar


def test_threshold_per_label_and_root(photos, model):
    scores = classify_scores(model, "a.png", *LABELS)["a.png"]
    low = scores[-1]["label"]  # the least likely label passes only by its own threshold
    alias = {"猫": "cat", "plage": "beach"}.get(low, low)
    result = tag("a.png", *LABELS, "--min-prob", 1, "--threshold", f"{alias}=0", "--root", "auto", model=model)
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout)[0]["keywords"] == [low]
    assert keywords_in(photos / "a.png.xmp")["hier"] == [f"auto|{low}"]


@pytest.mark.parametrize("args,message", [
    (["-l", "AC/DC"], "holds '/'"),
    (["-l", r"a\|b"], "holds '|'"),
    (["-l", "tab\there"], "control character"),
    (["-l", "cat", "--root", "a/b"], "--root"),
    (["-l", "cat", "--threshold", "dog=0.3"], "names no label"),
    (["-l", "cat", "--threshold", "cat=2"], "not LABEL=P"),
    (["-l", "cat", "--remove"], "--remove takes no labels"),
])
def test_labels_that_cannot_be_keywords_are_refused(photos, model, args, message):
    result = tag("a.png", *args, model=model)
    assert result.exit_code == 2 and message in result.stderr
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "b.jpg", "c.png"]


def test_markup_characters_are_escaped(photos, model):
    label = 'R&D <"lab">'
    result = tag("a.png", "-l", label, "--min-prob", 0, model=model)
    assert result.exit_code == 0, result.stderr
    raw = (photos / "a.png.xmp").read_text(encoding="utf-8")
    assert "R&amp;D &lt;" in raw
    assert keywords_in(photos / "a.png.xmp")["subject"] == [label]


def test_index_gives_the_same_keywords_without_the_image_tower(photos, model, tower):
    assert index(model, ".", "-b", "1").exit_code == 0
    args = [".", *LABELS, "--min-prob", 0, "--top", 2, *FP32, "-b", "1"]
    tower.clear()
    plain = tag(*args, "--dry-run", model=model)
    assert plain.exit_code == 0 and sum(tower) == 3
    tower.clear()
    indexed = tag(*args, "--index", "auto", model=model)
    assert indexed.exit_code == 0, indexed.stderr
    assert sum(tower) == 0
    assert [r["keywords"] for r in jsonl(indexed.stdout)] == [r["keywords"] for r in jsonl(plain.stdout)]


# --- sidecar names, the photo untouched -----------------------------------------------------------

def test_sidecar_names_and_the_photo_never_written(photos, model):
    os.chmod(photos / "a.png", 0o444)
    before = (photos / "a.png").read_bytes(), (photos / "a.png").stat().st_mtime_ns
    assert tag("a.png", "b.jpg", "-l", "cat", "--min-prob", 0, "--sidecar-name", "adobe", model=model).exit_code == 0
    assert (photos / "a.xmp").exists() and (photos / "b.xmp").exists() and not (photos / "a.png.xmp").exists()
    assert ((photos / "a.png").read_bytes(), (photos / "a.png").stat().st_mtime_ns) == before
    # an existing sidecar under either name is the one updated
    (photos / "c.png.xmp").write_bytes(Packet.parse(_USER_SIDECAR).serialise())
    result = tag("a.png", "c.png", "-l", "dog", "--min-prob", 0, model=model)
    assert [r["sidecar"] for r in jsonl(result.stdout)] == ["a.xmp", "c.png.xmp"]
    assert not (photos / "a.png.xmp").exists() and not (photos / "c.xmp").exists()
    assert keywords_in(photos / "a.xmp")["subject"] == ["dog"]


def test_one_adobe_sidecar_for_two_photos_is_written_once(photos, model):
    write_image(photos / "IMG_2.png", 6)
    write_image(photos / "IMG_2.jpg", 7)
    result = tag("IMG_2.png", "IMG_2.jpg", "-l", "cat", "--min-prob", 0, "--sidecar-name", "adobe", model=model)
    assert result.exit_code == 3
    assert [("error" in r) for r in jsonl(result.stdout)] == [False, True]
    assert "IMG_2.xmp is also IMG_2.png's sidecar" in result.stderr


def test_adobe_name_of_a_sibling_is_not_taken(photos, model):
    """IMG_1.xmp beside IMG_1.CR2 is the raw file's sidecar, not IMG_1.JPG's."""
    write_image(photos / "IMG_1.jpg", 4)
    (photos / "IMG_1.CR2").write_bytes(b"raw")
    (photos / "IMG_1.xmp").write_bytes(_USER_SIDECAR)
    result = tag("IMG_1.jpg", "-l", "cat", "--min-prob", 0, model=model)
    assert jsonl(result.stdout)[0]["sidecar"] == "IMG_1.jpg.xmp"
    assert (photos / "IMG_1.xmp").read_bytes() == _USER_SIDECAR


# --- existing content, re-runs, replacement, --remove ---------------------------------------------

_USER_SIDECAR = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <!-- kept: a comment -->
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:my="http://example.org/my-tool/1.0/"
    xmp:Rating="4"
    xmp:Label="Red"
    my:Thing="kept">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>Paris</rdf:li>
     <rdf:li>猫</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>Places|Paris</rdf:li>
     <rdf:li>Animals|猫</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <my:History>
    <rdf:Seq>
     <rdf:li my:op="crop" my:enabled="1"/>
    </rdf:Seq>
   </my:History>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>""".encode("utf-8")


def _user_facts(path: Path) -> dict:
    """What the user's sidecar holds besides altclip's keywords: properties and values."""
    root = ET.parse(path).getroot()
    desc = root.find(f".//{{{RDF}}}Description")
    hist = [(li.text, li.attrib) for li in root.iter(f"{{{RDF}}}li") if li.attrib]
    return {"rating": desc.get(f"{{{XMP}}}Rating"), "label": desc.get(f"{{{XMP}}}Label"),
            "mine": desc.get("{http://example.org/my-tool/1.0/}Thing"), "history": hist,
            "packet": path.read_bytes().startswith(_USER_SIDECAR[:60]) and path.read_bytes().rstrip().endswith(b'<?xpacket end="w"?>'),
            "comment": b"<!-- kept: a comment -->" in path.read_bytes(),
            "prefix": b'xmlns:my="http://example.org/my-tool/1.0/"' in path.read_bytes()}


def test_existing_content_is_kept_through_tag_retag_and_remove(photos, model):
    side = photos / "a.png.xmp"
    side.write_bytes(_USER_SIDECAR)
    facts = _user_facts(side)
    assert facts["rating"] == "4" and facts["history"]

    first = tag("a.png", "-l", "猫", "-l", "dog", "--min-prob", 0, "--top", 2, model=model)
    assert first.exit_code == 0, first.stderr
    got = keywords_in(side)
    kw = jsonl(first.stdout)[0]["keywords"]
    assert sorted(kw) == ["dog", "猫"]
    assert got["subject"] == ["Paris", "猫", "dog"]
    assert got["hier"] == ["Places|Paris", "Animals|猫", *[f"altclip|{k}" for k in kw]]
    assert got["tags"] == [f"altclip/{k}" for k in kw]
    assert _user_facts(side) == facts

    again = tag("a.png", "-l", "beach", "--min-prob", 0, model=model)  # other labels: altclip's replaced
    assert jsonl(again.stdout)[0]["changed"] is True
    got = keywords_in(side)
    assert got["subject"] == ["Paris", "猫", "beach"]  # 猫 stays: the user's Animals|猫 holds it
    assert got["hier"] == ["Places|Paris", "Animals|猫", "altclip|beach"]
    assert _user_facts(side) == facts

    removed = tag("a.png", "--remove", model=model)
    assert removed.exit_code == 0, removed.stderr
    assert keywords_in(side) == {"subject": ["Paris", "猫"], "hier": ["Places|Paris", "Animals|猫"], "tags": []}
    assert _user_facts(side) == facts


def test_an_identical_second_run_changes_no_file(photos, model):
    (photos / "b.jpg.xmp").write_bytes(_USER_SIDECAR)
    args = ["a.png", "b.jpg", "c.png", *LABELS, "--min-prob", 0, "--top", 2]
    assert tag(*args, model=model).exit_code == 0
    before = snapshot(photos)
    time.sleep(0.01)
    second = tag(*args, model=model)
    assert second.exit_code == 0, second.stderr
    assert [r["changed"] for r in jsonl(second.stdout)] == [False] * 3
    assert snapshot(photos) == before
    assert "0 created, 0 changed, 3 unchanged" in second.stderr


def test_keywords_in_another_order_are_not_a_change():
    """A photo manager that rewrote the lists in its own order: nothing to write."""
    from altclip_cli.outputs.xmp import NEW_PACKET

    packet = Packet.parse(NEW_PACKET)
    assert packet.set_owned("altclip", ["猫", "dog"])
    text = packet.serialise().decode()
    swapped = text.replace("猫<", "@@<").replace("dog<", "猫<").replace("@@<", "dog<")
    assert swapped != text
    again = Packet.parse(swapped.encode())
    assert again.set_owned("altclip", ["猫", "dog"]) is False
    assert again.serialise().decode() == swapped


_TWO_DESCRIPTIONS = b"""<?xml version="1.0" encoding="UTF-8"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
 <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="2"/>
 <rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <dc:subject><rdf:Bag><rdf:li>mine</rdf:li></rdf:Bag></dc:subject>
 </rdf:Description>
</rdf:RDF>
"""


def test_a_packet_without_xmpmeta_and_with_two_descriptions():
    packet = Packet.parse(_TWO_DESCRIPTIONS)
    assert packet.set_owned("altclip", ["猫"])
    out = packet.serialise()
    assert out.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<rdf:RDF')
    root = ET.fromstring(out)
    assert [li.text for li in root.iter(f"{{{RDF}}}li")].count("mine") == 1
    assert [li.text for el in root.iter(f"{{{DC}}}subject") for li in el.iter(f"{{{RDF}}}li")] == ["mine", "猫"]
    assert root.find(f"{{{RDF}}}Description").get(f"{{{XMP}}}Rating") == "2"
    again = Packet.parse(out)
    assert again.owned("altclip") == ["猫"] and again.set_owned("altclip", ["猫"]) is False
    assert again.set_owned("altclip", []) and Packet.parse(again.serialise()).owned("altclip") == []
    assert b"mine" in again.serialise()


def test_remove_deletes_a_sidecar_altclip_made_and_nothing_else(photos, model):
    (photos / "b.jpg.xmp").write_bytes(_USER_SIDECAR)
    assert tag("a.png", "b.jpg", "-l", "cat", "--min-prob", 0, model=model).exit_code == 0
    result = tag("a.png", "b.jpg", "c.png", "--remove", model=model)
    assert result.exit_code == 0, result.stderr
    assert [(r["image"], r["changed"]) for r in jsonl(result.stdout)] == [("a.png", True), ("b.jpg", True), ("c.png", False)]
    assert not (photos / "a.png.xmp").exists()
    assert keywords_in(photos / "b.jpg.xmp")["subject"] == ["Paris", "猫"]


def test_remove_loads_no_model(photos, model, loads):
    assert tag("a.png", "-l", "cat", "--min-prob", 0, model=model).exit_code == 0
    loads.clear()
    result = tag("a.png", "--remove", model=model)
    assert result.exit_code == 0 and loads == [] and not (photos / "a.png.xmp").exists()


def test_names_that_are_not_utf8(photos, model):
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(photos / "a.png", photos / name)
    result = tag(".", "-l", "cat", "--min-prob", 0, model=model)
    assert result.exit_code == 0, result.stderr
    assert keywords_in(photos / (name + ".xmp"))["subject"] == ["cat"]


def test_two_runs_at_once_leave_one_whole_set_each(tmp_path, model):
    folder = tmp_path / "two"
    folder.mkdir()
    for i in range(60):
        write_image(folder / f"p{i:02}.png", i, size=(8, 8))
        (folder / f"p{i:02}.png.xmp").write_bytes(_USER_SIDECAR)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [[sys.executable, "-m", "altclip_cli", "tag", str(folder), "-m", str(model), "--server", "off",
             "-l", word, "--min-prob", "0"] for word in ("dog", "bird")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for cmd in runs]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    for side in folder.glob("*.xmp"):
        kw = keywords_in(side)
        assert kw["tags"] in (["altclip/dog"], ["altclip/bird"])
        assert kw["hier"] == ["Places|Paris", "Animals|猫", kw["tags"][0].replace("/", "|")]
        assert _user_facts(side)["rating"] == "4"


def test_dry_run_writes_nothing(photos, model):
    (photos / "b.jpg.xmp").write_bytes(_USER_SIDECAR)
    before = snapshot(photos)
    result = tag("a.png", "b.jpg", "-l", "cat", "--min-prob", 0, "--dry-run", model=model)
    assert result.exit_code == 0, result.stderr
    assert [r["changed"] for r in jsonl(result.stdout)] == [True, True]
    assert "would create" in result.stderr and snapshot(photos) == before


# --- failures: named, exit 3, the rest go on ------------------------------------------------------

def test_malformed_sidecar_unreadable_photo_and_read_only_folder(photos, model, tmp_path):
    (photos / "b.jpg.xmp").write_bytes(b"<x:xmpmeta><rdf:RDF>")  # cut off
    (photos / "bad.jpg").write_text("not an image")
    locked = photos / "locked"
    locked.mkdir()
    write_image(locked / "d.png", 5)
    os.chmod(locked, 0o555)
    try:
        before = snapshot(photos), snapshot(locked)
        result = tag("a.png", "b.jpg", "bad.jpg", "locked/d.png", "c.png", "-l", "cat", "--min-prob", 0, model=model)
        after = snapshot(photos), snapshot(locked)
    finally:
        os.chmod(locked, 0o755)
    assert result.exit_code == 3
    records = jsonl(result.stdout)
    assert [("error" in r) for r in records] == [False, True, True, os.geteuid() != 0, False]
    assert "b.jpg.xmp is not well-formed XML" in result.stderr
    assert "bad.jpg" in result.stderr and (os.geteuid() == 0 or "locked/d.png" in result.stderr)
    assert after[0]["b.jpg.xmp"] == before[0]["b.jpg.xmp"]
    assert set(after[0]) - set(before[0]) == {"a.png.xmp", "c.png.xmp"}


def test_a_folder_the_system_refuses_to_write_is_named_and_the_rest_go_on(photos, model, monkeypatch):
    """The read-only folder of the test above, as root too (root writes anywhere): the system
    refuses the sidecar's temporary file there; that photo is named, exit 3, nothing is left in
    its folder, and the other photos get their sidecars."""
    import builtins

    import altclip_cli.outputs.sidecars as sidecars

    locked = photos / "locked"
    locked.mkdir()
    write_image(locked / "d.png", 5)
    real_open = builtins.open

    def refusing_open(path, *args, **kwargs):
        if Path(os.path.abspath(path)).parent == locked.resolve() and args and "w" in args[0]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sidecars, "open", refusing_open, raising=False)
    result = tag("a.png", "locked/d.png", "c.png", "-l", "cat", "--min-prob", 0, model=model)
    assert result.exit_code == 3, result.stderr
    assert [("error" in r) for r in jsonl(result.stdout)] == [False, True, False]
    assert "locked/d.png" in result.stderr and "ermission denied" in result.stderr
    assert sorted(p.name for p in locked.iterdir()) == ["d.png"]
    assert (photos / "a.png.xmp").is_file() and (photos / "c.png.xmp").is_file()


def test_a_sidecar_that_is_not_a_file_is_named_and_does_not_block(photos, model):
    os.mkfifo(photos / "a.png.xmp")
    (photos / "b.jpg.xmp").mkdir()
    result = tag("a.png", "b.jpg", "c.png", "-l", "cat", "--min-prob", 0, model=model)
    assert result.exit_code == 3
    assert "a.png.xmp is not a regular file" in result.stderr and "b.jpg.xmp is not a regular file" in result.stderr
    assert [("error" in r) for r in jsonl(result.stdout)] == [True, True, False]


# --- independent readers ----------------------------------------------------------------------------

def test_a_missing_reader_fails_in_ci(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="exiv2 is missing"):
        _need("exiv2")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        _need("exiv2")


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if in_ci():
            pytest.fail(f"CI={os.environ.get('CI')!r}: {tool} is missing, a failure, not a skip: "
                        "apt-get install libimage-exiftool-perl exiv2", pytrace=False)
        pytest.skip(f"{tool} is not installed")
    return path


WORDS = ["猫", "قطة", "café", "Ærøskøbing"]


@pytest.mark.parametrize("naming", ["full", "adobe"])
def test_exiftool_and_exiv2_read_the_keywords(photos, model, naming):
    exiftool, exiv2 = _need("exiftool"), _need("exiv2")
    (photos / "b.jpg.xmp" if naming == "full" else photos / "b.xmp").write_bytes(_USER_SIDECAR)
    args = [x for w in WORDS for x in ("-l", w)]
    result = tag("a.png", "b.jpg", *args, "--min-prob", 0, "--top", 4, "--sidecar-name", naming, model=model)
    assert result.exit_code == 0, result.stderr
    for r in jsonl(result.stdout):
        side = photos / r["sidecar"]
        assert side.name == (r["image"] + ".xmp" if naming == "full" else Path(r["image"]).stem + ".xmp")
        data = json.loads(subprocess.run([exiftool, "-j", "-charset", "UTF8", "-XMP:Subject",
                                          "-XMP:HierarchicalSubject", "-XMP:TagsList", "-XMP:Rating", str(side)],
                                         capture_output=True, check=True, text=True).stdout)[0]
        user = r["image"] == "b.jpg"
        as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
        assert sorted(map(str, as_list(data["Subject"]))) == sorted(set(WORDS) | ({"Paris"} if user else set()))
        assert sorted(as_list(data["HierarchicalSubject"])) == sorted(
            [f"altclip|{w}" for w in WORDS] + (["Places|Paris", "Animals|猫"] if user else []))
        assert sorted(as_list(data["TagsList"])) == sorted(f"altclip/{w}" for w in WORDS)
        assert data.get("Rating") == (4 if user else None)
        out = subprocess.run([exiv2, "-px", str(side)], capture_output=True, check=True).stdout.decode("utf-8")
        lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
        for key, words in (("Xmp.dc.subject", WORDS), ("Xmp.lr.hierarchicalSubject", [f"altclip|{w}" for w in WORDS]),
                           ("Xmp.digiKam.TagsList", [f"altclip/{w}" for w in WORDS])):
            assert all(w in lines[key] for w in words), (key, lines.get(key))
        assert ("Xmp.xmp.Rating" in lines) is user


# --- kill -9 ------------------------------------------------------------------------------------------

def test_kill_9_leaves_every_sidecar_whole_and_a_rerun_finishes(tmp_path, model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(500):
        write_image(folder / f"p{i:03}.png", i, size=(8, 8))
        if i % 3 == 0:
            (folder / f"p{i:03}.png.xmp").write_bytes(_USER_SIDECAR)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ALTCLIP_SERVER": "off"}
    cmd = [sys.executable, "-m", "altclip_cli", "tag", str(folder), "-m", str(model), "--server", "off",
           "-l", "猫", "-l", "dog", "--min-prob", "0", "--top", "1", "--batch-size", "4"]
    rng = random.Random(7)
    interrupted = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.readline()  # the first sidecars are in place: the run is writing
        time.sleep(rng.uniform(0, 1.5))
        proc.send_signal(signal.SIGKILL)
        interrupted += proc.wait() == -signal.SIGKILL
        for side in folder.glob("*.xmp"):
            Packet.parse(side.read_bytes(), name=str(side))  # every sidecar parses, old or new
    assert interrupted  # at least one run was killed in the middle
    (folder / f".p001.png.xmp.tmp-{2**22 + 1}").write_bytes(b"<x:xmp")  # as a kill between write and rename leaves it
    final = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert final.returncode == 0, final.stderr.decode()
    records = [json.loads(line) for line in final.stdout.splitlines()]
    assert len(records) == 500
    for r in records:
        side = Path(r["sidecar"])
        kw = keywords_in(side)
        assert kw["tags"] == [f"altclip/{k}" for k in r["keywords"]] and len(r["keywords"]) == 1
        if side.name.startswith("p") and int(side.name[1:4]) % 3 == 0:
            assert kw["hier"][:2] == ["Places|Paris", "Animals|猫"]
    assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name]  # a killed run's temporaries are gone


# --- through `altclip serve` ----------------------------------------------------------------------------

def test_tag_through_the_server_writes_what_a_run_in_process_writes(tmp_path, _tiny_model_master):
    from test_serve_client import altclip, counters, model_args, start_server, short_dir

    xdg = short_dir()
    xdg.chmod(0o700)
    server = start_server(_tiny_model_master, socket_path=xdg / "altclip" / "altclip.sock")
    try:
        runs = {}
        for how in ("server", "local"):
            folder = tmp_path / how
            folder.mkdir()
            for i in range(3):
                write_image(folder / f"p{i}.png", i)
            (folder / "bad.png").write_text("nope")
            before = counters(server.target)
            extra = () if how == "server" else ("--server", "off")
            run = altclip(xdg, "tag", folder, *LABELS, "--min-prob", 0, "--top", 4, *model_args(_tiny_model_master),
                          *extra)
            assert run.code == 3, run.stderr
            assert (counters(server.target)[1] > before[1]) is (how == "server")
            assert ("torch" in run.modules) is (how == "local")
            runs[how] = [(Path(r["image"]).name, sorted(r.get("keywords", []))) for r in jsonl(run.stdout.decode())]
            assert sorted(keywords_in(folder / "p0.png.xmp")["subject"]) == runs[how][1][1]
        assert runs["server"] == runs["local"]
    finally:
        assert server.stop() == 0, server.log()
        shutil.rmtree(xdg, ignore_errors=True)
