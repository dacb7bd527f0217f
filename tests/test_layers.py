"""The package's layers, checked on its imports (read with ast, nothing imported): each module
imports only its own layer and those below it (the layer table below), nothing below the
command line imports cli/, no module imports the package root (the public face; the version is
altclip_cli.version), no module takes another's `_private` name, the commands do not import
each other, and there is no import cycle (lazy imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "altclip_cli"

# Layer of each top-level part of the package -> the layers it may import (its own included).
# Any layer below is allowed, not only the next one: the search update finds weights and their
# identity in cache/ and hub/, the remote model finds a hub id's snapshot in the HF cache, and the
# label cache's key names the tokenizer file that inputs/ finds.
BASE = {"errors", "paths", "env", "durable", "quiet", "version", "__init__"}
MAY_IMPORT = {
    "cli": {"cli", "serve", "search", "runtime", "cache", "hub", "inputs", "outputs", "nn", "base"},
    "serve": {"serve", "search", "runtime", "inputs", "outputs", "cache", "hub", "nn", "base"},
    "search": {"search", "runtime", "inputs", "outputs", "cache", "hub", "nn", "base"},
    "runtime": {"runtime", "cache", "nn", "inputs", "outputs", "hub", "base"},
    "cache": {"cache", "hub", "nn", "inputs", "base"},
    "hub": {"hub", "cache", "nn", "inputs", "base"},
    "inputs": {"inputs", "base"},
    "outputs": {"outputs", "base"},
    "nn": {"nn", "base"},
    "base": {"base"},
}

# Imports that break a rule today and are being removed elsewhere; each is (importer, imported
# module, name or None). Empty it as they go: a listed import that no longer exists fails too.
KNOWN = set()  # exceptions to the rules, each with its reason; none today


def module_name(path: Path) -> str:
    if not path.is_relative_to(PACKAGE.parent):
        return path.stem
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, typing_too: bool = True) -> list[tuple[str, str | None]]:
    """(module imported, name taken from it or None) for every altclip import in the file,
    relative ones resolved; `from . import x` names module x when x is a module. typing_too:
    also those under `if TYPE_CHECKING:` (they name a dependency, but never run)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            typing_only |= {id(n) for part in node.body for n in ast.walk(part)}
    for node in ast.walk(tree):
        if not typing_too and id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "altclip_cli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "altclip_cli":
                continue
            for alias in node.names:
                if is_module(f"{target}.{alias.name}"):
                    found.append((f"{target}.{alias.name}", None))
                else:
                    found.append((target, alias.name))
    return found


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(module: str) -> str:
    parts = module.split(".")
    if module == "altclip_cli.__main__":
        return "cli"
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in BASE):
        return "base"
    return parts[1]


def all_imports(*, typing_too: bool = True) -> dict[str, list[tuple[str, str | None]]]:
    return {module_name(p): imports(p, typing_too=typing_too) for p in sorted(PACKAGE.rglob("*.py"))}


def violations() -> set[tuple]:
    found = set()
    graph = all_imports()
    commands = {m for m in graph if m.startswith("altclip_cli.cli.commands.") and defines_command(m)}
    for module, targets in graph.items():
        for target, name in targets:
            if module == "altclip_cli" and target.startswith("altclip_cli."):
                continue  # the package root is the public face: it may load anything on demand
            if layer(target) not in MAY_IMPORT[layer(module)]:
                found.add((module, target, None))
            if target == "altclip_cli" and module != "altclip_cli":
                found.add((module, target, name))  # the public face loads the runtime: take altclip_cli.version
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                found.add((module, target, name))
            if module in commands and target in commands and target != module:
                found.add((module, target, None))
    found |= {("cycle", *pair) for pair in cycles(all_imports(typing_too=False))}
    return found


def defines_command(module: str) -> bool:
    """Whether the module defines a click command or group (a command, not a helper of one)."""
    path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                call = d.func if isinstance(d, ast.Call) else d
                if isinstance(call, ast.Attribute) and call.attr in ("command", "group"):
                    return True
    return False


def cycles(graph) -> set[tuple[str, str]]:
    """(a, b) sorted, for modules a and b that reach each other through imports run at some
    point (a package's __init__ counts as imported by its modules only when they import it)."""
    edges = {m: {t for t, _n in ts if t in graph and t != m} for m, ts in graph.items()}
    reach = {}
    for start in edges:
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += edges.get(m, ())
        reach[start] = seen
    pairs = set()
    for a, targets in edges.items():
        for b in targets:
            if a in reach.get(b, ()):
                pairs.add(tuple(sorted((a, b))))
    return pairs


def test_every_import_points_down():
    new = sorted(violations() - KNOWN)
    assert new == [], "\n".join(" -> ".join(str(x) for x in v if x) for v in new)


def test_the_known_exceptions_still_exist():
    """A fixed exception leaves the list, so that it cannot come back unnoticed."""
    assert sorted(KNOWN - violations()) == []


def test_the_checks_see_what_they_check(tmp_path):
    """The import reader resolves relative imports, names and modules as the rules need them."""
    found = dict(all_imports())
    assert ("altclip_cli.errors", "InputError") in found["altclip_cli.serve.remote"] or \
        any(t == "altclip_cli.errors" for t, _n in found["altclip_cli.serve.client"])
    assert layer("altclip_cli.version") == "base" and layer("altclip_cli.cli.formats") == "cli"
    assert defines_command("altclip_cli.cli.commands.classify")
    assert cycles({"a": [("b", None)], "b": [("a", None)], "c": [("a", None)]}) == {("a", "b")}
    typed = tmp_path / "typed.py"
    typed.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import altclip_cli.errors\n")
    assert imports(typed) == [("altclip_cli.errors", None)] and imports(typed, typing_too=False) == []


def test_the_version_module_is_the_projects():
    import tomllib

    from altclip_cli.version import __version__

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["version"] == __version__
