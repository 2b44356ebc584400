"""Read a package's imports with `ast`, find import cycles, and check imports against a layer table.

Reusable by tests: nothing here imports the package it inspects. Every `import`/`from ... import` counts, at
module level or inside functions, relative or absolute, plus `importlib.import_module("...")` with a literal
name; imports under `if TYPE_CHECKING:` are skipped, since they never run.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

Graph = dict[str, set[str]]
Layers = list[tuple[str, list[str]]]  # (layer name, dotted module prefixes), bottom layer first


@dataclass(frozen=True)
class Edge:
    """`importer` imports `imported` at `line` of `importer`'s file."""

    importer: str
    imported: str
    line: int


# ------------------------------------------------------------------------------------------------ reading imports


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package_dir` (a package's `__init__` names the package)."""
    package_dir = Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *path.relative_to(package_dir).with_suffix("").parts)
        modules[".".join(parts).removesuffix(".__init__")] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """Whether an `if` test is `TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under `node`, leaving out the bodies of `if TYPE_CHECKING:` blocks (their `else` is kept)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for branch in child.orelse:
                yield branch
                yield from _runtime_nodes(branch)
        else:
            yield from _runtime_nodes(child)


def _known(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that `name` is or lies inside (`a.b.func` -> `a.b`), or None if external."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute base of a `from ... import`, resolving leading dots against `module`'s package."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported_names(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """Dotted names one AST node imports (empty for nodes that import nothing)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _absolute(module, is_package, node)
        return [f"{base}.{alias.name}" for alias in node.names]  # `_known` falls back to `base` for a name
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) and node.args:
        func = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        arg = node.args[0]
        if func in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value]
    return []


def imports_of(module: str, path: Path, modules: Iterable[str]) -> list[Edge]:
    """The imports of one module that point at other modules of `modules`."""
    known = set(modules)
    tree = ast.parse(path.read_text(), filename=str(path))
    edges = []
    for node in _runtime_nodes(tree):
        for name in _imported_names(module, path.name == "__init__.py", node):
            target = _known(name, known)
            if target is not None and target != module:
                edges.append(Edge(module, target, getattr(node, "lineno", 0)))
    return edges


def package_edges(package_dir: Path) -> list[Edge]:
    """Every import between modules of the package at `package_dir`."""
    modules = module_files(package_dir)
    return [edge for name, path in modules.items() for edge in imports_of(name, path, modules)]


def graph_of(edges: Iterable[Edge], modules: Iterable[str] = ()) -> Graph:
    """Adjacency sets: module -> the modules it imports."""
    graph: Graph = {name: set() for name in modules}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    return graph


# ---------------------------------------------------------------------------------------------------------- cycles


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root not in index:
            _tarjan(root, graph, index, low, stack, on_stack, found)
    return sorted(found)


def _tarjan(root: str, graph: Graph, index: dict[str, int], low: dict[str, int], stack: list[str],
            on_stack: set[str], found: list[list[str]]) -> None:
    """Iterative Tarjan from `root` (no recursion limit on deep graphs); appends components to `found`."""
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
        node, children = work[-1]
        child = next(children, None)
        if child is None:
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                _pop_component(node, graph, stack, on_stack, found)
        elif child not in index:
            index[child] = low[child] = len(index)
            stack.append(child)
            on_stack.add(child)
            work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
            low[node] = min(low[node], index[child])


def _pop_component(node: str, graph: Graph, stack: list[str], on_stack: set[str], found: list[list[str]]) -> None:
    """Pop the component rooted at `node`; keep it if it is a cycle."""
    component = []
    while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
            break
    if len(component) > 1 or node in graph[node]:
        found.append(sorted(component))


def cycle_path(component: list[str], graph: Graph) -> list[str]:
    """The shortest cycle through the component's first module, as `[a, b, ..., a]` (breadth-first search)."""
    start, members = component[0], set(component)
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return _walk_back(node, parents) + [start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise ValueError(f"{component} is not a cycle of the graph")


def _walk_back(node: str, parents: dict[str, str | None]) -> list[str]:
    """The breadth-first path from the search's start to `node`."""
    path = [node]
    while (parent := parents[path[-1]]) is not None:
        path.append(parent)
    return path[::-1]


def find_cycles(graph: Graph) -> list[str]:
    """One import cycle per tangle, written `a -> b -> a` (plus the tangle's other modules); empty when acyclic."""
    return [_describe(component, graph) for component in strongly_connected(graph)]


def _describe(component: list[str], graph: Graph) -> str:
    """`a -> b -> a`, followed by the component's modules when the cycle does not pass through them all."""
    path = cycle_path(component, graph)
    others = sorted(set(component) - set(path))
    return " -> ".join(path) + (f" (tangled with {', '.join(others)})" if others else "")


# ---------------------------------------------------------------------------------------------------------- layers

_CELL_SPLIT = re.compile(r"\s*\|\s*")


def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row."""
    return _CELL_SPLIT.split(line.strip().strip("|").strip())


def read_layers(markdown: str) -> Layers:
    """The first Markdown table whose header has `layer` and `modules` columns, rows bottom layer first.

    A `modules` cell lists dotted prefixes separated by commas, optionally in backticks.
    """
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        header = [cell.lower() for cell in _cells(line)] if line.lstrip().startswith("|") else []
        if "layer" in header and "modules" in header:
            return _table_rows(lines[i + 2:], header.index("layer"), header.index("modules"))
    raise ValueError("no Markdown table with `layer` and `modules` columns")


def _table_rows(lines: list[str], layer_col: int, modules_col: int) -> Layers:
    """Rows of a table body (the lines after its separator row), up to the first line that is not a row."""
    layers: Layers = []
    for line in lines:
        if not line.lstrip().startswith("|"):
            break
        cells = _cells(line)
        prefixes = [p.strip().strip("`").strip() for p in cells[modules_col].split(",")]
        layers.append((cells[layer_col].strip("`* "), [p for p in prefixes if p]))
    return layers


def layer_of(module: str, layers: Layers) -> int | None:
    """Index of the layer whose longest listed prefix covers `module` (`a.b` covers `a.b` and `a.b.c`), or None."""
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for number, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), number)
    return None if best is None else best[1]


def unplaced(modules: Iterable[str], layers: Layers) -> list[str]:
    """Modules that no layer covers."""
    return sorted(m for m in modules if layer_of(m, layers) is None)


def stale_prefixes(modules: Iterable[str], layers: Layers) -> list[str]:
    """Prefixes in the table that cover no module (a renamed or deleted module left in the doc)."""
    names = list(modules)
    return [p for _, prefixes in layers for p in prefixes
            if not any(m == p or m.startswith(p + ".") for m in names)]


def upward_imports(edges: Iterable[Edge], layers: Layers) -> list[str]:
    """Each import from a lower layer into a higher one, naming both modules and both layers."""
    found = []
    for edge in edges:
        low, high = layer_of(edge.importer, layers), layer_of(edge.imported, layers)
        if low is not None and high is not None and high > low:
            found.append(f"{edge.importer} (layer {layers[low][0]!r}, line {edge.line}) imports {edge.imported} "
                         f"(layer {layers[high][0]!r}, higher)")
    return sorted(set(found))
