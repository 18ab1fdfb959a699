"""Program mutations for SWE task synthesis (as SWE-smith does): small, documented bug-introducing
transformations of Python source, and the problem-statement template of the bugs they make.

    sites = mutation_sites(source, "pkg/core.py", covered={("median", 12)})
    text = apply_mutation(source, sites[0])

Transformations (``Mutation.kind``), each one site at a time, inside functions only:

- ``compare_swap``: a comparison operator swapped: ``<`` <-> ``<=``, ``>`` <-> ``>=``,
  ``==`` <-> ``!=``, ``in`` <-> ``not in``, ``is`` <-> ``is not``;
- ``binop_swap``: an arithmetic operator swapped: ``+`` <-> ``-``, ``*`` <-> ``/``,
  ``//`` -> ``*``, ``%`` -> ``//``;
- ``boolop_swap``: ``and`` <-> ``or`` (between the first two operands);
- ``off_by_one``: an integer literal ``k`` in an index, a slice, a ``range(...)`` call or a
  comparison becomes ``k + 1``;
- ``remove_condition``: an ``if`` statement without ``else`` is removed with its body (the
  guard and what it guards; ``pass`` when it was the only statement of its block).

Edits touch only the operator, literal or statement (the rest of the file is unchanged), and only
when the operands sit on one line; a mutated file must still parse. Which sites are tried, which
are kept (those that break at least one passing test) and how instances are made is
kat_jax.envs.swe_mining.synthesize_instances.

Problem statement (STATEMENT_TEMPLATE): the failing tests, then the first failure's pytest report
(its last STATEMENT_REPORT_CHARS characters), then a request to fix the code, not the tests.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from collections.abc import Iterable, Sequence

COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                 ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
                 ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
               ast.FloorDiv: ast.Mult, ast.Mod: ast.FloorDiv}
BOOLOP_SWAPS = {ast.And: ast.Or, ast.Or: ast.And}
TOKENS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
          ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+",
          ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
          ast.And: "and", ast.Or: "or"}
KINDS = ("compare_swap", "binop_swap", "boolop_swap", "off_by_one", "remove_condition")
STATEMENT_REPORT_CHARS = 1500
STATEMENT_TEMPLATE = """\
Some tests of the project fail.

These tests fail:
{tests}

The first failure ({first}):

```
{report}
```

Fix the code so that these tests pass, without changing the tests.
"""


@dataclasses.dataclass(frozen=True)
class Mutation:
    """Replace the text from (``line``, ``col``) to (``end_line``, ``end_col``) (1-based lines,
    UTF-8 byte columns, as ast gives them) of ``path`` by ``new``."""

    path: str
    function: str
    kind: str
    line: int
    col: int
    end_line: int
    end_col: int
    new: str
    description: str


def _gap_edit(lines: list[bytes], left: ast.AST, right: ast.AST, old: str, new: str
              ) -> tuple[int, int, int, str] | None:
    """The edit of the operator token ``old`` between two operands on one line."""
    if left.end_lineno != right.lineno:
        return None
    raw = lines[right.lineno - 1][left.end_col_offset:right.col_offset].decode()
    words = raw.replace("(", " ").replace(")", " ").split()
    if " ".join(words) != old:
        return None
    at = raw.index(old.split()[0])
    end = raw.index(old.split()[-1], at) + len(old.split()[-1])
    start, stop = left.end_col_offset + len(raw[:at].encode()), \
        left.end_col_offset + len(raw[:end].encode())
    return right.lineno, start, stop, new


def _functions(tree: ast.AST) -> Iterable[tuple[str, ast.AST]]:
    """(qualified name, node) of every function, methods and nested functions included."""
    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


def _first_line(fn: ast.AST) -> int:
    return min([fn.lineno, *(d.lineno for d in fn.decorator_list)])


def _own_nodes(fn: ast.AST) -> Iterable[ast.AST]:
    """The nodes of a function's body, not those of functions or classes nested in it."""
    todo = list(fn.body)
    while todo:
        node = todo.pop(0)
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node)
                    if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                          ast.Lambda)))


def _int_literals(node: ast.AST) -> Iterable[ast.Constant]:
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            yield n


def mutation_sites(source: str, path: str,
                   covered: set[tuple[str, int]] | None = None) -> list[Mutation]:
    """Every mutation of the module docstring in ``source`` (file ``path``), in functions whose
    (name, first line) is in ``covered`` (``co_name``, ``co_firstlineno``: the first decorator's
    line) when given; in source order."""
    tree = ast.parse(source)
    lines = source.encode().split(b"\n")
    text_lines = source.split("\n")
    out: list[Mutation] = []
    for qual, fn in _functions(tree):
        if covered is not None and (fn.name, _first_line(fn)) not in covered:
            continue
        where = f"{path}:{qual}"
        for node in _own_nodes(fn):
            edits: list[tuple[str, tuple[int, int, int, str] | None, str]] = []
            if isinstance(node, ast.Compare) and len(node.ops) == 1 and \
                    type(node.ops[0]) in COMPARE_SWAPS:
                old, new = TOKENS[type(node.ops[0])], TOKENS[COMPARE_SWAPS[type(node.ops[0])]]
                edits.append(("compare_swap", _gap_edit(lines, node.left, node.comparators[0],
                                                        old, new), f"`{old}` -> `{new}`"))
            elif isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
                old, new = TOKENS[type(node.op)], TOKENS[BINOP_SWAPS[type(node.op)]]
                edits.append(("binop_swap", _gap_edit(lines, node.left, node.right, old, new),
                              f"`{old}` -> `{new}`"))
            elif isinstance(node, ast.BoolOp):
                old, new = TOKENS[type(node.op)], TOKENS[BOOLOP_SWAPS[type(node.op)]]
                edits.append(("boolop_swap", _gap_edit(lines, node.values[0], node.values[1],
                                                       old, new), f"`{old}` -> `{new}`"))
            bounds: list[ast.AST] = []
            if isinstance(node, ast.Subscript):
                bounds = [node.slice]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id == "range":
                bounds = list(node.args)
            elif isinstance(node, ast.Compare):
                bounds = [node.left, *node.comparators]
            for b in bounds:
                for c in _int_literals(b):
                    if c.lineno == c.end_lineno:
                        edits.append(("off_by_one",
                                      (c.lineno, c.col_offset, c.end_col_offset, str(c.value + 1)),
                                      f"`{c.value}` -> `{c.value + 1}`"))
            for kind, edit, what in edits:
                if edit is not None:
                    line, col, end_col, new = edit
                    out.append(Mutation(path, qual, kind, line, col, line, end_col, new,
                                        f"{kind}: {what} in {where} (line {line})"))
        for block in _blocks(fn):
            for stmt in block:
                if isinstance(stmt, ast.If) and not stmt.orelse:
                    indent = text_lines[stmt.lineno - 1][:stmt.col_offset]
                    new = f"{indent}pass\n" if len(block) == 1 else ""
                    out.append(Mutation(path, qual, "remove_condition", stmt.lineno, 0,
                                        stmt.end_lineno + 1, 0, new,
                                        f"remove_condition: the `if` at line {stmt.lineno} "
                                        f"removed in {where}"))
    return sorted(dict.fromkeys(out), key=lambda m: (m.line, m.col, m.kind))


def _blocks(fn: ast.AST) -> Iterable[list[ast.stmt]]:
    """The statement lists of a function (its body and nested blocks, not nested functions)."""
    todo = [fn.body]
    while todo:
        block = todo.pop(0)
        yield block
        for stmt in block:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            for field in ("body", "orelse", "finalbody"):
                sub = getattr(stmt, field, None)
                if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                    todo.append(sub)
            for h in getattr(stmt, "handlers", []):
                todo.append(h.body)


def apply_mutation(source: str, m: Mutation) -> str | None:
    """``source`` with ``m`` applied, or None when the result does not parse or is unchanged."""
    lines = source.encode().split(b"\n")
    if m.end_line > len(lines) + 1:
        return None
    head = b"\n".join(lines[:m.line - 1]) + (b"\n" if m.line > 1 else b"")
    if m.end_col == 0 and m.col == 0 and m.end_line > m.line:        # whole lines
        tail = b"\n".join(lines[m.end_line - 1:])
        out = head + m.new.encode() + tail
    else:
        row = lines[m.line - 1]
        out = head + row[:m.col] + m.new.encode() + row[m.end_col:] + \
            (b"\n" + b"\n".join(lines[m.line:]) if m.line < len(lines) else b"")
    text = out.decode()
    if text == source:
        return None
    try:
        ast.parse(text)
    except SyntaxError:
        return None
    return text


def file_diff(path: str, old: str, new: str) -> str:
    """A git-style patch of one file from ``old`` to ``new`` text (``git apply`` reads it)."""
    body = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                f"a/{path}", f"b/{path}")
    lines = []
    for ln in body:
        lines.append(ln if ln.endswith("\n") else ln + "\n\\ No newline at end of file\n")
    return f"diff --git a/{path} b/{path}\n" + "".join(lines) if lines else ""


def statement(failing: Sequence[str], report: str) -> str:
    """The problem statement of a synthesised bug (STATEMENT_TEMPLATE)."""
    report = report.strip()
    if len(report) > STATEMENT_REPORT_CHARS:
        report = "...\n" + report[-STATEMENT_REPORT_CHARS:]
    return STATEMENT_TEMPLATE.format(tests="\n".join(f"- {t}" for t in failing),
                                     first=failing[0], report=report)
