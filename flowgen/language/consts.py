"""Constant subexpressions, evaluated in float64 the way the generated code would.

A subexpression is *constant* when every name in it is a hyperparameter (or it
has no names at all): its value is known once the hyperparameters are. Its
value follows IEEE float64 arithmetic as XLA computes it on CPU, where the
generated code runs:

* ``1/0 = inf``, ``log(0) = -inf``, ``sqrt(-1) = (-8)^(1/3) = nan``;
* ``a^b`` is C's ``pow`` (IEEE 754): ``(-inf)^0.5 = inf`` (numpy's ``power``
  takes a square root there and gives ``nan``: :func:`power` corrects it);
* subnormal numbers (magnitude below 2.2e-308) are flushed to zero, in the
  operands and in the result of every operation (XLA's CPU code runs with
  flush-to-zero), so ``log(1e-310) = -inf``.

One case is refused instead of computed: an *overflow*, where finite operands
give an infinite result (``exp(710)``, ``2^1024``, ``1e300 * 1e300``, ``lr * 10``
at ``lr = 1e308``). Such a number means a typo or a hyperparameter out of range,
and flowgen says so where it is written (see :func:`find_overflow`) rather than
computing with ``inf``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from flowgen.language.ast import BinOp, Call, Expr, Name, Neg, Num, Program

__all__ = [
    "Overflow",
    "apply",
    "find_overflow",
    "flush",
    "fold",
    "format_value",
    "hyper_names",
    "power",
]

UNARY = {"sqrt": np.sqrt, "exp": np.exp, "log": np.log, "abs": np.abs, "sign": np.sign}
BINARY = {"min": np.minimum, "max": np.maximum}
TINY = np.finfo(np.float64).tiny  # the smallest normal float64, 2.2250738585072014e-308


class Overflow(ArithmeticError):
    """Finite operands, infinite result, at ``node``."""

    def __init__(self, node: Expr):
        super().__init__("float64 overflow")
        self.node = node


def flush(x) -> np.float64:
    """Subnormal numbers to (signed) zero, as XLA's CPU code does."""
    x = np.float64(x)
    return np.copysign(np.float64(0.0), x) if 0 < abs(x) < TINY else x


def power(a: np.float64, b: np.float64) -> np.float64:
    """IEEE 754 ``pow``: numpy's ``power`` except its square-root shortcut at ``b = 0.5``
    (``pow(-inf, 0.5) = inf``, ``pow(-0, 0.5) = +0``)."""
    if b == 0.5 and a == 0:
        return np.float64(0.0)
    if b == 0.5 and np.isneginf(a):
        return np.float64(np.inf)
    return np.float64(np.power(a, b))


_ARITH = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide, "^": power}


def apply(op: str, args: list[np.float64]) -> np.float64:
    """One operation (``+ - * / ^``, ``neg`` or a function name) on float64 numbers,
    with flush-to-zero on operands and result; numpy's error state decides whether an
    overflow raises."""
    args = [flush(a) for a in args]
    if op == "neg":
        out = -args[0]
    elif op in _ARITH:
        out = _ARITH[op](*args)
    elif op in UNARY:
        out = UNARY[op](*args)
    else:
        out = BINARY[op](*args)
    return flush(np.float64(out))


def fold(expr: Expr, values: Mapping[str, float]) -> np.float64 | None:
    """The float64 value of ``expr`` when every name in it is a key of ``values``, else None.

    Raises :class:`Overflow` at the first (innermost, leftmost) operation whose
    finite operands give an infinite result.
    """
    with np.errstate(over="raise", divide="ignore", invalid="ignore", under="ignore"):
        return _fold(expr, values)


def _fold(expr: Expr, values: Mapping[str, float]) -> np.float64 | None:
    if isinstance(expr, Num):
        return flush(expr.value)
    if isinstance(expr, Name):
        return flush(values[expr.id]) if expr.id in values else None
    if isinstance(expr, Neg):
        x = _fold(expr.operand, values)
        return None if x is None else apply("neg", [x])
    if isinstance(expr, BinOp):
        a, b = _fold(expr.left, values), _fold(expr.right, values)
        if a is None or b is None:
            return None
        try:
            return apply(expr.op, [a, b])
        except FloatingPointError:
            raise Overflow(expr) from None
    if isinstance(expr, Call):
        args = [_fold(a, values) for a in expr.args]
        if any(a is None for a in args) or expr.func not in UNARY | BINARY:
            return None  # reductions are never constant in a checked program
        try:
            return apply(expr.func, args)
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
