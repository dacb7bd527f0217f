"""The README and docs/ are tested, not trusted: every environment variable the code reads and every
command is documented, every page is reachable from the README and its links lead somewhere, the
Python examples run as written, and the project's documents speak of the project alone."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in [ROOT / "README.md", *DOC_PAGES]}
ALL_TEXT = "\n".join(PAGES.values())
DOCS_TEXT = "\n".join(text for name, text in PAGES.items() if name.startswith("docs/"))


def _python_blocks() -> list[str]:
    """Every ```python block of the README and docs/, in page order."""
    return [block for text in PAGES.values() for block in re.findall(r"```python\n(.*?)```", text, re.S)]


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
def test_every_environment_variable_is_documented(name):
    assert f"`{name}" in ALL_TEXT, f"{name} is read by the code but not documented in README.md or docs/"


def test_every_command_is_in_the_readme_and_the_docs():
    from altclip_cli.cli import cli

    for name in cli.commands:
        assert f"altclip {name}" in README, f"altclip {name} is not shown in README.md"
        assert f"altclip {name}" in DOCS_TEXT, f"altclip {name} is not described in docs/"


def _options(command, path=("altclip",)):
    """(command path, option names) for every option of every command, subcommands included."""
    import click

    for param in command.params:
        if isinstance(param, click.Option) and "--help" not in param.opts:
            yield " ".join(path), param.opts + param.secondary_opts
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options(sub, (*path, name))


def test_every_option_is_documented():
    from altclip_cli.cli import cli

    missing = [f"{command} {names[-1]}" for command, names in _options(cli)
               if not any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", ALL_TEXT) for n in names)]
    assert not missing, f"options shown in no page of README.md or docs/: {missing}"


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 300, "README.md holds the overview; details go to docs/"


def test_every_docs_page_is_linked_from_the_readme_and_the_table_of_contents():
    assert DOC_PAGES and (ROOT / "docs" / "README.md") in DOC_PAGES
    readme_links = set(re.findall(r"\]\(docs/([^)#]+)", README))
    toc_links = set(re.findall(r"\]\(([^)#/]+\.md)", PAGES["docs/README.md"]))
    for path in DOC_PAGES:
        assert path.name in readme_links, f"docs/{path.name} is not linked from README.md"
        if path.name != "README.md":
            assert path.name in toc_links, f"docs/{path.name} is not in docs/README.md"


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as '-'."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return slugs


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_relative_link_leads_somewhere(page):
    source = ROOT / page
    for target in re.findall(r"\]\(([^)\s]+)\)", PAGES[page]):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        assert resolved.exists(), f"{page} links to {target}, which does not exist"
        if anchor:
            assert resolved.suffix == ".md", f"{page} links to an anchor in {target}"
            assert anchor in _anchors(resolved.read_text(encoding="utf-8")), f"{page}: no heading for {target}"


def test_the_anchor_rule_is_githubs():
    assert _anchors("## Commands through a running server (`--server`)\n## Ray: `--ray [ADDRESS]`") == {
        "commands-through-a-running-server---server", "ray---ray-address"}


def test_no_paragraph_is_stated_twice():
    """Each fact has one place: no line of prose appears on two pages, or twice on one."""
    seen: dict[str, str] = {}
    for name, text in PAGES.items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for line in prose.splitlines():
            line = line.strip()
            if len(line) < 60 or line.startswith("|"):
                continue
            assert line not in seen, f"{name} repeats a line of {seen[line]}: {line!r}"
            seen[line] = name


@pytest.mark.parametrize("path", ["README.md", "CHANGELOG.md", "bench/README.md", "bench/GPU.md",
                                  *[p.relative_to(ROOT).as_posix() for p in DOC_PAGES]])
def test_documents_speak_of_the_project_alone(path):
    text = (ROOT / path).read_text(encoding="utf-8")
    for pattern in (r"\bissue \d", r"\bthe issue\b", r"\bsession\b", r"\bhelpers?\b", r"\bCEO\b"):
        assert not re.search(pattern, text, re.IGNORECASE), f"{path} mentions {pattern!r}"


def test_the_python_example_runs_as_written(tiny_model_dir, tmp_path, monkeypatch):
    """The Python blocks of the README and docs/, with the tiny model in place of the hub id."""
    import numpy as np
    from PIL import Image

    blocks = [b for b in _python_blocks() if "altclip_cli.load(" in b]
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
    [search_block] = [b for b in _python_blocks() if "altclip_cli.search" in b]
    os.makedirs("photos/sub")
    for i, name in enumerate(("a.png", "b.png", "sub/c.png")):
        Image.fromarray(rng.integers(0, 256, (50 + i, 70, 3), dtype=np.uint8)).save(os.path.join("photos", name))
    monkeypatch.setenv("ALTCLIP_HOME", str(tmp_path / "home"))
    exec(search_block, namespace)  # noqa: S102
    assert len(namespace["hits"]) == 3 and namespace["hits"][0].rank == 1
    assert {h.path for h in namespace["hits"]} == {str(tmp_path / "photos" / n) for n in ("a.png", "b.png", "sub/c.png")}
