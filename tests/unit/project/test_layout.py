"""The package layout, checked from the source alone (``ast``; nothing of veilnet is imported).

Every import of a veilnet package is collected from every ``.py`` file of the packages below,
including imports inside functions and under ``if TYPE_CHECKING:``. ``from pkg import name``
counts as importing the submodule ``pkg.name`` when there is one, otherwise ``pkg/__init__``;
``from . import x`` and ``from .mod import y`` are resolved against the importing file. Then:

a. the package-level graph has no cycle;
b. inside each package the module-level graph has no cycle (``pkg/__init__.py`` is a module that
   imports what it imports, so a submodule doing ``from pkg import X`` while ``pkg/__init__``
   imports that submodule is a cycle);
c. ``client`` imports no module of ``node`` and ``node`` none of ``client``;
d. each package imports only the packages below it in ``ALLOWED``.

Each failure lists every offending import as ``file:line``.

This file lives in tests/unit/project/, not tests/unit/: pytest puts a test file's directory
on sys.path, and tests/unit/ holds directories named like the packages, which would shadow them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PACKAGES = ("errors", "crypto", "models", "protocols", "ledger", "consensus", "registry", "node",
            "client")
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "crypto": {"errors"},
    "models": {"errors", "crypto"},
    "ledger": {"errors", "crypto"},
    "consensus": {"errors", "crypto"},
    "registry": {"errors", "crypto"},
    "protocols": {"errors", "crypto", "models", "ledger", "consensus", "registry"},
    "node": set(PACKAGES) - {"node", "client"},
    "client": set(PACKAGES) - {"client", "node"},
}
assert set(ALLOWED) == set(PACKAGES)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. "client.cli" ("client" for client/__init__.py)
    target: str  # imported module, resolved to the deepest module that exists
    file: str    # path relative to the repository root
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.source} imports {self.target}"


def package_of(module: str) -> str:
    return module.split(".", 1)[0]


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> file, for every .py file of ``packages`` under ``root``."""
    out: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The deepest existing module among ``name`` and its parents (None: not ours)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def collect_imports(root: Path, packages: Iterable[str] = PACKAGES) -> list[Import]:
    """Every import of one of ``packages`` made anywhere in their own files."""
    modules = module_files(root, packages)
    found: list[Import] = []
    for source, path in modules.items():
        is_init = path.name == "__init__.py"
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [t for a in node.names if (t := _resolve(a.name, modules))]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    # the package the file is in (an __init__ is its own package)
                    base = source.split(".")
                    if not is_init:
                        base.pop()
                    base = base[:len(base) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                package = _resolve(stem, modules)
                if package is None:
                    continue  # not one of ours
                for alias in node.names:
                    sub = f"{stem}.{alias.name}"  # a submodule, or a name of ``package``
                    targets.append(sub if alias.name != "*" and sub in modules else package)
            for target in targets:
                if target != source:
                    found.append(Import(source, target, rel, node.lineno))
    return sorted(set(found), key=lambda i: (i.file, i.line, i.target))  # one per target


# -- cycles ----------------------------------------------------------------------------------------

def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    nodes = sorted(set(graph) | {v for vs in graph.values() for v in vs})
    succ = {n: sorted(set(graph.get(n, ()))) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _cycle_through(start: str, members: set[str], succ: Mapping[str, Iterable[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside ``members`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(succ.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")  # pragma: no cover


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One readable cycle (``[a, b, ..., a]``) per strongly connected component that has one;
    an empty list means the graph is acyclic. Self-loops are ignored."""
    succ = {n: {v for v in vs if v != n} for n, vs in graph.items()}
    cycles = []
    for component in strongly_connected(succ):
        if len(component) > 1:
            cycles.append(_cycle_through(component[0], set(component), succ))
    return cycles


def cycle_report(imports: list[Import], node_of: str) -> str:
    """'' when the graph of ``imports`` (nodes: modules, or their packages when ``node_of`` is
    'package') is acyclic, otherwise each cycle as a path and every import inside it."""
    key = package_of if node_of == "package" else (lambda m: m)
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(key(imp.source), set()).add(key(imp.target))
    lines = []
    for cycle in find_cycles(graph):
        members = set(cycle)
        lines.append("cycle: " + " -> ".join(cycle))
        lines += ["    " + imp.where for imp in imports
                  if key(imp.source) in members and key(imp.target) in members
                  and key(imp.source) != key(imp.target)]
    return "\n".join(lines)


# -- the real tree ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imports() -> list[Import]:
    # a renamed or missing package must fail here, not leave its imports unchecked
    missing = [p for p in PACKAGES if not (REPO / p / "__init__.py").is_file()]
    assert not missing, f"packages not found under {REPO}: {missing}; update PACKAGES/ALLOWED"
    found = collect_imports(REPO)
    assert found, "no imports found: is REPO right?"
    return found


def test_a_package_graph_has_no_cycle(imports: list[Import]) -> None:
    across = [i for i in imports if package_of(i.source) != package_of(i.target)]
    report = cycle_report(across, "package")
    assert not report, "import cycles between packages:\n" + report


def test_b_no_module_cycle_inside_a_package(imports: list[Import]) -> None:
    reports = []
    for package in PACKAGES:
        inside = [i for i in imports
                  if package_of(i.source) == package == package_of(i.target)]
        if report := cycle_report(inside, "module"):
            reports.append(f"[{package}]\n{report}")
    assert not reports, "import cycles inside packages:\n" + "\n".join(reports)


def test_c_client_and_node_do_not_import_each_other(imports: list[Import]) -> None:
    bad = [i.where for i in imports
           if {package_of(i.source), package_of(i.target)} == {"client", "node"}]
    assert not bad, "client/ and node/ must not import each other:\n" + "\n".join(bad)


def test_d_each_package_imports_only_what_it_may(imports: list[Import]) -> None:
    bad = [f"{i.where} (allowed: {', '.join(sorted(ALLOWED[package_of(i.source)])) or 'none'})"
           for i in imports
           if package_of(i.target) != package_of(i.source)
           and package_of(i.target) not in ALLOWED[package_of(i.source)]]
    assert not bad, "imports of packages a package may not use:\n" + "\n".join(bad)


# -- the checker itself --------------------------------------------------------------------------

def test_cycle_finder_on_hand_made_graphs() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({"a": {"a"}}) == []  # a module naming itself is no cycle
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "x": {"y"}, "y": {"x"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["x", "y", "x"]]
    imports = [Import("p.a", "p.b", "p/a.py", 3), Import("p.b", "p", "p/b.py", 7),
               Import("p", "p.a", "p/__init__.py", 1), Import("p.b", "q.z", "p/b.py", 8)]
    report = cycle_report(imports, "module")
    assert report.splitlines() == [
        "cycle: p -> p.a -> p.b -> p",
        "    p/a.py:3: p.a imports p.b",
        "    p/b.py:7: p.b imports p",
        "    p/__init__.py:1: p imports p.a",
    ]
    assert cycle_report(imports, "package") == ""  # p -> q only


def test_collector_resolves_every_kind_of_import(tmp_path: Path) -> None:
    files = {
        "pa/__init__.py": "from .core import thing\nfrom . import sub\n",
        "pa/core.py": "from pa import helper\nfrom pa import NAME\n",
        "pa/helper.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from pb.mod import T\n"
            "def f():\n"
            "    import pb\n"
            "    from pb import mod\n"
            "import os, pa.core\n"),
        "pa/sub/__init__.py": "from .. import core\nfrom ..helper import f\n",
        "pb/__init__.py": "",
        "pb/mod.py": "from pa.sub import *\nimport numpy\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    got = {(i.source, i.target, i.line) for i in collect_imports(tmp_path, ["pa", "pb"])}
    assert got == {
        ("pa", "pa.core", 1), ("pa", "pa.sub", 2),
        ("pa.core", "pa.helper", 1), ("pa.core", "pa", 2),
        ("pa.helper", "pb.mod", 3), ("pa.helper", "pb", 5), ("pa.helper", "pb.mod", 6),
        ("pa.helper", "pa.core", 7),
        ("pa.sub", "pa.core", 1), ("pa.sub", "pa.helper", 2),
        ("pb.mod", "pa.sub", 1),
    }
    inside = [i for i in collect_imports(tmp_path, ["pa", "pb"])
              if package_of(i.source) == "pa" == package_of(i.target)]
    assert "cycle: pa -> pa.core -> pa" in cycle_report(inside, "module")
