"""The embed output files: the fixed-size .npy header, atomic commit, checkpoints and resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from altclip_cli.outputs.embedfile import HEADER_SIZE, EmbeddingOutput, npy_header, sidecar_path
from altclip_cli.errors import AltclipError

SETTINGS = {"kind": "image", "model": "m", "weights": "w1", "precision": "fp32", "device_type": "cpu",
            "dtype": "float32", "normalize": True, "exact_decode": False}


@pytest.mark.parametrize("descr, shape", [("<f4", (0, 16)), ("<f2", (3, 768)), ("<f4", (10**12, 100000))])
def test_header_is_fixed_size_and_numpy_reads_it(tmp_path, descr, shape):
    header = npy_header(descr, shape)
    assert len(header) == HEADER_SIZE
    if shape[0] < 10:
        rows = np.arange(shape[0] * shape[1], dtype=descr).reshape(shape)
        (tmp_path / "a.npy").write_bytes(header + rows.tobytes())
        loaded = np.load(tmp_path / "a.npy")
        assert loaded.dtype == np.dtype(descr) and np.array_equal(loaded, rows)


def test_sidecar_path(tmp_path):
    assert sidecar_path(tmp_path / "x.npy") == tmp_path / "x.jsonl"
    assert sidecar_path(tmp_path / "x.emb") == tmp_path / "x.emb.jsonl"


def _batch(start, n, fail=()):
    items, rows = [], []
    for i in range(start, start + n):
        if i in fail:
            items.append((f"{i}.jpg", {"image": f"{i}.jpg", "error": "broken"}))
        else:
            items.append((f"{i}.jpg", {"image": f"{i}.jpg"}))
            rows.append(np.full(4, i, dtype=np.float32))
    return items, (np.stack(rows) if rows else None)


def test_nothing_appears_until_commit(tmp_path):
    out = EmbeddingOutput(tmp_path / "x.npy", settings=SETTINGS)
    out.open(4)
    out.add(*_batch(0, 3, fail={1}))
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.jsonl").exists()
    out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl", "x.manifest.json", "x.npy"]
    assert np.load(tmp_path / "x.npy").tolist() == [[0.0] * 4, [2.0] * 4]
    lines = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert lines == [{"row": 0, "image": "0.jpg"}, {"row": None, "image": "1.jpg", "error": "broken"},
                     {"row": 1, "image": "2.jpg"}]


def test_float16_and_empty(tmp_path):
    out = EmbeddingOutput(tmp_path / "h.npy", settings={**SETTINGS, "dtype": "float16"})
    out.open(4)
    out.commit()
    a = np.load(tmp_path / "h.npy")
    assert a.shape == (0, 4) and a.dtype == np.float16
    assert (tmp_path / "h.jsonl").read_text() == ""


def test_resume_from_checkpoint_discards_what_came_after(tmp_path):
    out = EmbeddingOutput(tmp_path / "x.npy", settings=SETTINGS, checkpoint_every=5)
    out.open(4)
    out.add(*_batch(0, 3, fail={1}))
    out.add(*_batch(3, 3))  # crosses 5: checkpoint at 6 inputs
    out.add(*_batch(6, 2))  # written, not checkpointed (as if killed now)
    out.close()
    assert json.loads((tmp_path / "x.npy.checkpoint.json").read_text())["inputs"] == 6

    again = EmbeddingOutput(tmp_path / "x.npy", settings=SETTINGS, checkpoint_every=5)
    assert again.has_partial() and again.resume_point() == 6
    assert again.failed_in_checkpoint() == 1
    again.check_inputs([f"{i}.jpg" for i in range(10)])
    again.open(4)
    again.add(*_batch(6, 4))
    again.commit()
    assert np.load(tmp_path / "x.npy")[:, 0].tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9]
    rows = [json.loads(line)["row"] for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert rows == [0, None, 1, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl", "x.manifest.json", "x.npy"]


def test_resume_refuses_other_settings_or_inputs(tmp_path):
    out = EmbeddingOutput(tmp_path / "x.npy", settings=SETTINGS)
    out.open(4)
    out.add(*_batch(0, 2))
    out.save_checkpoint()
    out.close()
    with pytest.raises(AltclipError, match="the earlier run used normalize True, this one False"):
        EmbeddingOutput(tmp_path / "x.npy", settings={**SETTINGS, "normalize": False}).resume_point()
    again = EmbeddingOutput(tmp_path / "x.npy", settings=SETTINGS)
    again.resume_point()
    with pytest.raises(AltclipError, match="inputs are not those"):
        again.check_inputs(["0.jpg", "other.jpg", "2.jpg"])


def test_check_writable(tmp_path):
    with pytest.raises(AltclipError, match="does not exist"):
        EmbeddingOutput(tmp_path / "no" / "x.npy", settings=SETTINGS).check_writable()
    with pytest.raises(AltclipError, match="is a folder"):
        EmbeddingOutput(tmp_path, settings=SETTINGS).check_writable()
