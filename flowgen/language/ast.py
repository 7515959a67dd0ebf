"""Typed AST of an `.opt` program.

Every node keeps its source position (``line``, ``column``, 1-based) so that
errors raised by later stages can point back at the statement that caused them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ----------------------------------------------------------------- expressions


@dataclass(frozen=True)
class Node:
    line: int = field(default=0, kw_only=True, compare=False)
    column: int = field(default=0, kw_only=True, compare=False)


@dataclass(frozen=True)
class Num(Node):
    """A numeric literal; ``text`` is how it was written (kept for printing)."""

    value: float
    text: str


@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class BinOp(Node):
    """``left op right`` with ``op`` one of ``+ - * / ^`` (``**`` is parsed as ``^``)."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Neg(Node):
    operand: Expr


@dataclass(frozen=True)
class Call(Node):
    """``func(args...)``: elementwise functions and the reductions ``sum mean norm``."""

    func: str
    args: tuple[Expr, ...]


Expr = Num | Name | BinOp | Neg | Call

ELEMENTWISE_FUNCS: dict[str, int] = {
    "sqrt": 1,
    "exp": 1,
    "log": 1,
    "abs": 1,
    "sign": 1,
    "min": 2,
    "max": 2,
}
REDUCTIONS: dict[str, int] = {"sum": 1, "mean": 1, "norm": 1}
FUNCTIONS: dict[str, int] = {**ELEMENTWISE_FUNCS, **REDUCTIONS}
RESERVED = ("w", "g", "t")

# ------------------------------------------------------------------ statements


@dataclass(frozen=True)
class HyperDecl(Node):
    name: str
    value: float
    text: str


@dataclass(frozen=True)
class StateDecl(Node):
    name: str
    init: Expr
    scalar: bool = False


@dataclass(frozen=True)
class Assign(Node):
    """``target = value`` inside ``update { ... }``."""

    target: str
    value: Expr


@dataclass(frozen=True)
class Program(Node):
    """A whole `.opt` file."""

    name: str
    description: str
    hypers: tuple[HyperDecl, ...]
    states: tuple[StateDecl, ...]
    update: tuple[Assign, ...]
    path: str = ""
    source: str = ""
    update_line: int = 0
    update_column: int = 0

    @property
    def hyper_defaults(self) -> dict[str, float]:
        return {h.name: h.value for h in self.hypers}

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    def state(self, name: str) -> StateDecl:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)


def walk(expr: Expr):
    """Yield every node of an expression tree, parents first."""
    yield expr
    if isinstance(expr, BinOp):
        yield from walk(expr.left)
        yield from walk(expr.right)
    elif isinstance(expr, Neg):
        yield from walk(expr.operand)
    elif isinstance(expr, Call):
        for a in expr.args:
            yield from walk(a)
