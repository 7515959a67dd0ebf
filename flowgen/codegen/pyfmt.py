"""Deterministic formatting of generated Python, without running a formatter.

Generated modules must not depend on which tools happen to be installed: the
same spec gives the same bytes everywhere. The code generator therefore writes
code that is already in the style ``ruff format`` (and black) produces, so the
formatter has nothing to change (``tests/test_codegen.py`` checks that it is a
fixed point of ``ruff format`` on every library optimizer and on random
expressions). This module formats the one thing sympy's printer does not print
in that style, *expressions*:

* the printed text is parsed with :mod:`ast` and written back with the
  minimal parentheses that keep the same tree (so the same floating-point
  evaluation order), plus the ones ruff adds (``-(x**2)``);
* binary operators get one space on each side, except ``**`` between two
  *simple* operands (names, numbers, attribute chains, optionally negated),
  which hugs: ``x**2``, ``beta1**t``, but ``jnp.sqrt(v) ** 2``;
* numbers are normalised as ruff does (``1E-05`` → ``1e-05``, ``.5`` → ``0.5``);
  strings use double quotes.

Lines longer than :data:`LINE_LENGTH` are avoided by the generator itself
(temporaries, exploded containers), never wrapped here.
"""

from __future__ import annotations

import ast

LINE_LENGTH = 100

_BINOP = {
    ast.Add: ("+", 10),
    ast.Sub: ("-", 10),
    ast.Mult: ("*", 11),
    ast.Div: ("/", 11),
    ast.FloorDiv: ("//", 11),
    ast.Mod: ("%", 11),
    ast.MatMult: ("@", 11),
    ast.Pow: ("**", 14),
}
_UNARY = {ast.USub: "-", ast.UAdd: "+", ast.Invert: "~"}
_PREC_UNARY = 12
_PREC_ATOM = 20


def _prec(node: ast.AST) -> int:
    if isinstance(node, ast.BinOp):
        return _BINOP[type(node.op)][1]
    if isinstance(node, ast.UnaryOp):
        return _PREC_UNARY
    return _PREC_ATOM


def _number(text: str) -> str:
    """A numeric literal as ruff writes it."""
    t = text
    low = t.lower()
    if low.startswith(("0x", "0o", "0b")):
        return low[:2] + (t[2:].upper() if low.startswith("0x") else t[2:].lower())
    imag = low.endswith("j")
    body = low[:-1] if imag else low
    if "e" in body:
        mant, exp = body.split("e", 1)
        exp = exp.lstrip("+")
    else:
        mant, exp = body, None
    if mant.startswith("."):
        mant = "0" + mant
    if mant.endswith("."):
        mant += "0"
    out = mant + ("e" + exp if exp is not None else "")
    return out + ("j" if imag else "")


def _simple_power_operand(node: ast.AST) -> bool:
    if isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.Not):
        return _simple_power_operand(node.operand)
    if isinstance(node, ast.Name):
        return True
    if isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes):
        return True
    if isinstance(node, ast.Attribute):
        return _simple_power_operand(node.value) and not isinstance(node.value, ast.UnaryOp)
    return False


class _Writer:
    def __init__(self, source: str):
        self.source = source

    def paren(self, node: ast.AST, need: bool) -> str:
        text = self.write(node)
        return f"({text})" if need else text

    def write(self, node: ast.AST) -> str:
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, str):
                return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            if isinstance(v, bool) or v is None:
                return repr(v)
            seg = ast.get_source_segment(self.source, node)
            return _number(seg if seg is not None else repr(v))
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return self.paren(node.value, _prec(node.value) < _PREC_ATOM) + "." + node.attr
        if isinstance(node, ast.Call):
            args = [self.write(a) for a in node.args]
            args += [f"{k.arg}={self.write(k.value)}" for k in node.keywords]
            func = self.paren(node.func, _prec(node.func) < _PREC_ATOM)
            return f"{func}({', '.join(args)})"
        if isinstance(node, ast.Subscript):
            base = self.paren(node.value, _prec(node.value) < _PREC_ATOM)
            return f"{base}[{self.write(node.slice)}]"
        if isinstance(node, ast.Tuple):
            items = [self.write(e) for e in node.elts]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(node, ast.UnaryOp):
            op = _UNARY[type(node.op)]
            inner = node.operand
            # ruff parenthesises a power under a unary operator: -(x**2)
            need = _prec(inner) < _PREC_UNARY or (
                isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Pow)
            )
            return op + self.paren(inner, need)
        if isinstance(node, ast.BinOp):
            op, prec = _BINOP[type(node.op)]
            left, right = node.left, node.right
            if isinstance(node.op, ast.Pow):
                need_l = _prec(left) <= prec
                need_r = _prec(right) < _PREC_UNARY or _prec(right) == prec
            else:
                need_l = _prec(left) < prec
                need_r = _prec(right) <= prec
            ltxt = self.paren(left, need_l)
            rtxt = self.paren(right, need_r)
            hug = (
                isinstance(node.op, ast.Pow)
                and not need_l
                and not need_r
                and _simple_power_operand(left)
                and _simple_power_operand(right)
            )
            return f"{ltxt}{op}{rtxt}" if hug else f"{ltxt} {op} {rtxt}"
        raise ValueError(f"flowgen's formatter does not handle {type(node).__name__}")


def expr(code: str) -> str:
    """One Python expression, written in ruff's style (same syntax tree)."""
    tree = ast.parse(code.strip(), mode="eval")
    return _Writer(code.strip()).write(tree.body)


def string(s: str) -> str:
    """A string literal with double quotes."""
    return _Writer("").write(ast.Constant(s))


def container(
    head: str, items: list[str], tail: str, indent: str = "", *, tuple_: bool = False
) -> list[str]:
    """``head + items + tail`` on one line when it fits, else one item per line with a
    trailing comma (ruff's exploded form, kept by its magic trailing comma)."""
    inner = ", ".join(items) + ("," if tuple_ and len(items) == 1 else "")
    one = f"{indent}{head}{inner}{tail}"
    if len(one) <= LINE_LENGTH or not items:
        return [one]
    return [f"{indent}{head}", *(f"{indent}    {it}," for it in items), f"{indent}{tail}"]


def fit(code: str, room: int, fresh, temp_room: int) -> tuple[list[tuple[str, str]], str]:
    """``code`` written in ruff's style, moved into temporaries until it fits in ``room``.

    While the expression is longer than ``room``, its largest subexpression that fits in
    ``temp_room`` becomes a temporary (``fresh()`` names it). The tree is the same, only
    cut, so the floating-point evaluation is unchanged. Returns the temporaries as
    ``[(name, text), ...]`` in the order they must be assigned, and the final text.
    """
    src = code.strip()
    tree = ast.parse(src, mode="eval")
    writer = _Writer(src)
    temps: list[tuple[str, str]] = []
    while True:
        text = writer.write(tree.body)
        if len(text) <= room:
            return temps, text
        parents: dict[int, ast.AST] = {}
        for node in ast.walk(tree.body):
            for child in ast.iter_child_nodes(node):
                parents[id(child)] = node
        best, best_len = None, 0
        for node in ast.walk(tree.body):
            if node is tree.body or not isinstance(node, ast.expr):
                continue
            if isinstance(node, ast.Name | ast.Constant | ast.Attribute):
                continue  # nothing to gain
            parent = parents.get(id(node))
            if isinstance(parent, ast.Call) and parent.func is node:
                continue
            n = len(writer.write(node))
            if best_len < n <= temp_room:
                best, best_len = node, n
        if best is None:
            return temps, text
        name = fresh()
        temps.append((name, writer.write(best)))
        _replace(parents[id(best)], best, ast.Name(id=name, ctx=ast.Load()))


def _replace(parent: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for field, value in ast.iter_fields(parent):
        if value is old:
            setattr(parent, field, new)
            return
        if isinstance(value, list):
            for i, item in enumerate(value):
                if item is old:
                    value[i] = new
                    return
    raise AssertionError("not a child")  # pragma: no cover


def long_string_assignment(indent: str, target: str, value: str) -> list[str]:
    """``target = "..."`` as ruff writes it: in parentheses on its own line when that makes
    it fit, else on one (long) line."""
    lit = string(value)
    one = f"{indent}{target} = {lit}"
    if len(one) <= LINE_LENGTH or len(indent) + 4 + len(lit) > LINE_LENGTH:
        return [one]
    return [f"{indent}{target} = (", f"{indent}    {lit}", f"{indent})"]


def call_one_argument(indent: str, head: str, arg: str) -> list[str]:
    """``head(arg)`` as ruff writes it: split after the parenthesis when too long."""
    one = f"{indent}{head}({arg})"
    if len(one) <= LINE_LENGTH:
        return [one]
    return [f"{indent}{head}(", f"{indent}    {arg}", f"{indent})"]
