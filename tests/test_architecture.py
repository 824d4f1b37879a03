"""The module map of docs/development.md, held by the imports themselves: no cycles, nothing
imports upward, pure math does no I/O, and only the CLI calls the commands' functions.
Imports inside functions count too (a lazy import is a dependency all the same); imports
under ``if TYPE_CHECKING:`` do not."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Source folders and the package each is installed as.
PACKAGES = ((REPO / "bitquant", "bitquant"), (REPO / "cli", "bitquant.cli"))

#: No I/O and no other layer: the bottom of docs/development.md's map.
BOTTOM = {"bitquant.ternary", "bitquant.packing", "bitquant.report", "bitquant.errors", "bitquant.families"}
#: Tensor in, tensor out.
PURE = {"bitquant.ternary", "bitquant.kernels", "bitquant.packing", "bitquant.w2a8", "bitquant.gates", "bitquant.methods"}
#: Modules that read or write files, caches or the Hub.
IO = {"bitquant.tensorfile", "bitquant.source", "bitquant.embedded", "bitquant.text", "bitquant.staging",
      "bitquant.journal", "bitquant.fingerprint", "bitquant.publish", "bitquant.formats"}
IO_LIBRARIES = {"safetensors", "huggingface_hub", "transformers", "datasets", "gguf", "pyarrow", "requests", "httpx"}
#: The commands' library functions, called by the CLI alone.
ENTRY_POINTS = {"bitquant.convert", "bitquant.heal"}


def modules(packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for folder, package in packages:
        for f in sorted(folder.rglob("*.py")):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = f
    return out


def imported(name: str, path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute, relative resolved; ``from a import b``
    gives both ``a`` and ``a.b``), wherever the import statement stands."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1] + ([child.module] if child.module else []))
                out.add(base)
                out.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return out


def graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the project's modules it imports."""
    mods = modules(packages)
    return {n: {m for m in imported(n, p) if m in mods and m != n} for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def walk(n: str) -> None:
        state[n] = "open"
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                walk(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            walk(n)
    return found


def within(name: str, group: set[str]) -> bool:
    return any(name == g or name.startswith(g + ".") for g in group)


def test_the_map_is_read_from_every_module():
    g = graph()
    assert len(g) > 50 and "bitquant.training.loop" in g and "bitquant.cli.app" in g
    assert "bitquant.ternary" in g["bitquant.training.student"]  # the student ternarizes as the exporter does
    assert "bitquant.heal" in g["bitquant.cli.heal_command"] and "bitquant.convert" in g["bitquant.cli.main"]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_a_cycle_through_a_lazy_import_is_found(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from .a import x\n")
    (tmp_path / "pkg" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    g = graph(((tmp_path / "pkg", "pkg"),))
    assert g["pkg.b"] == {"pkg.a"} and g["pkg.c"] == set()
    assert cycles(g) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_the_library_never_imports_the_cli():
    g = graph()
    upward = {(n, m) for n, ms in g.items() for m in ms
              if within(m, {"bitquant.cli"}) and not within(n, {"bitquant.cli"}) and n != "bitquant.__main__"}
    assert upward == set()


def test_the_bottom_layer_imports_only_the_bottom_layer():
    g = graph()
    assert {(n, m) for n in BOTTOM for m in g[n] if m not in BOTTOM} == set()


def test_pure_math_does_no_io():
    mods = modules()
    for n in (n for n in mods if within(n, PURE)):
        names = imported(n, mods[n])
        assert not [m for m in names if within(m, IO)], n
        assert not {m.split(".")[0] for m in names} & IO_LIBRARIES, n


def test_only_the_cli_calls_the_commands():
    g = graph()
    callers = {(n, m) for n, ms in g.items() for m in ms if m in ENTRY_POINTS and not within(n, {"bitquant.cli"})}
    assert callers == set()
