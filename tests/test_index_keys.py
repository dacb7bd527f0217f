"""The index's content keys: two files share a vector only when their whole contents are equal;
each new file is hashed once (from the bytes its decoder reads, when no other file has its size);
an unchanged file is never read; an index written with the older keys (a head and a tail only)
is upgraded without trusting them."""
from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from altclip_cli.search import search, update
from altclip_cli.search.database import SCHEMA_VERSION
from altclip_cli.search.store import INDEX_DB, IndexStore
from altclip_cli.search.update import update_index
from test_cli import write_image
from test_index import content, folder_of, index, rows, summary_line


def scans(folder):
    """folder/a.tif and folder/b.tif: uncompressed TIFFs of one size (1.5 MiB), equal in their
    first 1 MiB and their last 64 KiB, different in between (as two scans with equal margins)."""
    folder.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 256, size=(512, 1024, 3), dtype=np.uint8)
    paths = []
    for name, middle in (("a.tif", 0), ("b.tif", 255)):
        pixels = base.copy()
        pixels[360:480] = middle
        Image.fromarray(pixels).save(folder / name, format="TIFF")
        paths.append(folder / name)
    a, b = (p.read_bytes() for p in paths)
    assert len(a) == len(b) and a != b
    assert a[:1 << 20] == b[:1 << 20] and a[-(64 << 10):] == b[-(64 << 10):]
    return paths


def whole_key(path) -> str:
    data = path.read_bytes()
    return f"sha256:{len(data)}:{hashlib.sha256(data).hexdigest()}"


def test_images_equal_in_their_first_mib_and_last_64_kib_get_a_vector_each(tmp_path, monkeypatch, model, loaded):
    monkeypatch.chdir(tmp_path)
    a, b = scans(tmp_path / "photos")
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    assert summary_line(result).startswith("indexed photos: 2 added (2 files, ")
    stored = rows(folder_of(model))
    assert stored[str(a)][0] != stored[str(b)][0]
    vectors = content(folder_of(model))
    assert not np.allclose(vectors[str(a)], vectors[str(b)])
    for query, other in ((a, b), (b, a)):  # each scan finds itself first, the other below it
        hits = search(loaded, str(query), tmp_path / "photos", top=2, update=False)
        assert [h.path for h in hits] == [str(query), str(other)]
        assert hits[0].score > hits[1].score


def test_copies_and_renames_of_large_images_reuse_their_vectors(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    a, b = scans(tmp_path / "photos")
    assert index(model, "photos").exit_code == 0
    before = content(folder_of(model))
    shutil.copy(a, tmp_path / "photos" / "copy of a.tif")
    b.rename(tmp_path / "photos" / "moved b.tif")
    with IndexStore.open(folder_of(model), write=True) as store:
        summary = update_index(lambda: pytest.fail("the model was loaded"), store, [tmp_path / "photos"])
    assert (summary.added, summary.renamed, summary.reused, summary.embedded) == (1, 1, 2, 0)
    after = content(folder_of(model))
    np.testing.assert_array_equal(after[str(tmp_path / "photos" / "copy of a.tif")], before[str(a)])
    np.testing.assert_array_equal(after[str(tmp_path / "photos" / "moved b.tif")], before[str(b)])
    assert rows(folder_of(model)).keys() == {str(a), str(tmp_path / "photos" / "copy of a.tif"),
                                             str(tmp_path / "photos" / "moved b.tif")}


def test_a_new_file_is_read_once_and_an_unchanged_one_never(tmp_path, monkeypatch, model):
    """A new file whose size no other file has is hashed from the bytes its decoder reads (no
    separate read for its key); the key is of the whole file; an unchanged tree reads no file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    write_image(tmp_path / "photos" / "one.png", 1)
    write_image(tmp_path / "photos" / "two.png", 2, size=(80, 60))
    monkeypatch.setattr(update, "content_key", lambda *a: pytest.fail("a file was read for its key alone"))
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    db = sqlite3.connect(folder_of(model) / INDEX_DB)
    keys = dict(db.execute("SELECT path, content_key FROM files"))
    db.close()
    assert keys == {str(p): whole_key(p) for p in (tmp_path / "photos").iterdir()}
    monkeypatch.setattr(update, "content_key_of", lambda *a: pytest.fail("an unchanged file was hashed"))
    with IndexStore.open(folder_of(model), write=True) as store:
        summary = update_index(lambda: pytest.fail("the model was loaded"), store, [tmp_path / "photos"])
    assert (summary.unchanged, summary.changed) == (2, False)


def test_an_index_with_the_older_keys_is_upgraded_without_trusting_them(tmp_path, monkeypatch, model):
    """An index written by an altclip that keyed a head and a tail: two different scans it gave
    one vector get one each at the next update, and no key of the older form is matched."""
    monkeypatch.chdir(tmp_path)
    a, b = scans(tmp_path / "photos")
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    own = content(folder)
    db = sqlite3.connect(folder / INDEX_DB)
    with db:  # as the older altclip left it: schema 1, a key of the head and tail, b given a's vector
        data = a.read_bytes()
        old_key = f"{len(data)}:{hashlib.sha256(data[:1 << 20] + data[-(64 << 10):]).hexdigest()}"
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.execute("UPDATE files SET content_key = ?", (old_key,))
        db.execute("UPDATE files SET vec_row = (SELECT vec_row FROM files WHERE path = ?) WHERE path = ?",
                   (str(a), str(b)))
    db.close()
    c = tmp_path / "photos" / "c.tif"  # new, and equal to a and b in the bytes the older key read
    shutil.copy(b, c)
    result = index(model, "photos")
    assert result.exit_code == 0, result.stderr
    stored = rows(folder)
    assert stored[str(a)][0] != stored[str(b)][0] and stored[str(c)][0] == stored[str(b)][0]
    after = content(folder)
    for path in (a, b):
        np.testing.assert_allclose(after[str(path)], own[str(path)], atol=1e-6)
    db = sqlite3.connect(folder / INDEX_DB)
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    keys = dict(db.execute("SELECT path, content_key FROM files"))
    db.close()
    assert version == str(SCHEMA_VERSION)
    assert all(key is None or key.startswith("sha256:") for key in keys.values())
    assert keys[str(c)] == whole_key(c)


def test_after_the_upgrade_a_copy_of_an_unchanged_image_still_takes_its_vector(tmp_path, monkeypatch, model):
    """The upgrade drops the older keys; an indexed image gets its whole-file key back when a
    file of its size turns up, so a new copy of it takes its vector without the model."""
    monkeypatch.chdir(tmp_path)
    a, _b = scans(tmp_path / "photos")
    assert index(model, "photos").exit_code == 0
    folder = folder_of(model)
    before = content(folder)
    db = sqlite3.connect(folder / INDEX_DB)
    with db:  # as the older altclip left it: schema 1, keys of another form
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        db.execute("UPDATE files SET content_key = size || ':0123'")
    db.close()
    shutil.copy(a, tmp_path / "photos" / "copy of a.tif")
    with IndexStore.open(folder, write=True) as store:
        summary = update_index(lambda: pytest.fail("the model was loaded"), store, [tmp_path / "photos"])
    assert (summary.added, summary.reused, summary.embedded) == (1, 1, 0)
    np.testing.assert_array_equal(content(folder)[str(tmp_path / "photos" / "copy of a.tif")], before[str(a)])
    assert rows(folder)[str(a)][0] == rows(folder)[str(tmp_path / "photos" / "copy of a.tif")][0]
