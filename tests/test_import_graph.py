"""Imports point one way (DESIGN.md, "Rules that keep it easy to change"), read from the source with `ast`.

Every module under server/, prompt_store/ and loadtest/ is parsed (nothing is imported), and each of its
imports, wherever it stands (top level, inside a function, under `if TYPE_CHECKING:`), is an edge to the
module it names. The checks:
  - no cycle between modules, nor between packages (each package below one node, every other module of
    `server` a node of its own: an arrow that comes back through auth.py or errors.py is a cycle too);
  - between the layers, arrows only point down: scaleout -> api -> engine, tenancy, training ->
    prompt_store; the engine knows nothing else of the server; prompt_store imports nothing of the server;
    loadtest imports neither; the engine's two paths (paged/, hf_cache/) never import each other;
  - the scheduler (server.engine.scheduling) imports no torch, even through the modules it imports.
Each failure names the offending edge: `importer -> imported (file:line)`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "prompt_store", "loadtest")

# Layers, and what each may import of the others (by module-name prefix). A layer is the longest prefix
# that names a module's package; modules of `server` outside every layer are not constrained here (the
# cycle checks cover them).
LAYERS: dict[str, tuple[str, ...]] = {
    "server.scaleout": ("server.api", "server.engine", "server.tenancy", "server.training", "prompt_store"),
    "server.api": ("server.engine", "server.tenancy", "server.training", "prompt_store"),
    "server.tenancy": ("server.engine.types", "prompt_store"),  # the engine's results, as plain data
    "server.training": ("prompt_store",),
    "server.engine": ("prompt_store",),
    "prompt_store": (),
    "loadtest": (),
}
# The layers' own names, each of which a layer may import only as LAYERS allows.
LAYERED = ("server.scaleout", "server.api", "server.tenancy", "server.training", "server.engine", "prompt_store",
           "loadtest")
# Below the API, and the engine above all, nothing of the server's top: the app, the routers' runtime, the CLI.
TOP_OF_SERVER = ("server.app", "server.runtime", "server.cli", "server.api", "server.scaleout")
BELOW_API = ("server.engine", "server.tenancy", "server.training", "prompt_store", "loadtest")
ENGINE_PATHS = ("server.engine.paged", "server.engine.hf_cache")
# The paged runner reuses ModelRunner.penalty_history (a non-import line its owner changes to
# sampler.causal_penalty_history, which both runners share); until then this one edge is known.
KNOWN_CROSS_PATH: set[tuple[str, str]] = set()
NO_TORCH = ("server.engine.scheduling",)


@dataclass(frozen=True)
class Edge:
    """One import: `importer` names `imported` at `where` (file:line)."""

    importer: str
    imported: str
    where: str
    is_type_checking: bool

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.where})"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path], root: Path = ROOT) -> list[Edge]:
    """The edges out of one module: to modules of PACKAGES, and to any outside module by its top name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded = _type_checking_lines(tree)
    is_package = path.name == "__init__.py"
    edges = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in dict.fromkeys(targets):
            resolved = _known(target, modules)
            edges.append(Edge(name, resolved, where, getattr(node, "lineno", 0) in guarded))
    return edges


def import_graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge]]:
    """Every module of PACKAGES and every import edge out of them."""
    modules = module_files(root)
    edges = [e for name, path in modules.items() for e in imports_of(name, path, modules, root)]
    return modules, edges


def cycles(nodes: list[str], arrows: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a node list, first node repeated last) per strongly connected group of more than one node,
    or per node that imports itself (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(arrows.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(arrows.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in arrows.get(node, ()):
                    groups.append(_cycle_within(set(group), arrows))
    return groups


def package_of(module: str) -> str:
    """The node a module counts as in the package graph: its layer, or itself."""
    return _layer(module) or module


def layer_violations(edges: list[Edge]) -> list[tuple[Edge, str]]:
    """Every edge that points up or sideways between layers, or that the rules forbid outright: (edge, why)."""
    found = []
    for e in edges:
        source, target = _layer(e.importer), e.imported
        if source is None or target.split(".")[0] not in PACKAGES:
            continue
        if _within(target, (source,)):
            if _crosses_paths(e.importer, target) and (e.importer, target) not in KNOWN_CROSS_PATH:
                found.append((e, "the engine's paths do not import each other; move what both need up to "
                                 "server.engine"))
            continue
        if _within(target, LAYERED) and not _within(target, LAYERS[source]):
            found.append((e, f"{source} may import only {', '.join(LAYERS[source]) or 'none of these layers'}"))
        elif source in BELOW_API and _within(target, TOP_OF_SERVER):
            found.append((e, f"{source} sits below the API and may not import the server's top"))
        elif source in ("server.engine", "prompt_store", "loadtest") and target.startswith("server"):
            found.append((e, f"{source} imports nothing of `server` outside itself"))
    return found


def torch_reached(modules: dict[str, Path], edges: list[Edge], start_prefixes: tuple[str, ...]) -> list[list[Edge]]:
    """For each module under `start_prefixes` that reaches torch when imported: the chain of edges. An import
    runs its packages' __init__.py first: those count; imports under TYPE_CHECKING do not."""
    runtime: dict[str, list[Edge]] = {}
    for e in edges:
        if not e.is_type_checking:
            runtime.setdefault(e.importer, []).append(e)
    for module in modules:
        parts = module.split(".")
        for n in range(1, len(parts)):
            runtime.setdefault(module, []).append(Edge(module, ".".join(parts[:n]), "its package", False))
    chains = []
    for module in sorted(modules):
        if _within(module, start_prefixes):
            chain = _path_to(module, lambda m: m == "torch" or m.startswith("torch."), runtime)
            if chain is not None:
                chains.append(chain)
    return chains


# -- the tests ------------------------------------------------------------------------------------
def test_no_module_imports_itself_back():
    modules, edges = import_graph()
    found = cycles(sorted(modules), _arrows(edges, lambda m: m if m in modules else None))
    assert not found, "import cycles between modules:\n" + "\n".join(_describe(c, edges, modules) for c in found)


def test_no_package_imports_itself_back():
    modules, edges = import_graph()
    arrows = _arrows(edges, lambda m: package_of(m) if m in modules else None)
    found = cycles(sorted({package_of(m) for m in modules}), arrows)
    assert not found, "import cycles between packages:\n" + "\n".join(
        _describe(c, edges, modules, package_of) for c in found)


def test_imports_point_down_between_layers():
    _, edges = import_graph()
    found = layer_violations(edges)
    assert not found, "upward or forbidden imports:\n" + "\n".join(f"  {e}: {why}" for e, why in found)


def test_the_scheduler_reaches_no_torch():
    modules, edges = import_graph()
    chains = torch_reached(modules, edges, NO_TORCH)
    assert not chains, "the scheduler imports torch:\n" + "\n".join(" / ".join(map(str, c)) for c in chains)


def test_the_checks_can_fail(tmp_path):
    # The same checks on a tree of their own that breaks each rule once: a cycle (through TYPE_CHECKING),
    # an upward import, and torch reached from the scheduler through another module.
    files = {
        "server/__init__.py": "", "server/engine/__init__.py": "", "server/engine/scheduling/__init__.py": "",
        "server/engine/scheduling/scheduler.py": "import server.engine.sampler\n",
        "server/engine/sampler.py": "import torch\n",
        "prompt_store/__init__.py": "", "prompt_store/store.py": "from server.engine import sampler\n",
        "loadtest/__init__.py": "",
        "loadtest/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from loadtest.b import B\n",
        "loadtest/b.py": "from loadtest import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, edges = import_graph(tmp_path)
    assert cycles(sorted(modules), _arrows(edges, lambda m: m if m in modules else None)) == [
        ["loadtest.a", "loadtest.b", "loadtest.a"]]
    assert [str(e) for e, _ in layer_violations(edges)] == [
        "prompt_store.store -> server.engine.sampler (prompt_store/store.py:1)"]
    assert [[str(e) for e in chain] for chain in torch_reached(modules, edges, NO_TORCH)] == [[
        "server.engine.scheduling.scheduler -> server.engine.sampler (server/engine/scheduling/scheduler.py:1)",
        "server.engine.sampler -> torch (server/engine/sampler.py:1)"]]


# -- helpers ---------------------------------------------------------------------------------------
def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(target: str, modules: dict[str, Path]) -> str:
    """`target` if it is one of ours (or the nearest of ours above it), else the name as written."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return target


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _layer(module: str) -> str | None:
    matches = [layer for layer in LAYERS if _within(module, (layer,))]
    return max(matches, key=len) if matches else None


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _crosses_paths(importer: str, imported: str) -> bool:
    mine = [p for p in ENGINE_PATHS if _within(importer, (p,))]
    theirs = [p for p in ENGINE_PATHS if _within(imported, (p,))]
    return bool(mine and theirs and mine != theirs)


def _arrows(edges: list[Edge], node_of) -> dict[str, set[str]]:
    arrows: dict[str, set[str]] = {}
    for e in edges:
        source, target = node_of(e.importer), node_of(e.imported)
        if source is not None and target is not None and (source != target or e.importer == e.imported):
            arrows.setdefault(source, set()).add(target)
    return arrows


def _cycle_within(group: set[str], arrows: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first node (by name), staying inside the group."""
    start = min(group)
    return [start, *_path_to(start, lambda m: m == start, {n: sorted(arrows.get(n, set()) & group) for n in group},
                             names_only=True)]


def _path_to(start: str, is_goal, arrows: dict, names_only: bool = False) -> list | None:
    """Breadth first from `start` to a node `is_goal` accepts (start itself only after one step): the
    edges taken (or, with `names_only`, the nodes reached), or None."""
    seen = {start}
    frontier: list[tuple[str, list]] = [(start, [])]
    while frontier:
        next_frontier = []
        for node, trail in frontier:
            for step in arrows.get(node, ()):
                target = step if names_only else step.imported
                taken = [*trail, step]
                if is_goal(target):
                    return taken
                if target not in seen:
                    seen.add(target)
                    next_frontier.append((target, taken))
        frontier = next_frontier
    return None


def _describe(cycle: list[str], edges: list[Edge], modules: dict[str, Path], node_of=lambda m: m) -> str:
    """The cycle, and for each of its arrows one import that makes it."""
    lines = ["  " + " -> ".join(cycle)]
    for source, target in zip(cycle, cycle[1:]):
        edge = next(e for e in edges if e.imported in modules and node_of(e.importer) == source
                    and node_of(e.imported) == target)
        lines.append(f"    {edge}")
    return "\n".join(lines)
