"""Size limits of a well-formed `.opt` program, checked on the AST.

A program within these limits is *well-formed* (with the syntax and the checks
of :mod:`flowgen.language.checks`), and every well-formed program runs as a
discrete optimizer. They exist so that every later stage (the generated
Python, which CPython parses with at most 200 nested parentheses; recursive
walks) works on any program that passes them; no hand-written update rule
comes near them.

* ``MAX_DEPTH``: operations (``+ - * / ^``, unary minus, function calls) nested
  in one expression, counted along the longest path from the statement to a
  leaf. ``exp(exp(g))`` has depth 2, ``g + g + g`` depth 2 (a chain of ``+`` is
  a nest of additions).
* ``MAX_EXPR_NODES``: nodes (numbers, names, operations, calls) of one expression.
* ``MAX_PROGRAM_NODES``: nodes of all expressions of the file together.

The derivation has stricter limits of its own (``flowgen.symbolic.budget``).
"""

from __future__ import annotations

from flowgen.language.ast import BinOp, Call, Expr, Neg

__all__ = ["MAX_DEPTH", "MAX_EXPR_NODES", "MAX_PROGRAM_NODES", "depth_and_size"]

MAX_DEPTH = 100
MAX_EXPR_NODES = 2_000
MAX_PROGRAM_NODES = 20_000


def _children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, BinOp):
        return (expr.left, expr.right)
    if isinstance(expr, Neg):
        return (expr.operand,)
    if isinstance(expr, Call):
        return expr.args
    return ()


def depth_and_size(expr: Expr) -> tuple[int, int, Expr]:
    """``(depth, nodes, deepest operation)`` of ``expr``, without recursion.

    The third item is the innermost operation at the maximal depth (``expr``
    itself for a leaf), where an error about the depth points.
    """
    best_depth, best_node, nodes = 0, expr, 0
    stack: list[tuple[Expr, int]] = [(expr, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        kids = _children(node)
        if kids:
            depth += 1
            if depth > best_depth:
                best_depth, best_node = depth, node
            stack.extend((k, depth) for k in kids)
    return best_depth, nodes, best_node
