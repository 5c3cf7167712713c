"""The structure of ``src/cryospin`` as issue 17 measures it, from the source alone (no import).

Prints, per module and in total:

- function-level imports (an ``import`` inside a function), each with its line and the comment
  that gives its reason, if any;
- parameters and return values annotated with ``Any``;
- import cycles between cryospin modules through module-level imports (those under
  ``if TYPE_CHECKING:`` excluded: they never run), as strongly connected components;
- modules above 600 lines and functions above 80 lines of code (blank and comment lines and
  docstrings not counted).

Usage::

    python tools/import_report.py [SRC_DIR]     # default: src
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


@dataclass
class ModuleFacts:
    """What one module shows."""

    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)  # cryospin modules imported at module level
    function_imports: list[tuple[int, str, str]] = field(default_factory=list)  # line, stmt, why
    any_annotations: int = 0
    long_functions: list[tuple[str, int]] = field(default_factory=list)


def module_name(path: Path, root: Path) -> str:
    """``src/cryospin/io/star.py`` -> ``cryospin.io.star`` (a package's ``__init__`` -> the
    package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
              known: set[str]) -> Iterator[str]:
    """The cryospin modules an import statement imports (``from pkg import mod`` gives
    ``pkg.mod`` when that is a module, else ``pkg``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                yield alias.name
        return
    target = _resolve(node, importer, is_package)
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in known:
            yield sub
        elif target in known:
            yield target


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported (inside try/if too, not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(h.body for h in node.handlers)):
                yield from _module_level(block)


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    """Lines of code of a function: not blank, not a comment, not its docstring."""
    skip: set[int] = set()
    first = fn.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        skip.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    count = 0
    for ln in range(fn.lineno, (fn.end_lineno or fn.lineno) + 1):
        text = lines[ln - 1].strip()
        if ln not in skip and text and not text.startswith("#"):
            count += 1
    return count


def _is_any(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    return any((isinstance(n, ast.Name) and n.id == "Any")
               or (isinstance(n, ast.Attribute) and n.attr == "Any")
               or (isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and "Any" in n.value.replace("|", " ").split())
               for n in ast.walk(annotation))


def analyse(root: Path) -> dict[str, ModuleFacts]:
    """Facts of every module under ``root`` (the folder holding the ``cryospin`` package)."""
    paths = sorted((root / "cryospin").rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    facts: dict[str, ModuleFacts] = {}
    for path in paths:
        name = module_name(path, root)
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        mod = ModuleFacts(name, path, len(lines))
        is_package = path.name == "__init__.py"
        for node in _module_level(tree.body):
            mod.imports.update(m for m in _imported(node, name, is_package, known) if m != name)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = fn.args
            params = [*args.posonlyargs, *args.args, *args.kwonlyargs,
                      *(a for a in (args.vararg, args.kwarg) if a is not None)]
            mod.any_annotations += sum(_is_any(a.annotation) for a in params)
            mod.any_annotations += _is_any(fn.returns)
            n_code = _code_lines(fn, lines)
            if n_code > MAX_FUNCTION_LINES:
                mod.long_functions.append((fn.name, n_code))
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node is not fn:
                    stmt = lines[node.lineno - 1].strip()
                    why = stmt.split("#", 1)[1].strip() if "#" in stmt else ""
                    mod.function_imports.append((node.lineno, stmt.split("#")[0].strip(), why))
        facts[name] = mod
    return facts


def cycles(facts: dict[str, ModuleFacts]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(facts[v].imports):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(facts):
        if v not in index:
            visit(v)
    return out


def _package_cycles(facts: dict[str, ModuleFacts]) -> list[list[str]]:
    """Cycles between top-level subpackages/modules (``cryospin.train`` -> ``cryospin.evaluate``
    -> ``cryospin.train``), from the same module-level imports."""
    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    merged: dict[str, ModuleFacts] = {}
    for m, f in facts.items():
        t = top(m)
        agg = merged.setdefault(t, ModuleFacts(t, f.path, 0))
        agg.imports.update(top(i) for i in f.imports if top(i) != t)
    return cycles(merged)


def report(facts: dict[str, ModuleFacts]) -> str:
    """The printed report."""
    out: list[str] = []
    n_fn = sum(len(f.function_imports) for f in facts.values())
    n_any = sum(f.any_annotations for f in facts.values())
    n_internal = sum(len(f.imports) for f in facts.values())
    out.append(f"modules: {len(facts)}; module-level imports between cryospin modules: "
               f"{n_internal}")
    out.append(f"function-level imports: {n_fn}")
    for name, f in sorted(facts.items(), key=lambda kv: (-len(kv[1].function_imports), kv[0])):
        for line, stmt, why in f.function_imports:
            out.append(f"  {name}:{line}  {stmt}" + (f"   # {why}" if why else "   (no reason)"))
    out.append(f"parameters and returns annotated Any: {n_any}")
    for name, f in sorted(facts.items(), key=lambda kv: (-kv[1].any_annotations, kv[0])):
        if f.any_annotations:
            out.append(f"  {f.any_annotations:3d}  {name}")
    mod_cycles = cycles(facts)
    out.append(f"module import cycles (module-level imports): {len(mod_cycles)}")
    out.extend("  " + " <-> ".join(c) for c in mod_cycles)
    pkg_cycles = _package_cycles(facts)
    out.append(f"package cycles (cryospin.<top>, module-level imports): {len(pkg_cycles)}")
    out.extend("  " + " <-> ".join(c) for c in pkg_cycles)
    big = [(f.lines, n) for n, f in facts.items() if f.lines > MAX_MODULE_LINES]
    out.append(f"modules above {MAX_MODULE_LINES} lines: {len(big)}")
    out.extend(f"  {lines:5d}  {n}" for lines, n in sorted(big, reverse=True))
    long_fns = [(n_code, f"{name}.{fn}") for name, f in facts.items()
                for fn, n_code in f.long_functions]
    out.append(f"functions above {MAX_FUNCTION_LINES} lines of code: {len(long_fns)}")
    out.extend(f"  {n_code:5d}  {fn}" for n_code, fn in sorted(long_fns, reverse=True))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path("src")
    print(report(analyse(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
