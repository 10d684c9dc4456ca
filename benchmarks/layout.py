"""The package's layout: each module's lines and its ``lightning_recipe`` imports, and the rules the tree keeps.

Rules (exit status 1 when one is broken):

* no module over ``MAX_LINES`` lines;
* no module under ``checks/`` imports the module of another check (what two checks share lives in ``_core`` or
  ``functional``; a check too large for one module is a package, ``checks/optimization/``, whose modules import
  each other);
* ``functional/`` imports no Lightning (pure math on tensors and arrays);
* every ``lightning_recipe`` module imported exists (no path left over from a move);
* the import graph has no cycle (imports inside functions count; ``TYPE_CHECKING`` imports do not).

Run from the repository root::

    python benchmarks/layout.py
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Optional

MAX_LINES = 600
PACKAGE = "lightning_recipe"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(root: str) -> dict[str, str]:
    """Dotted module name -> file path, for every ``.py`` file of the package."""
    out = {}
    base = os.path.join(root, PACKAGE)
    for folder, _, files in os.walk(base):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
            out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: str, modules: dict[str, str], missing: Optional[list[str]] = None) -> set[str]:
    """The package modules that ``name`` imports (``from pkg import sub`` resolves to ``pkg.sub``); an import of a
    ``lightning_recipe`` module that does not exist (a path left over from a move) is added to ``missing``."""
    with open(path) as fh:
        tree = ast.parse(fh.read())
    skip = _type_checking_lines(tree)
    is_pkg = path.endswith("__init__.py")
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts if is_pkg else parts[:-1]
                parts = parts[: len(parts) - node.level + 1]
                mod = ".".join(parts + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        if missing is not None:
            wanted = ([a.name for a in node.names] if isinstance(node, ast.Import)
                      else [mod] if isinstance(node, ast.ImportFrom) else [])
            missing += [f"{name} imports {w}, which is not a module of the package" for w in wanted
                        if (w == PACKAGE or w.startswith(PACKAGE + ".")) and w not in modules]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle of ``graph`` (a list of modules, first repeated last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> Optional[list[str]]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _check_of(module: str) -> Optional[str]:
    """The check a module belongs to: ``checks.wiring`` for ``lightning_recipe.checks.wiring`` and for the modules of
    a check that is a package (``lightning_recipe.checks.optimization.rules``); ``None`` outside ``checks/``."""
    prefix = f"{PACKAGE}.checks."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else None


def check(root: str = ROOT) -> tuple[list[str], list[str]]:
    """The table of modules (lines, imports) and the list of broken rules (empty when the layout holds)."""
    modules = _modules(root)
    missing: list[str] = []
    graph = {n: _imports(n, p, modules, missing) for n, p in modules.items()}
    table: list[str] = []
    problems = list(missing)
    for n in sorted(modules):
        with open(modules[n]) as fh:
            lines = sum(1 for _ in fh)
        short = sorted(m[len(PACKAGE) + 1:] or PACKAGE for m in graph[n])
        table.append(f"{lines:5d}  {n}  <- {', '.join(short) if short else '-'}")
        if lines > MAX_LINES:
            problems.append(f"{n}: {lines} lines (over {MAX_LINES})")
        own = _check_of(n)
        if own:
            for m in graph[n]:
                if m == f"{PACKAGE}.checks" or (_check_of(m) and _check_of(m) != own):
                    problems.append(f"{n} imports the check module {m}")
        if n.startswith(f"{PACKAGE}.functional"):
            with open(modules[n]) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for mod in names:
                    if mod.split(".")[0] in ("lightning", "pytorch_lightning"):
                        problems.append(f"{n} imports {mod} (functional/ is pure math)")
    cycle = _cycle(graph)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return table, problems


def main() -> int:
    table, problems = check()
    print("\n".join(table))
    for p in problems:
        print("LAYOUT:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
