"""The layering docs/architecture.md promises: imports point down (no cycles, no engine module
importing the CLI), every named error derives from CogVLMError, and the CLI turns any of them
into one line and exit 2."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import cogvlm
from cogvlm.errors import CogVLMError

PACKAGE = Path(cogvlm.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def import_graph() -> dict[str, set[str]]:
    """Module -> the cogvlm modules it imports, anywhere in the file (lazy imports count: they
    are still arrows)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("cogvlm"):
                    deps |= {f"{target}.{a.name}" if _exists(f"{target}.{a.name}") else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("cogvlm")}
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v in graph and not state.get(v):
                found = visit(v)
                if found:
                    return found
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if not state.get(u):
            found = visit(u)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycles():
    assert find_cycle(import_graph()) is None


def test_find_cycle_finds_one():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_engine_module_imports_the_cli():
    graph = import_graph()
    engine = {m for m in graph if not m.startswith("cogvlm.cli") and m not in ("cogvlm.__main__",)}
    offenders = {m: sorted(d for d in graph[m] if d.startswith("cogvlm.cli")) for m in engine}
    assert {m: d for m, d in offenders.items() if d} == {}


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "cogvlm.") if m.name != "cogvlm.__main__")


@pytest.mark.parametrize("name", _all_modules())
def test_every_error_class_derives_from_cogvlm_error(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:  # an optional extra that is not installed
        pytest.skip(f"{name}: {e}")
    errors = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
              if issubclass(obj, BaseException) and obj.__module__.startswith("cogvlm")]
    assert [e.__qualname__ for e in errors if not issubclass(e, CogVLMError)] == []


def test_the_cli_turns_any_cogvlm_error_into_one_line(capsys, monkeypatch):
    from cogvlm.cli import main
    from cogvlm.errors import GenerationError

    def fail(args):
        raise GenerationError("a named error the CLI was never told about")

    monkeypatch.setattr("cogvlm.cli.convert.cmd_convert", fail)  # the parser is built after this
    code = main(["convert", "a", "b"])
    err = capsys.readouterr().err
    assert code == 2 and err == "cogvlm convert: error: a named error the CLI was never told about\n"
