"""What the grader runs of a learner's cells: their definitions, not their other top-level code.

A test can be fooled by code that runs before it: ``torch.allclose = lambda *a, **k: True``,
``check.lora_forward = print`` or ``LoRALinear.forward = ...`` at the top of an answer cell. So
before a notebook is graded, every code cell the learner wrote (answer cells and cells they
added; the locked cells are nbgrader's copies of the master and run as they are) keeps only the
statements that define something without running the learner's code:

* ``import`` and ``from ... import`` (not ``*``, not relative), unless they rebind a name the
  master's cells or the allowed decorators use to something else (``import numpy as torch``);
* ``def`` and ``class``, whose decorators are a few standard ones (``property``,
  ``staticmethod``, ``functools.lru_cache``, ``torch.no_grad``, ``dataclass`` ...), whose
  default values, annotations and base classes are plain expressions (no call), and whose class
  bodies hold only such definitions and constants;
* ``NAME = value`` where the value is a plain expression: literals, names, ``a.b`` attributes
  (no ``_private`` ones), operators, subscripts, f-strings and lambdas, never a call.

Every other top-level line is commented out with ``# [not run by the grader]`` and shows so in
the learner's feedback. The model answers of every exercise pass unchanged (a test grades them).

What this does not stop: the body of a learner's function runs when a test calls it, and could
patch the checks then. The checks' comparisons are bound before any learner code runs
(``course_utils.exercise_checks.feedback``), so ``torch.allclose`` replaced inside a function
still does not change them, but a body that patches the check modules themselves is not stopped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import nbformat
from IPython.core.inputtransformer2 import TransformerManager
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Unicode

MARK = "# [not run by the grader] "

#: Decorators a definition may carry, by the name that must refer to them.
DECORATORS = {
    "staticmethod": "builtins.staticmethod",
    "classmethod": "builtins.classmethod",
    "property": "builtins.property",
    "functools.cache": "functools.cache",
    "functools.lru_cache": "functools.lru_cache",
    "functools.cached_property": "functools.cached_property",
    "cache": "functools.cache",
    "lru_cache": "functools.lru_cache",
    "cached_property": "functools.cached_property",
    "torch.no_grad": "torch.no_grad",
    "torch.inference_mode": "torch.inference_mode",
    "torch.enable_grad": "torch.enable_grad",
    "no_grad": "torch.no_grad",
    "dataclasses.dataclass": "dataclasses.dataclass",
    "dataclass": "dataclasses.dataclass",
}

#: Base classes a learner's class may have (besides the learner's own classes).
BASES = {
    "object": "builtins.object",
    "Exception": "builtins.Exception",
    "ValueError": "builtins.ValueError",
    "torch.nn.Module": "torch.nn.Module",
    "nn.Module": "torch.nn.Module",
    "Module": "torch.nn.Module",
}

#: Methods Python calls while a class is being defined or subclassed: not in a learner's class.
_CLASS_HOOKS = {"__init_subclass__", "__class_getitem__", "__set_name__", "__mro_entries__"}

#: The module each name the decorators and bases start with must come from.
_ROOTS = {
    "staticmethod": "builtins.staticmethod",
    "classmethod": "builtins.classmethod",
    "property": "builtins.property",
    "object": "builtins.object",
    "Exception": "builtins.Exception",
    "ValueError": "builtins.ValueError",
    "functools": "functools",
    "cache": "functools.cache",
    "lru_cache": "functools.lru_cache",
    "cached_property": "functools.cached_property",
    "torch": "torch",
    "no_grad": "torch.no_grad",
    "nn": "torch.nn",
    "Module": "torch.nn.Module",
    "dataclasses": "dataclasses",
    "dataclass": "dataclasses.dataclass",
}


def _dotted(node: ast.expr) -> str | None:
    """'a.b.c' for a name or attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def plain(node: ast.AST | None) -> bool:
    """True for an expression that calls nothing a learner wrote (no call, no private attribute)."""
    if node is None or isinstance(node, ast.Constant | ast.Name):
        return True
    if isinstance(node, ast.Attribute):
        return not node.attr.startswith("_") and plain(node.value)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return all(plain(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and plain(k) for k in node.keys) and all(map(plain, node.values))
    if isinstance(node, ast.UnaryOp):
        return plain(node.operand)
    if isinstance(node, ast.BinOp):
        return plain(node.left) and plain(node.right)
    if isinstance(node, ast.BoolOp):
        return all(map(plain, node.values))
    if isinstance(node, ast.Compare):
        return plain(node.left) and all(map(plain, node.comparators))
    if isinstance(node, ast.IfExp):
        return plain(node.test) and plain(node.body) and plain(node.orelse)
    if isinstance(node, ast.Subscript):
        return plain(node.value) and plain(node.slice)
    if isinstance(node, ast.Slice):
        return plain(node.lower) and plain(node.upper) and plain(node.step)
    if isinstance(node, ast.JoinedStr):
        return all(map(plain, node.values))
    if isinstance(node, ast.FormattedValue):
        return plain(node.value) and plain(node.format_spec)
    if isinstance(node, ast.Lambda):
        return _plain_arguments(node.args)
    return False


def _plain_arguments(args: ast.arguments) -> bool:
    """Default values and annotations of a signature are plain."""
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    annotations = [a.annotation for a in every if a is not None]
    return all(map(plain, [*args.defaults, *args.kw_defaults, *annotations]))


def _import_bindings(node: ast.Import | ast.ImportFrom) -> list[tuple[str, str]] | None:
    """[(name bound, what it refers to)] of an import; None for `*` or a relative import."""
    if isinstance(node, ast.ImportFrom):
        if node.level or not node.module or any(a.name == "*" for a in node.names):
            return None
        return [(a.asname or a.name, f"{node.module}.{a.name}") for a in node.names]
    return [
        (a.asname, a.name) if a.asname else (a.name.split(".")[0], a.name.split(".")[0])
        for a in node.names
    ]


class Filter:
    """Decides which top-level statements of a learner's cell the grader runs."""

    def __init__(self, protected: Mapping[str, str | None], answers: Iterable[str]) -> None:
        self.protected = {**_ROOTS, **protected}
        for name in answers:
            self.protected.pop(name, None)

    def may_bind(self, name: str, refers_to: str | None = None) -> bool:
        """A learner may bind `name` unless the master or a decorator needs it as it is."""
        return name not in self.protected or (
            refers_to is not None and self.protected[name] == refers_to
        )

    def why_not(self, node: ast.stmt, classes: set[str]) -> str | None:
        """None if the grader runs this top-level statement, else why it does not."""
        if isinstance(node, ast.Import | ast.ImportFrom):
            bindings = _import_bindings(node)
            if bindings is None:
                return "a star or relative import"
            bad = [name for name, refers in bindings if not self.may_bind(name, refers)]
            return f"it would replace `{bad[0]}`" if bad else None
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return None  # a docstring
        if isinstance(node, ast.Pass):
            return None
        return self._definition(node, classes, {})

    def _definition(self, node: ast.stmt, classes: set[str], properties: dict) -> str | None:
        """Why a def, class or constant is not run (None when it is run)."""
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return self._function(node, properties)
        if isinstance(node, ast.ClassDef):
            return self._class(node, classes)
        targets = []
        if isinstance(node, ast.Assign):
            targets, value, annotation = node.targets, node.value, None
        elif isinstance(node, ast.AnnAssign):
            targets, value, annotation = [node.target], node.value, node.annotation
        if not targets:
            return "not a definition (only imports, def, class and NAME = value are run)"
        if not all(isinstance(t, ast.Name) for t in targets):
            return "it assigns to an attribute or an item, not to a name"
        if not plain(value) or not plain(annotation):
            return "its value calls something (only plain values are run)"
        bad = [t.id for t in targets if not self.may_bind(t.id) or t.id in properties]
        return f"it would replace `{bad[0]}`" if bad else None

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, properties: dict) -> str:
        """Why a def is not run (None when it is)."""
        if not self.may_bind(node.name):
            return f"it would replace `{node.name}`"
        for decorator in node.decorator_list:
            if not self._decorator(decorator, properties):
                return f"its decorator `{ast.unparse(decorator)}` is not one the grader runs"
        if not _plain_arguments(node.args) or not plain(node.returns):
            return "a default value or an annotation calls something"
        return None

    def _decorator(self, node: ast.expr, properties: dict) -> bool:
        """One of DECORATORS (maybe called with plain arguments), or `prop.setter` of a property."""
        if isinstance(node, ast.Call):
            arguments = [*node.args, *(k.value for k in node.keywords)]
            return all(map(plain, arguments)) and self._decorator(node.func, {})
        name = _dotted(node)
        if name is None:
            return False
        owner, _, attribute = name.rpartition(".")
        if owner in properties and attribute in ("setter", "getter", "deleter"):
            return True
        return name in DECORATORS  # their first names cannot be rebound (may_bind)

    def _class(self, node: ast.ClassDef, classes: set[str]) -> str | None:
        """Why a class is not run (None when it is)."""
        if not self.may_bind(node.name):
            return f"it would replace `{node.name}`"
        if node.keywords:
            return "a metaclass or class keyword"
        for base in node.bases:
            name = _dotted(base)
            if name not in classes and name not in BASES:
                return f"its base class `{ast.unparse(base)}` is not one the grader runs"
        for decorator in node.decorator_list:
            if not self._decorator(decorator, {}):
                return f"its decorator `{ast.unparse(decorator)}` is not one the grader runs"
        properties: dict[str, bool] = {}
        for statement in node.body:
            if isinstance(statement, ast.Pass) or (
                isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            ):
                continue
            hooks = _bound_names(statement) & _CLASS_HOOKS
            if hooks:
                return f"it defines `{hooks.pop()}`, which runs while classes are made"
            why = self._definition(statement, classes, properties)
            if why:
                return f"in its body, line {statement.lineno}: {why}"
            self._track_properties(statement, properties)
        return None

    @staticmethod
    def _track_properties(statement: ast.stmt, properties: dict) -> None:
        """Remember which names of a class body are properties (their .setter is allowed)."""
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            names = {_dotted(d) for d in statement.decorator_list}
            if "property" in names or any(
                n and n.endswith((".setter", ".getter", ".deleter")) for n in names
            ):
                properties[statement.name] = True
                return
            properties.pop(statement.name, None)


def _bound_names(node: ast.stmt) -> set[str]:
    """The names a statement binds in its own scope (not inside the functions it defines)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {name for name, _ in _import_bindings(node) or []}
    local = {  # a comprehension's variables stay inside it
        n.id
        for c in ast.walk(node)
        if isinstance(c, ast.comprehension)
        for n in ast.walk(c.target)
        if isinstance(n, ast.Name)
    }
    return {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    } - local


def _statement_lines(node: ast.stmt) -> range:
    """The lines (1-based) a top-level statement spans, its decorators included."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return range(first, (node.end_lineno or node.lineno) + 1)


def keep_definitions(source: str, keep: Filter) -> tuple[str, list[str]]:
    """(the cell with every statement the grader does not run commented out, why each was not)."""
    python = TransformerManager().transform_cell(source)  # magics and ! lines become calls
    lines = python.splitlines()
    try:
        tree = ast.parse(python)
    except SyntaxError as error:
        return "\n".join(MARK + line for line in lines), [f"a syntax error: {error.msg}"]
    dropped, notes, classes = set(), [], set()
    for node in tree.body:
        why = keep.why_not(node, classes)
        if why is None:  # a name rebound after its class no longer names a learner's class
            classes.difference_update(_bound_names(node))
            if isinstance(node, ast.ClassDef):
                classes.add(node.name)
        else:
            span = _statement_lines(node)
            dropped.update(span)
            notes.append(f"line {span.start}: `{lines[span.start - 1].strip()[:80]}` ({why})")
    for node in tree.body:  # a statement sharing a line with a dropped one goes too
        span = _statement_lines(node)
        if set(span) & dropped:
            dropped.update(span)
    if not dropped:
        return source, []
    kept = [MARK + line if number in dropped else line for number, line in enumerate(lines, 1)]
    return "\n".join(kept), notes


def _loaded(tree: ast.AST) -> set[str]:
    """The names an expression or statement reads."""
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def master_names(master: nbformat.NotebookNode) -> tuple[dict[str, str | None], set[str]]:
    """({name the tests need: the module it imports, or None}, {answer names}) of a master.

    Protected: every import of a locked cell, and every other name a locked cell binds at its
    top level and a locked cell reads (a learner's `tokenizer = my_function` would otherwise run
    the learner's code inside the master's next cell).
    """
    imports: dict[str, str] = {}
    bound: set[str] = set()
    needed: set[str] = set()
    answers: set[str] = set()
    for cell in master.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(TransformerManager().transform_cell(cell.source))
        except SyntaxError:
            continue
        for node in tree.body:
            if meta.get("solution"):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    answers.add(node.name)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                imports.update((name, refers) for name, refers in _import_bindings(node) or [])
            else:
                bound |= _bound_names(node)
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    needed |= _loaded(node)
        if not meta.get("solution"):  # tests, and locked cells that call what set-up made
            needed |= _loaded(tree)
    protected: dict[str, str | None] = dict.fromkeys(bound & needed)
    protected.update(imports)
    return protected, answers


class DefinitionsOnly(NbGraderPreprocessor):
    """Before the tests run: the learner's cells keep only their definitions (see the module)."""

    masters = Unicode("", help="The folder of the master notebooks (solutions/).").tag(config=True)

    def preprocess(self, nb, resources):
        """Comment out what the grader does not run in every cell that is not the master's."""
        info = resources.get("nbgrader", {})
        path = Path(self.masters) / info.get("assignment", "") / f"{info.get('notebook', '')}.ipynb"
        master = nbformat.read(path, as_version=4)
        locked = {
            cell.metadata["nbgrader"]["grade_id"]: cell.source
            for cell in master.cells
            if cell.metadata.get("nbgrader", {}).get("locked")
            and not cell.metadata["nbgrader"].get("solution")
        }
        keep = Filter(*master_names(master))
        for cell in nb.cells:
            grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
            if cell.cell_type != "code" or (grade_id in locked and locked[grade_id] == cell.source):
                continue
            cell.source, _ = keep_definitions(cell.source, keep)
        return nb, resources
