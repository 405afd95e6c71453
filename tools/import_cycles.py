"""Import cycles among fabric's modules: none allowed. Every import counts, those inside functions too (a cycle
that holds only through them is still one the reader has to know); imports under `if TYPE_CHECKING:` do not (they
never run). Importing a.b.c imports the packages a and a.b first, as Python does. Fails on any cycle, naming its
modules and the import lines that close it.

    python tools/import_cycles.py            # check (make lint)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fabric"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): its body is for the type checker only."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The fabric modules `name` imports anywhere in its body that runs, each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: dict[str, int] = {}
    todo: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        found: set[str] = set()
        if isinstance(node, ast.Import):
            found = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found = {base} | {f"{base}.{alias.name}" for alias in node.names}  # a submodule imported by name
        if found:
            found |= {".".join(t.split(".")[:i]) for t in found for i in range(1, t.count(".") + 1)}
            line = getattr(node, "lineno", 0)
            for target in found & known.keys() - {name}:
                targets[target] = min(targets.get(target, line), line)
        if isinstance(node, ast.If) and _type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))
    return targets


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for name in edges:
        if name not in index:
            visit(name)
    return sorted(found)


def main(argv: list[str]) -> int:
    edges = graph()
    found = cycles(edges)
    for component in found:
        members = set(component)
        lines = [
            f"  {a} -> {b} ({modules()[a].relative_to(ROOT)}:{line})"
            for a in component
            for b, line in sorted(edges[a].items())
            if b in members
        ]
        print(f"import cycle: {' <-> '.join(component)}", *lines, sep="\n")
    print(f"import cycles: {len(found)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
