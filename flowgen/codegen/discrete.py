"""Print the discrete step of a :class:`~flowgen.flow.discrete.DiscreteSpec` as JAX code,
straight from the checked AST.

The generated ``step`` computes what the file says, in the order it says it, in
IEEE float64 arithmetic — right values by construction, with no symbolic
rewriting in between:

* each statement is one assignment, its expression printed from the AST with
  the parentheses the grammar's precedence needs (``a + (b + c)`` stays so:
  float addition is not associative);
* every *constant* subexpression (numbers and functions of numbers only) is
  evaluated here in float64 as XLA would (:func:`flowgen.language.consts.apply`:
  C's ``pow``, subnormals flushed to zero) and printed as
  a float literal (``repr`` round-trips exactly; ``1e20`` prints as ``1e+20``,
  never as an integer beyond int64) or as ``jnp.inf``/``jnp.nan``; so no Python
  arithmetic on numbers is left in the module (``1/0`` would raise, and
  ``(-8)**(1/3)`` would be complex in Python, where float64 gives ``inf`` and ``nan``);
* hyperparameters and ``t`` enter as arrays of ``w``'s dtype, so that every
  operation is a ``jnp`` one: non-real results are ``nan``, never complex;
* reductions print as ``jnp.sum``/``jnp.mean`` of their argument as written, so
  ``sum(g*0 + 1)`` keeps its size n; ``norm(x)`` is ``sqrt(sum(x^2))``;
* a scalar value assigned to ``w`` or to a per-coordinate state is broadcast to
  ``w``'s shape (``jnp.full_like``); a scalar state is a 0-d array of ``w``'s dtype.
"""

from __future__ import annotations

import math

import numpy as np

from flowgen.language.ast import BinOp, Call, Expr, Name, Neg, Num
from flowgen.language.consts import apply, flush
from flowgen.language.printer import ADD, ATOM, MUL, POW, PRECEDENCE, UNARY

__all__ = ["float_literal", "jax_expr"]

_FUNCS = {
    "sqrt": "jnp.sqrt",
    "exp": "jnp.exp",
    "log": "jnp.log",
    "abs": "jnp.abs",
    "sign": "jnp.sign",
    "min": "jnp.minimum",
    "max": "jnp.maximum",
    "sum": "jnp.sum",
    "mean": "jnp.mean",
}
_NUMPY = ("sqrt", "exp", "log", "abs", "sign", "min", "max")


def float_literal(x: float) -> tuple[str, int]:
    """Python source for the float64 ``x`` and its precedence: ``repr`` for finite
    values (exact round trip), ``jnp.inf``/``-jnp.inf``/``jnp.nan`` otherwise."""
    x = float(x)
    if math.isnan(x):
        return "jnp.nan", ATOM
    if math.isinf(x):
        return ("jnp.inf", ATOM) if x > 0 else ("-jnp.inf", UNARY)
    text = repr(x)
    return text, (UNARY if text.startswith("-") else ATOM)


def _const(e: Expr, children: list[np.float64 | None]) -> np.float64 | None:
    """The float64 value of ``e`` when its operands are constants (else None), computed
    as the generated code would compute it (:func:`flowgen.language.consts.apply`)."""
    if any(c is None for c in children):
        return None
    if isinstance(e, Call) and e.func not in _NUMPY:
        return None  # a reduction: never of a constant in a checked program
    op = "neg" if isinstance(e, Neg) else e.op if isinstance(e, BinOp) else e.func
    with np.errstate(all="ignore"):
        return apply(op, children)


def _paren(text: str, yes: bool) -> str:
    return f"({text})" if yes else text


def jax_expr(expr: Expr, names: dict[str, str]) -> str:
    """``expr`` as a JAX expression; ``names`` maps `.opt` names to Python names."""
    return _print(expr, names)[0]


def _print(e: Expr, names: dict[str, str]) -> tuple[str, int, np.float64 | None]:
    """``(text, precedence, constant value or None)``."""
    if isinstance(e, Num):
        value = flush(e.value)
        return (*float_literal(value), value)
    if isinstance(e, Name):
        return names.get(e.id, e.id), ATOM, None
    if isinstance(e, Neg):
        parts = [_print(e.operand, names)]
    elif isinstance(e, BinOp):
        parts = [_print(e.left, names), _print(e.right, names)]
    elif isinstance(e, Call):
        parts = [_print(a, names) for a in e.args]
    else:  # pragma: no cover
        raise TypeError(f"not an expression node: {e!r}")
    value = _const(e, [p[2] for p in parts])
    if value is not None:
        return (*float_literal(value), value)
    if isinstance(e, Neg):
        text, prec, _ = parts[0]
        return "-" + _paren(text, prec < UNARY or text.startswith("-")), UNARY, None
    if isinstance(e, BinOp):
        (lt, lp, _), (rt, rp, _) = parts
        outer = PRECEDENCE[e.op]
        if e.op == "^":
            return f"{_paren(lt, lp < ATOM)} ** {_paren(rt, rp < UNARY)}", POW, None
        op = e.op
        return f"{_paren(lt, lp < outer)} {op} {_paren(rt, rp <= outer)}", outer, None
    args = [p[0] for p in parts]
    if e.func == "norm":
        return f"jnp.sqrt(jnp.sum(jnp.square({args[0]})))", ATOM, None
    return f"{_FUNCS[e.func]}({', '.join(args)})", ATOM, None


assert ADD < MUL < UNARY < POW < ATOM
