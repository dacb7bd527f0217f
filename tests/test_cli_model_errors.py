"""Issue 4, model rows: every unusable model is one `error:` line with a `hint:`, exit 1, no traceback."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from test_cli import invoke, write_image


class Payload:
    def __reduce__(self):
        return (print, ("this ran code from a checkpoint",))


def no_config(folder):
    (folder / "config.json").unlink()


def mismatched_config(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_config"]["intermediate_size"] = 99
    (folder / "config.json").write_text(json.dumps(raw))


def truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])


def bin_holding_code(folder):
    (folder / "model.safetensors").unlink()
    torch.save({"logit_scale": Payload()}, folder / "pytorch_model.bin")


def pickle_holding_code(folder):
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"logit_scale": Payload()}, f)


def missing_tensor(folder):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, str(folder / "model.safetensors"))


def no_tokenizer(folder):
    (folder / "tokenizer.json").unlink()
    (folder / "sentencepiece.bpe.model").unlink()


def broken_json(folder):
    (folder / "config.json").write_text("{not json")


CASES = {
    no_config: "config.json",
    mismatched_config: "vision_config.intermediate_size: config says 99, tensors say 37",
    truncated_safetensors: "model.safetensors",
    bin_holding_code: "refused to unpickle",
    pickle_holding_code: "refused to unpickle",
    missing_tensor: "missing 1: text_projection.weight",
    no_tokenizer: "tokenizer",
    broken_json: "config.json",
}


@pytest.mark.parametrize("damage", list(CASES), ids=lambda f: f.__name__)
def test_unusable_model_folder(damage, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 1)
    damage(tiny_model_dir)
    result = invoke("classify", "a.png", "-l", "cat", "-l", "dog", "-m", tiny_model_dir)
    assert result.exit_code == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and CASES[damage] in lines[0], lines
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert "this ran code" not in result.stdout + result.stderr


@pytest.mark.parametrize("model, message", [
    ("BAAI/AltCLIP-nonexistent", "not in the cache"),
    ("not a repo id!", "neither a model folder nor a Hugging Face model id"),
])
def test_offline_hub_ids_not_cached(model, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 1)
    result = invoke("classify", "a.png", "-l", "cat", "-m", model, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr.splitlines()[0]
    assert "hint: " in result.stderr and "Traceback" not in result.stderr


def test_permission_denied_image_is_named(tiny_model_dir, tmp_path, monkeypatch):
    # Tests run as root, who can read a chmod 000 file: make the OS refuse it instead, at the one
    # opener every image file goes through.
    import altclip_cli.inputs.files as files

    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "secret.png", 2)
    real_open = os.open

    def guarded_open(path, *args, **kwargs):
        if str(path).endswith("secret.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", guarded_open)
    result = invoke("classify", "a.png", "secret.png", "-l", "cat", "-l", "dog", "-m", tiny_model_dir,
                    "-f", "json")
    assert result.exit_code == 3
    records = json.loads(result.stdout)
    assert records[0]["image"] == "a.png" and len(records[0]["scores"]) == 2
    assert records[1] == {"image": "secret.png", "error": "permission denied"}
    assert "secret.png: permission denied" in result.stderr
