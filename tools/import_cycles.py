"""Import cycles among fabric's modules: every import counts, those inside functions and under `if TYPE_CHECKING:`
too (a cycle that holds only through them is still one the reader has to know), and importing a.b.c imports the
packages a and a.b first, as Python does. Fails when a cycle is not within one of the known ones
(tools/import_cycles.txt, one cycle's modules a line): the known list may only shrink.

    python tools/import_cycles.py            # check (make lint)
    python tools/import_cycles.py --write    # rewrite the known list from today's cycles (only to shrink it)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fabric"
KNOWN = Path(__file__).with_name("import_cycles.txt")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The fabric modules `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    todo: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}  # a submodule imported by name
        todo.extend(ast.iter_child_nodes(node))
    parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
    return {t for t in targets | parents if t in known and t != name}


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
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
    for name in graph:
        if name not in index:
            visit(name)
    return sorted(found)


def main(argv: list[str]) -> int:
    now = cycles()
    if "--write" in argv:
        KNOWN.write_text("".join(" ".join(c) + "\n" for c in now))
        print(f"{KNOWN.name}: {len(now)} cycle(s) written")
        return 0
    allowed = [set(line.split()) for line in KNOWN.read_text().splitlines() if line.strip()]
    new = [c for c in now if not any(set(c) <= a for a in allowed)]
    for c in new:
        print(f"import cycle not in {KNOWN.relative_to(ROOT)}: {' <-> '.join(c)}")
    if not new and (stale := [a for a in allowed if not any(set(c) == a for c in now)]):
        print(f"{len(stale)} known cycle(s) shrank or went: `python tools/import_cycles.py --write` locks that in")
    print(f"import cycles: {len(now)} (known {len(allowed)}), new {len(new)}")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
