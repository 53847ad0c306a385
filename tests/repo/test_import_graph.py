"""The two packages' import graph, read from the code (nothing is imported or run).

- no circle of imports inside `course_utils` or inside `course_tools`;
- `course_utils` (what lessons import) never imports `course_tools` (the tools);
- no module imports another module's private name (`from .x import _y`, `x._y`);
- no course module is imported inside a function; a library imported inside a function is an
  optional or heavy one and says so (inside `try:`, or with a `# lazy:` comment);
- every `course_utils` module's docstring names the lesson(s) it backs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("course_utils", "course_tools")


def module_name(path: Path, root: Path) -> str:
    """`course_tools/bench/loss.py` -> `course_tools.bench.loss` (a package's `__init__` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Every module of the packages under `root`, by dotted name."""
    return {
        module_name(p, root): p
        for package in packages
        for p in sorted((root / package).rglob("*.py"))
    }


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path, packages=PACKAGES) -> list[dict]:
    """Every import statement of the packages: who, what, which names, where, how deep."""
    found = []
    for name, path in modules(root, packages).items():
        found += _imports_of(name, path)
    return found


def _imports_of(name: str, path: Path) -> list[dict]:
    """The import statements of one module."""
    text = path.read_text()
    lines = text.splitlines()
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, depth, in_try):
        for child in ast.iter_child_nodes(node):
            nested = depth + isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            guarded = in_try or isinstance(child, ast.Try)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(_row(name, alias.name, [], child, depth, in_try, lines))
            elif isinstance(child, ast.ImportFrom):
                target = _absolute(child, name, is_package)
                names = [a.name for a in child.names]
                found.append(_row(name, target, names, child, depth, in_try, lines))
            visit(child, nested, guarded)

    visit(ast.parse(text), 0, False)
    return found


def _row(module, target, names, node, depth, in_try, lines) -> dict:
    """One import as a dict."""
    source = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    return {
        "module": module,
        "target": target,
        "names": names,
        "line": node.lineno,
        "in_function": depth > 0,
        "optional": in_try or "# lazy:" in source,
    }


def graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the course modules it imports (a `from pkg import mod` counts as mod)."""
    known = set(modules(root, packages))
    edges: dict[str, set[str]] = {name: set() for name in known}
    for row in imports(root, packages):
        for candidate in [f"{row['target']}.{n}" for n in row["names"]] + [row["target"]]:
            if candidate in known and candidate != row["module"]:
                edges[row["module"]].add(candidate)
                break
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The circles of a graph (one per strongly connected part with more than one module)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in edges.get(v, ()):
                found.append(sorted(part))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def private_uses(root: Path, packages=PACKAGES) -> list[str]:
    """Private names one course module takes from another: `from .x import _y` or `x._y`."""
    known = set(modules(root, packages))
    problems = []
    for row in imports(root, packages):
        if row["target"].split(".")[0] not in packages:
            continue
        for name in row["names"]:
            if name.startswith("_") and f"{row['target']}.{name}" not in known:
                problems.append(f"{row['module']}:{row['line']} imports {row['target']}.{name}")
    for name, path in modules(root, packages).items():
        tree = ast.parse(path.read_text())
        aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
            if f"{_absolute(node, name, path.name == '__init__.py')}.{alias.name}" in known
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                problems.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return problems


def test_no_circle_in_either_package():
    """Each package's modules import each other without a circle (so no arrow runs back up)."""
    for package in PACKAGES:
        assert cycles(graph(ROOT, (package,))) == [], package


def test_the_lessons_package_never_imports_the_tools():
    """course_utils stands alone; course_tools builds on it."""
    wrong = [
        f"{r['module']}:{r['line']} imports {r['target']}"
        for r in imports(ROOT, ("course_utils",))
        if r["target"].split(".")[0] == "course_tools"
    ]
    assert wrong == []


def test_no_module_takes_another_modules_private_name():
    """A name starting with `_` stays in its module."""
    assert private_uses(ROOT) == []


def test_imports_inside_functions_are_optional_libraries_only():
    """Course modules are imported at the top; a library imported late says why (try / # lazy:)."""
    late = [r for r in imports(ROOT) if r["in_function"]]
    course = [r for r in late if r["target"].split(".")[0] in PACKAGES or r["target"] == ""]
    unexplained = [r for r in late if not r["optional"]]
    assert [f"{r['module']}:{r['line']} {r['target']}" for r in course] == []
    assert [f"{r['module']}:{r['line']} {r['target']}" for r in unexplained] == []


def test_every_lesson_module_names_its_lesson():
    """A course_utils module's docstring says which lesson(s) it backs (e.g. "lesson 04")."""
    silent = []
    for name, path in modules(ROOT, ("course_utils",)).items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not re.search(r"\b[Ll]essons? \d\d|\(\d\d(?:[-, ]+\d\d)*\)", doc):
            silent.append(name)
    assert silent == []


def _write(root: Path, files: dict[str, str]) -> None:
    """Write a small package tree for the planted tests."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_catch_a_planted_circle_a_private_name_and_a_late_import(tmp_path):
    """The same checks, on a package made to break each rule, report each break."""
    _write(
        tmp_path,
        {
            "course_utils/__init__.py": "",
            "course_utils/a.py": '"""(01)"""\nfrom . import b\n',
            "course_utils/b.py": '"""(02)"""\nfrom .c import _hidden\n',
            "course_utils/c.py": '"""(03)"""\nfrom course_utils import a\n\n\ndef f():\n    import json\n    from . import b\n',
        },
    )
    assert cycles(graph(tmp_path, ("course_utils",))) == [
        ["course_utils.a", "course_utils.b", "course_utils.c"]
    ]
    assert private_uses(tmp_path, ("course_utils",)) == [
        "course_utils.b:2 imports course_utils.c._hidden"
    ]
    late = [
        (r["target"], r["optional"])
        for r in imports(tmp_path, ("course_utils",))
        if r["in_function"]
    ]
    assert late == [("json", False), ("course_utils", False)]


def test_grading_is_split_by_job_in_short_functions():
    """Configuration, generation, the sandbox and a batch each have a module; no function is long."""
    folder = ROOT / "course_tools" / "grading"
    assert {"config.py", "generate.py", "sandbox.py", "batch.py", "__main__.py"} <= {
        p.name for p in folder.glob("*.py")
    }
    long = [
        f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in folder.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 65
    ]
    assert long == []
