"""The README is tested, not trusted: every environment variable the code reads and every command
is documented there, and the project's documents speak of the project alone."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _variables_read_by_the_code() -> set[str]:
    found = set()
    for path in (ROOT / "altclip_cli").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        found |= set(re.findall(r"""environ(?:\.get)?\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))
        found |= set(re.findall(r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""", text))
        found |= set(re.findall(r"""envvar=["']([A-Z][A-Z0-9_]+)["']""", text))
        found |= set(re.findall(r"""\bflag\(\s*["']([A-Z][A-Z0-9_]+)["']""", text))
    return found


def test_the_scan_finds_what_the_code_reads():
    assert {"ALTCLIP_HOME", "ALTCLIP_DEBUG", "ALTCLIP_NO_CACHE", "ALTCLIP_MODEL", "NO_COLOR",
            "HF_HUB_OFFLINE"} <= _variables_read_by_the_code()


@pytest.mark.parametrize("name", sorted(_variables_read_by_the_code()))
def test_every_environment_variable_is_in_the_readme(name):
    assert f"`{name}" in README, f"{name} is read by the code but not documented in README.md"


def test_every_command_is_in_the_readme():
    from altclip_cli.cli import cli

    for name in cli.commands:
        assert f"altclip {name}" in README, f"altclip {name} is not shown in README.md"


@pytest.mark.parametrize("path", ["README.md", "CHANGELOG.md", "bench/README.md", "bench/GPU.md"])
def test_documents_speak_of_the_project_alone(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    for pattern in (r"\bissue \d", r"\bthe issue\b", r"\bsession\b", r"\bhelpers?\b", r"\bCEO\b"):
        assert not re.search(pattern, text, re.IGNORECASE), f"{path} mentions {pattern!r}"


def test_the_python_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    """The README's Python block, with the tiny model in place of the hub id."""
    import numpy as np
    from PIL import Image

    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "altclip_cli.load(" in b]
    assert len(blocks) == 1
    block = blocks[0]
    assert 'altclip_cli.load("BAAI/AltCLIP"' in block
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("cat.jpg", "beach.jpg", "a.jpg", "b.jpg"):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(name)
    namespace: dict = {}
    exec(block.replace('"BAAI/AltCLIP"', repr(str(tiny_model_dir))), namespace)  # noqa: S102
    assert namespace["probs"].shape == (2, 3) and namespace["text_emb"].shape[0] == 2

    # The search block, with the model the first one loaded.
    [search_block] = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "altclip_cli.search" in b]
    os.makedirs("photos/sub")
    for i, name in enumerate(("a.png", "b.png", "sub/c.png")):
        Image.fromarray(rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8)).save(os.path.join("photos", name))
    monkeypatch.setenv("ALTCLIP_HOME", str(tmp_path / "home"))
    exec(search_block, namespace)  # noqa: S102
    assert len(namespace["hits"]) == 3 and namespace["hits"][0].rank == 1
    assert {h.path for h in namespace["hits"]} == {str(tmp_path / "photos" / n) for n in ("a.png", "b.png", "sub/c.png")}
