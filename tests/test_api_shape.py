"""The package's shape: an acyclic import graph, small files, configs that are the CLI, a face."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import safegeom
from safegeom.cli import COMMANDS, build_parser
from safegeom.cli.options import configs_of, option_dest
from safegeom.config import field_docs

PACKAGE = Path(safegeom.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["safegeom", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> dict[str, set[str]]:
    """Module → the safegeom modules it imports (lazy imports included, TYPE_CHECKING excluded).

    Importing ``a.b.c`` also runs the package ``a.b``: that edge is added too, unless the
    importer lives inside that package (it is then already being initialised).
    """
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()

        def visit(node: ast.AST, package: str = package, targets: set[str] = targets) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    for other in child.orelse:
                        visit(other)
                    continue
                if isinstance(child, ast.Import):
                    targets.update(a.name for a in child.names if a.name.startswith("safegeom"))
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                        base = ".".join(up + ([base] if base else []))
                    if base.startswith("safegeom"):
                        for alias in child.names:
                            full = f"{base}.{alias.name}"
                            targets.add(full if full in mods else base)
                visit(child)

        visit(ast.parse(path.read_text(encoding="utf-8")))
        for target in targets:
            name = resolve(target)
            if name == "safegeom" and module != "safegeom":
                graph[module].add(name)  # the package face imports everything: a cycle
            while name and name != "safegeom":
                inside = module == name or module.startswith(name + ".")
                if not inside:
                    graph[module].add(name)
                name = name.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40
    assert "safegeom.models.loading" in graph["safegeom.activations"] | {
        t for m in graph if m.startswith("safegeom.activations.") for t in graph[m]
    }
    assert cycles(graph) == []


def test_no_module_imports_the_package_face() -> None:
    graph = import_graph()
    assert "safegeom.activations" in graph["safegeom"]
    assert [m for m, targets in graph.items() if "safegeom" in targets] == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


MAX_LINES = 500
"""Longest Python file, in lines as ruff formats it; a longer file is split by idea."""


def test_no_file_over_500_formatted_lines(tmp_path: Path) -> None:
    """Every file of the package, tests, analyses, benchmarks, figures and tools, formatted by
    ruff (the line length of pyproject.toml) and without its formatter-skip comments, is at most
    MAX_LINES lines: hand-packed lines do not count as short."""
    root = PACKAGE.parent
    for folder in ("safegeom", "tests", "analyses", "benchmarks", "figures", "tools"):
        for path in (root / folder).rglob("*.py"):
            copy = tmp_path / path.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text(encoding="utf-8")
            copy.write_text(re.sub(r"\s*#\s*fmt:\s*skip$", "", text, flags=re.M), encoding="utf-8")
    shutil.copy(root / "pyproject.toml", tmp_path / "pyproject.toml")
    ruff = Path(sys.executable).with_name("ruff")
    subprocess.run([str(ruff), "format", "-q", str(tmp_path)], check=True, cwd=tmp_path)
    long = {
        str(p.relative_to(tmp_path)): n
        for p in tmp_path.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_is_registered() -> None:
    assert set(_subparsers(build_parser())) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_field_has_a_flag_and_every_flag_a_field(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    configs = configs_of(parser)
    assert configs, f"{command} registers no config dataclass"
    expected = {
        option_dest(cls, f.name)
        for cls in configs
        for f in dataclasses.fields(cls)
        if f.init and f.metadata.get("cli", True)
    }
    actual = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    assert actual == expected
    for cls in configs:  # every field is documented, and its doc is the help
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.init and f.metadata.get("cli", True):
                assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "demo"])
def test_every_command_has_no_progress(command: str) -> None:
    """Every command but the demo (a walkthrough that always shows its steps)."""
    parser = _subparsers(build_parser())[command]
    flags = {s for a in parser._actions for s in a.option_strings}
    assert "--no-progress" in flags


def test_layer_help_states_both_range_syntaxes() -> None:
    checked = 0
    for name, parser in _subparsers(build_parser()).items():
        specs = {
            option_dest(cls, f)
            for cls in configs_of(parser)
            for f, hint in typing.get_type_hints(cls).items()
            if "LayerSpec" in str(hint) or f.endswith("layers")
        }
        for action in parser._actions:
            if action.dest in specs:
                checked += 1
                assert "2:6" in action.help and "2-5" in action.help, (name, action.dest)
    assert checked >= 2


def test_package_face_exports_the_everyday_api() -> None:
    import safegeom.activations.loop as loop
    import safegeom.training.runner as runner
    from safegeom.evaluation import evaluate

    everyday = ("load_model", "load_prompts", "capture", "refusal_direction", "evaluate")
    everyday += ("causal_sweep", "train", "Ablation", "Addition", "AffineEdit")
    for name in everyday:
        assert name in safegeom.__all__ and callable(getattr(safegeom, name))
    assert safegeom.capture is loop.capture
    assert safegeom.train is runner.train
    assert safegeom.evaluate is evaluate
    assert issubclass(safegeom.SafegeomError, ValueError)
    assert set(safegeom.__all__) <= set(dir(safegeom))


def test_everyday_entry_points_are_plain_functions() -> None:
    """``sg.capture``, ``sg.evaluate`` and ``sg.train`` are functions, not callable modules."""
    import safegeom as sg

    for name, module in (
        ("capture", "safegeom.activations.loop"),
        ("evaluate", "safegeom.evaluation"),
        ("train", "safegeom.training.runner"),
    ):
        function = getattr(sg, name)
        assert isinstance(function, types.FunctionType), name
        assert function.__module__ == module, (name, function.__module__)


def test_no_hand_packed_lines() -> None:
    """The formatter lays out every line: no formatter skip or off comments."""
    root = PACKAGE.parent
    marked = [
        str(path.relative_to(root))
        for folder in ("safegeom", "tests", "analyses", "benchmarks", "figures", "tools")
        for path in (root / folder).rglob("*.py")
        if re.search(r"#\s*fmt:\s*(skip|off)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    ]
    assert marked == []
