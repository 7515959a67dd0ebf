"""Print AST expressions back as `.opt` text, with as few parentheses as the grammar allows.

``to_text(parse(x))`` reads as ``x`` did, up to spacing and redundant parentheses:
numbers keep the text they were written with, ``**`` prints as ``^``. The
precedence levels are the grammar's, loosest first: ``+ -``, ``* /``, unary
minus, ``^`` (right-associative, tighter than a unary minus on its left).
A parenthesis is kept wherever dropping it would change the tree, including
``a - (b - c)`` and ``a + (b + c)``: floating-point addition is not associative,
so the printed text must evaluate in the same order as the tree.
"""

from __future__ import annotations

from flowgen.language.ast import BinOp, Call, Expr, Name, Neg, Num

__all__ = ["ATOM", "PRECEDENCE", "to_text", "precedence"]

ADD, MUL, UNARY, POW, ATOM = 1, 2, 3, 4, 5
PRECEDENCE = {"+": ADD, "-": ADD, "*": MUL, "/": MUL, "^": POW}


def precedence(expr: Expr) -> int:
    """The binding strength of the outermost operation of ``expr``."""
    if isinstance(expr, BinOp):
        return PRECEDENCE[expr.op]
    if isinstance(expr, Neg):
        return UNARY
    if isinstance(expr, Num) and expr.text.startswith("-"):
        return UNARY
    return ATOM


def needs_parens(parent: Expr, child: Expr, side: str) -> bool:
    """Whether ``child``, operand ``side`` ("left", "right", "operand") of ``parent``,
    must be parenthesised to keep the tree."""
    inner = precedence(child)
    if isinstance(parent, Neg):
        return inner < UNARY or isinstance(child, Neg)
    assert isinstance(parent, BinOp)
    outer = PRECEDENCE[parent.op]
    if parent.op == "^":
        # a ^ b: the base is an atom; the exponent may be a power (right-assoc) or negated
        return inner < ATOM if side == "left" else inner < UNARY
    if side == "left":
        return inner < outer
    return inner <= outer


def _wrap(text: str, yes: bool) -> str:
    return f"({text})" if yes else text


def to_text(expr: Expr) -> str:
    """``expr`` as `.opt` source text."""
    if isinstance(expr, Num):
        return expr.text
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, Neg):
        return "-" + _wrap(to_text(expr.operand), needs_parens(expr, expr.operand, "operand"))
    if isinstance(expr, BinOp):
        left = _wrap(to_text(expr.left), needs_parens(expr, expr.left, "left"))
        right = _wrap(to_text(expr.right), needs_parens(expr, expr.right, "right"))
        if expr.op == "^":
            return f"{left}^{right}"
        return f"{left} {expr.op} {right}"
    if isinstance(expr, Call):
        return f"{expr.func}({', '.join(to_text(a) for a in expr.args)})"
    raise TypeError(f"not an expression node: {expr!r}")  # pragma: no cover
