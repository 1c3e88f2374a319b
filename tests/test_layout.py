"""The package's layout: no import circles, the command line on top, rooms of modest size.

The import graph is read from the source with :mod:`ast` (nothing is imported): an edge
``a -> b`` for every ``import``/``from ... import`` inside ``codebook_features`` that ``a``
runs, at module level or inside a function, plus an edge to each package that Python runs on
the way (``from .training.config import X`` also runs ``training/__init__``).
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

PKG = "codebook_features"
ROOT = Path(__file__).resolve().parents[1] / "src" / PKG
CLI_ENTRY = {f"{PKG}.cli", f"{PKG}.__main__"}
MAX_LINES = 500  # "about 500": a source file may not pass this
# Old module paths kept for one release: each warns and points to the new one.
SHIMS = {
    "codebook_features.data.stories": "codebook_features.experiments.stories",
    "codebook_features.standard_eval": "codebook_features.evaluation.standard",
    "codebook_features.story_demo": "codebook_features.experiments.stories.job",
    "codebook_features.synthetic": "codebook_features.experiments.synthetic",
    "codebook_features.train": "codebook_features.training.job",
    "codebook_features.demo": "codebook_features.experiments.tokfsm.job",
    "codebook_features.fsm_analysis": "codebook_features.experiments.tokfsm.analysis",
    "codebook_features.demo_report": "codebook_features.experiments.tokfsm.report",
    "codebook_features.fsm": "codebook_features.experiments.tokfsm.metrics",
    "codebook_features.evaluate": "codebook_features.evaluation",
    "codebook_features.data.tokfsm": "codebook_features.experiments.tokfsm.data",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PACKAGES = {module_name(p) for p in ROOT.rglob("__init__.py")}


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if mod in PACKAGES else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str) -> set[str]:
    """The package's modules that ``mod`` imports, with the packages run on the way."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[mod].read_text())):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node)
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    out: set[str] = set()
    for t in targets:
        parts = t.split(".")
        for i in range(2, len(parts) + 1):  # the root package runs first for everyone
            name = ".".join(parts[:i])
            if name in MODULES and name != mod and not mod.startswith(name + "."):
                out.add(name)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_graph_reader_sees_real_edges():
    """The reader finds known edges (relative, absolute, in a function) and a planted cycle."""
    assert f"{PKG}.errors" in GRAPH[f"{PKG}.codebook.layer"]  # two dots up
    assert f"{PKG}.model" in GRAPH[f"{PKG}.analysis.commands"]  # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_only_the_command_line_imports_it():
    offenders = sorted(m for m, deps in GRAPH.items()
                       if m not in CLI_ENTRY and deps & CLI_ENTRY)
    assert not offenders, f"these modules import the CLI (it should import them): {offenders}"


def test_the_library_does_not_import_the_experiments():
    """Experiments build on the library, never the reverse (the CLI reaches them by name)."""
    exp = f"{PKG}.experiments"
    offenders = sorted(m for m, deps in GRAPH.items() if not m.startswith(exp)
                       and any(d == exp or d.startswith(exp + ".") for d in deps))
    assert not offenders, f"these library modules import an experiment: {offenders}"


def test_every_command_module_exists():
    from codebook_features import cli

    for name, (mod, _help, options, run) in cli.COMMANDS.items():
        path = f"{PKG}.{mod}"
        assert path in MODULES, f"{name}: no module {path}"
        defined = {n.name for n in ast.parse(MODULES[path].read_text()).body
                   if isinstance(n, ast.FunctionDef)}
        assert {options, run} <= defined, f"{name}: {path} lacks {options} or {run}"


def test_source_files_are_modest():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in ROOT.rglob("*.py")}
    too_big = {f: n for f, n in sizes.items() if n > MAX_LINES}
    assert not too_big, f"split these (over {MAX_LINES} lines): {too_big}"


@pytest.mark.parametrize("old,new", sorted(SHIMS.items()))
def test_old_paths_warn_and_point_to_the_new(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(new in m for m in messages), messages
    target = importlib.import_module(new)
    public = getattr(target, "__all__", None) or [
        n for n, v in vars(target).items()
        if not n.startswith("_") and getattr(v, "__module__", None) == new]
    assert public and all(getattr(mod, n) is getattr(target, n) for n in public)


def test_moved_data_names_warn():
    import codebook_features.data as data
    from codebook_features.experiments import tokfsm

    with pytest.warns(DeprecationWarning, match="codebook_features.experiments.tokfsm"):
        assert data.TokFSM is tokfsm.TokFSM
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018
