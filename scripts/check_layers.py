#!/usr/bin/env python
"""Import-layering check: every import between Nectar's packages follows the declared direction, and no cycle.

Reads every ``.py`` file under the folders that ``setup.py`` maps onto ``nectar.*`` (its ``FOLDERS`` dict), finds
every import of a ``nectar`` module (module-level, inside functions, under ``if TYPE_CHECKING:``, relative imports
resolved, and ``importlib.import_module("nectar....")`` with a literal name), and reports:

1. **Direction.** A package may import only the packages below it (the transitive closure of ``ALLOWED`` is
   allowed: api may import wire because api -> client -> wire)::

       api    -> client, chain, service, wire, models
       ledger -> chain, wire, service, models
       client -> wire, models
       node   -> wire, models
       chain  -> wire
       service -> chain, wire
       models, wire -> nothing of ours

   ``nectar`` itself (``core/``: ``cli.py``, ``demo.py`` and the other composition-root modules) may import
   anything, and nothing may import it, except the foundation modules ``FOUNDATION`` (``nectar.paths``,
   ``nectar.settings``, ``nectar.deployment``, ``nectar.cli_kit`` and the ``nectar`` package's ``__init__``, which
   runs on every import anyway). Every package may import those; they import only each other and ``wire`` (the
   deployment builds its EIP-712 domain with ``wire``'s constructor). So wire must not import one of them that
   imports wire: the package-cycle check below reports that (each foundation module is its own node there).

   Issue 19 writes the direction as "api -> client, ledger, chain", but its done-checks also require that "api/ and
   ledger/ import nothing from each other": the gateway reaches the ledger over HTTP (the shared ledger client in
   ``wire/``) and shares only ``nectar.service`` with it. The stricter rule wins, so api -> ledger is not allowed.
   A type-only import (under ``TYPE_CHECKING``) counts: it is still a dependency against the direction.
   ledger -> models is allowed beyond the issue's list: the ledger's spot checker recomputes a node's blocks
   (``LocalVerifier`` loads spans through ``nectar.models``), and models is a leaf that imports nothing of ours.

2. **Cycles.** Strongly connected components of the module graph within each package, and of the package graph.
   Every import counts, including the ones inside functions and under ``TYPE_CHECKING``. A function-level import
   only defers the cycle to the first call (Python's loader no longer trips on it), but the two modules still
   depend on each other, which is what issue 19 asks to remove ("Llama maths lives in node/ and forms an import
   cycle there": that cycle is made of exactly such deferred and type-only imports). Break a cycle by moving the
   shared part into a module both import, or by passing the object in (a hook) instead of importing its module.
   ``--module-level-cycles`` counts only the imports that run at import time, to see what would fail to load.

Prints one line per violation, ``file:line: ...``, and exits 1 if there is any (0 when clean). Usage::

    python scripts/check_layers.py [--root DIR] [--module-level-cycles]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT_PACKAGE = "nectar"
CORE = "nectar"  # the composition root's layer name (core/ minus the foundation modules)
# Leaf modules of core/ that every package may import (the CLI kit builds every package's command-line parser).
FOUNDATION = frozenset({"nectar", "nectar.paths", "nectar.settings", "nectar.deployment", "nectar.cli_kit"})
FOUNDATION_LAYER = "foundation"
FOUNDATION_MAY_IMPORT = frozenset({"wire"})

# Direct edges; their transitive closure is allowed. A package missing here (a new one) may import nothing of ours
# until it is declared.
ALLOWED: dict[str, frozenset[str]] = {
    "api": frozenset({"client", "chain", "service", "wire", "models"}),
    "ledger": frozenset({"chain", "wire", "service", "models"}),
    "client": frozenset({"wire", "models"}),
    "node": frozenset({"wire", "models"}),
    "chain": frozenset({"wire"}),
    "models": frozenset(),
    "wire": frozenset(),
    "service": frozenset({"chain", "wire"}),  # the services' settings resolve devnet keys and signing domains
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. nectar.node.server
    target: str  # the imported nectar module (the longest prefix that is a module of the tree, else as written)
    path: Path
    line: int
    when: str  # "module" (runs when the importing module loads), "function" (on a call) or "type-only"


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    message: str

    def render(self, root: Path) -> str:
        try:
            shown = self.path.relative_to(root)
        except ValueError:
            shown = self.path
        return f"{shown}:{self.line}: {self.message}"


def allowed_closure(direct: dict[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    closure = {}
    for package in direct:
        seen, stack = set(), list(direct[package])
        while stack:
            other = stack.pop()
            if other not in seen:
                seen.add(other)
                stack.extend(direct.get(other, ()))
        closure[package] = frozenset(seen)
    return closure


def read_folders(root: Path) -> dict[str, Path]:
    """The ``FOLDERS`` dict of ``setup.py`` (import name -> folder), the one place the layout is declared."""
    setup = root / "setup.py"
    tree = ast.parse(setup.read_text(), filename=str(setup))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FOLDERS" for t in node.targets):
            folders = ast.literal_eval(node.value)
            return {name: root / folder for name, folder in folders.items()}
    raise SystemExit(f"{setup}: no FOLDERS = {{...}} dict found; check_layers.py reads the package folders from it")


def find_modules(folders: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every .py file under the package folders."""
    modules = {}
    # The longest import names first, so a folder mapped to a subpackage (if any) wins over its parent's walk.
    for name, folder in sorted(folders.items(), key=lambda item: -item[0].count(".")):
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if any(part.startswith((".", "__pycache__")) for part in relative.parts[:-1]):
                continue
            parts = list(relative.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            module = ".".join([name, *parts])
            modules.setdefault(module, (path, is_package))
    return modules


def layer_of(module: str, packages: Iterable[str]) -> str | None:
    """``api``, ``node``, ... for a package's module; ``foundation``; ``nectar`` for the core; None if not ours."""
    parts = module.split(".")
    if parts[0] != ROOT_PACKAGE:
        return None
    if module in FOUNDATION:
        return FOUNDATION_LAYER
    if len(parts) > 1 and parts[1] in packages:
        return parts[1]
    return CORE


def _resolve(name: str, modules: dict[str, tuple[Path, bool]]) -> str:
    """The longest prefix of ``name`` that is a module of the tree (``nectar.x.Y`` -> ``nectar.x``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, *, when: str) -> Iterator[tuple[ast.AST, str]]:
    """Yields every node with when it runs: "module" (as the module loads), "function" or "type-only"."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, when="type-only" if when == "type-only" else "function")
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for statement in child.body:
                yield statement, "type-only"
                yield from _walk(statement, when="type-only")
            for statement in child.orelse:
                yield statement, when
                yield from _walk(statement, when=when)
        else:
            yield child, when
            yield from _walk(child, when=when)


def imports_of(module: str, path: Path, is_package: bool, modules: dict[str, tuple[Path, bool]]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node, when in _walk(tree, when="module"):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: name may be a submodule (a dependency on it) or an attribute of pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        for name in names:
            if name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + "."):
                target = _resolve(name, modules)
                found.append(Import(module, target, path, node.lineno, when))
    return found


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; returns the components of more than one node, or with a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return components


def _cycle_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first node (breadth-first, so the shortest), for the message."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


def _shown(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def _direction_violations(imports: list[Import], packages: set[str]) -> Iterator[Violation]:
    closure = allowed_closure(ALLOWED)
    for found in imports:
        source, target = layer_of(found.source, packages), layer_of(found.target, packages)
        if source == target or target == FOUNDATION_LAYER or source == CORE:
            continue
        if source == FOUNDATION_LAYER:
            if target in FOUNDATION_MAY_IMPORT:
                continue
            allowed = ", ".join(sorted(FOUNDATION_MAY_IMPORT)) + " and the other foundation modules"
        elif target in closure.get(source, frozenset()):
            continue
        else:
            allowed = ", ".join(sorted(closure.get(source, frozenset()))) or "nothing of ours"
            allowed += " and the foundation modules"
        a = found.source if source == FOUNDATION_LAYER else source
        b = found.target if target in (CORE, FOUNDATION_LAYER) else target
        message = f"package {a} imports package {b} ({a} -> {b} is not allowed; allowed: {allowed})"
        yield Violation(found.path, found.line, message)


def _module_cycles(
    imports: list[Import], modules: dict, packages: set[str], root: Path, *, module_level_only: bool
) -> Iterator[Violation]:
    """Cycles between modules of one package (the core and the foundation modules count as one package, nectar)."""

    def package_of(module: str) -> str | None:
        layer = layer_of(module, packages)
        return CORE if layer == FOUNDATION_LAYER else layer

    graphs: dict[str, dict[str, set[str]]] = {}
    first_import: dict[tuple[str, str], Import] = {}
    for found in imports:
        if found.target not in modules or found.target == found.source:
            continue
        if (module_level_only and found.when != "module") or package_of(found.target) != package_of(found.source):
            continue
        graphs.setdefault(package_of(found.source), {}).setdefault(found.source, set()).add(found.target)
        first_import.setdefault((found.source, found.target), found)
    for package, graph in sorted(graphs.items()):
        for component in _strongly_connected(graph):
            cycle = _cycle_path(component, graph)
            edges = [first_import[(a, b)] for a, b in zip(cycle, cycle[1:])]
            where = ", ".join(
                f"{_shown(e.path, root)}:{e.line}" + ("" if e.when == "module" else f" ({e.when})") for e in edges
            )
            others = sorted(set(component) - set(cycle))
            also = f"; also in this cycle: {', '.join(others)}" if others else ""
            message = (
                f"import cycle in package {package}: {' -> '.join(cycle)} (imports at {where}{also}; move the shared "
                "part into a module both import, or pass the object in)"
            )
            yield Violation(edges[0].path, edges[0].line, message)


def _package_cycles(imports: list[Import], packages: set[str]) -> Iterator[Violation]:
    """Cycles between packages; every import counts (such a cycle always breaks the direction too)."""

    def node_of(module: str) -> str | None:  # each foundation module on its own: they do not import each other's users
        layer = layer_of(module, packages)
        return module if layer == FOUNDATION_LAYER else layer

    graph: dict[str, set[str]] = {}
    first_import: dict[tuple[str, str], Import] = {}
    for found in imports:
        source, target = node_of(found.source), node_of(found.target)
        if target is None or source == target:
            continue
        graph.setdefault(source, set()).add(target)
        first_import.setdefault((source, target), found)
    for component in _strongly_connected(graph):
        cycle = _cycle_path(component, graph)
        edge = first_import[(cycle[0], cycle[1])]
        others = sorted(set(component) - set(cycle))
        also = f" (also in this cycle: {', '.join(others)})" if others else ""
        yield Violation(edge.path, edge.line, f"import cycle between packages: {' -> '.join(cycle)}{also}")


def check(root: Path, *, module_level_cycles: bool = False) -> list[Violation]:
    """Every violation in the tree at ``root`` (a folder with ``setup.py``), in a stable order."""
    root = root.resolve()
    folders = read_folders(root)
    modules = find_modules(folders)
    packages = {name.split(".")[1] for name in folders if name.count(".") == 1}
    imports = [
        found
        for module, (path, is_package) in modules.items()
        for found in imports_of(module, path, is_package, modules)
    ]
    violations = [
        *_direction_violations(imports, packages),
        *_module_cycles(imports, modules, packages, root, module_level_only=module_level_cycles),
        *_package_cycles(imports, packages),
    ]
    return list(dict.fromkeys(violations))  # `from x import a, b` can name one target twice on one line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the repository root (the folder with setup.py); default: this script's repository",
    )
    parser.add_argument(
        "--module-level-cycles",
        action="store_true",
        help="count only imports that run at import time when looking for cycles",
    )
    args = parser.parse_args(argv)
    violations = check(args.root, module_level_cycles=args.module_level_cycles)
    for violation in violations:
        print(violation.render(args.root.resolve()))
    if violations:
        sys.stdout.flush()
        print(
            f"{len(violations)} layering violation(s); the rules are in scripts/check_layers.py's docstring",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
