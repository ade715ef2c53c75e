"""The house rules that a newcomer relies on, checked so that they keep holding (STYLE.md rules 14-17).

Imports run one way and never in a circle, lazy imports inside functions included; `data/` stays below the
model-loading, checkpoint, training and serving code; functions fit on a screen. Read from the source with
`ast`, so nothing is imported and optional dependencies need not be installed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nomoat"

# Each module's floor, lowest first: a module imports only modules on its own floor or below. Within a floor,
# imports may go either way, but never round in a circle (checked separately).
FLOORS: list[tuple[str, ...]] = [
    ("errors",),
    ("config", "files", "run_recipe"),
    ("model", "tokenizer", "device", "distributed", "optim", "quant", "packed", "lora", "data"),
    ("checkpoint", "generate", "chat"),
    ("convert",),
    ("load",),
    ("lineage", "card", "report", "eval", "train", "dpo", "finetune", "serve", "demo"),
    ("pipeline",),
    ("cli", "__main__", "__init__"),
]
# What data/ must never reach: it is read by every layer above and must not drag them in.
DATA_MUST_NOT_IMPORT = ("checkpoint", "load", "train", "finetune", "serve", "eval", "convert", "model", "lineage")
MAX_LINES, MAX_CLOSURE_LINES = 80, 30


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The nomoat modules that `name` imports anywhere in its source, at the top or inside functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:  # `from nomoat.data import build` imports the submodule
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def floor_of(name: str) -> int:
    top = name.split(".")[1] if name != "nomoat" else "__init__"
    return next(i for i, names in enumerate(FLOORS) if top in names)


def test_every_module_has_a_floor() -> None:
    for name in MODULES:
        floor_of(name)  # StopIteration names a new top-level module missing from FLOORS


def test_imports_run_down_the_floors() -> None:
    upward = [
        f"{a} (floor {floor_of(a)}) imports {b} (floor {floor_of(b)})"
        for a, targets in GRAPH.items()
        for b in targets
        if floor_of(b) > floor_of(a)
    ]
    assert not upward, "\n".join(upward)


def find_cycle() -> list[str] | None:
    """One import circle, as the list of modules round it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_circles() -> None:
    # A package's __init__ importing its own submodules is how packages work, not a circle between concerns.
    cycle = find_cycle()
    assert cycle is None, " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_circle(monkeypatch: pytest.MonkeyPatch) -> None:
    planted = {**GRAPH, "nomoat.files": GRAPH["nomoat.files"] | {"nomoat.load"}}
    monkeypatch.setattr(f"{__name__}.GRAPH", planted)
    cycle = find_cycle()
    assert cycle is not None and "nomoat.files" in cycle and "nomoat.load" in cycle


def test_data_stays_below_the_model_and_training_code() -> None:
    bad = [
        f"{a} imports {b}"
        for a, targets in GRAPH.items()
        if a.startswith("nomoat.data")
        for b in targets
        if b.split(".")[1] in DATA_MUST_NOT_IMPORT
    ]
    assert not bad, "\n".join(bad)


def long_functions() -> list[str]:
    found = []

    def walk(node: ast.AST, path: Path, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                limit = MAX_CLOSURE_LINES if nested else MAX_LINES
                if lines > limit:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{child.lineno} {child.name}: {lines} lines")
                walk(child, path, True)
            else:
                walk(child, path, nested)

    for path in MODULES.values():
        walk(ast.parse(path.read_text()), path, False)
    return found


def test_functions_fit_on_a_screen() -> None:
    assert not long_functions(), "\n".join(long_functions())
