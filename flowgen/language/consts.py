"""Constant subexpressions, evaluated in float64 the way the generated code would.

A subexpression is *constant* when every name in it is a hyperparameter (or it
has no names at all): its value is known once the hyperparameters are. Its
value follows IEEE float64 arithmetic (numpy): ``1/0 = inf``, ``log(0) = -inf``,
``sqrt(-1) = (-8)^(1/3) = nan``. One case is refused instead of computed: an
*overflow*, where finite operands give an infinite result (``exp(710)``,
``2^1024``, ``1e300 * 1e300``, ``lr * 10`` at ``lr = 1e308``). Such a number
means a typo or a hyperparameter out of range, and flowgen says so where it is
written (see :func:`find_overflow`) rather than computing with ``inf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flowgen.language.ast import BinOp, Call, Expr, Name, Neg, Num, Program

__all__ = ["Overflow", "fold", "find_overflow", "hyper_names", "format_value"]

UNARY = {"sqrt": np.sqrt, "exp": np.exp, "log": np.log, "abs": np.abs, "sign": np.sign}
BINARY = {"min": np.minimum, "max": np.maximum}


class Overflow(ArithmeticError):
    """Finite operands, infinite result, at ``node``."""

    def __init__(self, node: Expr):
        super().__init__("float64 overflow")
        self.node = node


def _binop(op: str, a: np.float64, b: np.float64) -> np.float64:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    return np.power(a, b)


def fold(expr: Expr, values: Mapping[str, float]) -> np.float64 | None:
    """The float64 value of ``expr`` when every name in it is a key of ``values``, else None.

    Raises :class:`Overflow` at the first (innermost, leftmost) operation whose
    finite operands give an infinite result.
    """
    with np.errstate(over="raise", divide="ignore", invalid="ignore", under="ignore"):
        return _fold(expr, values)


def _fold(expr: Expr, values: Mapping[str, float]) -> np.float64 | None:
    if isinstance(expr, Num):
        return np.float64(expr.value)
    if isinstance(expr, Name):
        return np.float64(values[expr.id]) if expr.id in values else None
    if isinstance(expr, Neg):
        x = _fold(expr.operand, values)
        return None if x is None else -x
    if isinstance(expr, BinOp):
        a, b = _fold(expr.left, values), _fold(expr.right, values)
        if a is None or b is None:
            return None
        try:
            return np.float64(_binop(expr.op, a, b))
        except FloatingPointError:
            raise Overflow(expr) from None
    if isinstance(expr, Call):
        args = [_fold(a, values) for a in expr.args]
        if any(a is None for a in args) or expr.func not in UNARY | BINARY:
            return None  # reductions are never constant in a checked program
        fn = UNARY.get(expr.func) or BINARY[expr.func]
        try:
            return np.float64(fn(*args))
        except FloatingPointError:
            raise Overflow(expr) from None
    raise TypeError(f"not an expression node: {expr!r}")  # pragma: no cover


@dataclass(frozen=True)
class OverflowSite:
    """Where a constant subexpression overflows: the operation and its statement."""

    node: Expr
    owner: str  # "the update of `m`", "the initial value of state `m`", ...


def _sites(prog: Program):
    for s in prog.states:
        yield f"the initial value of state `{s.name}`", s.init
    for stmt in prog.update:
        yield f"the statement `{stmt.target} = ...`", stmt.value


def find_overflow(prog: Program, values: Mapping[str, float]) -> OverflowSite | None:
    """The first constant subexpression of ``prog`` (in source order) that overflows
    float64 with the hyperparameters at ``values``; None when there is none."""
    for owner, expr in _sites(prog):
        try:
            fold(expr, values)  # evaluates every constant subtree, left to right
        except Overflow as exc:
            return OverflowSite(exc.node, owner)
    return None


def hyper_names(expr: Expr, hypers) -> list[str]:
    """The hyperparameters read by ``expr``, in order of first appearance."""
    out: list[str] = []
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, Name) and e.id in hypers and e.id not in out:
            out.append(e.id)
        elif isinstance(e, BinOp):
            stack += [e.right, e.left]
        elif isinstance(e, Neg):
            stack.append(e.operand)
        elif isinstance(e, Call):
            stack += reversed(e.args)
    return out


def format_value(x: float) -> str:
    """A float as a user would write it: ``0.001``, ``1e+300``, ``nan``."""
    return repr(float(x))
