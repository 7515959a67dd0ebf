"""The discrete optimizer as data: what code generation needs to write ``init_state``
and ``step``, built from the checked AST alone.

This is the first of flowgen's two levels of acceptance. Every well-formed
program (it parses, passes :func:`flowgen.language.check_program`, and its
hyperparameters pass :func:`flowgen.language.checks.check_hyper_values`) has a
:class:`DiscreteSpec`, and so a generated ``step``: building one runs no
symbolic algebra and makes no assumption about the update (smoothness, rates,
stability). The derivation (:func:`flowgen.flow.build_flow`) is the second
level; it may refuse a program, always with a located reason, and its
:class:`~flowgen.flow.spec.FlowSpec` carries the :class:`DiscreteSpec` it was
built on.

Values keep the kinds of :mod:`flowgen.language.checks`: per-coordinate (the
shape of ``w``) or scalar; ``scalar`` below is that kind for each value, so
that code generation can broadcast a scalar value assigned to ``w`` or to a
per-coordinate state to ``w``'s shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from flowgen.language.ast import Expr, Program
from flowgen.language.checks import check_hyper_values, expr_is_scalar, local_kinds

__all__ = ["DiscreteSpec", "DiscreteState", "DiscreteStatement", "build_discrete"]


@dataclass(frozen=True)
class DiscreteState:
    name: str
    scalar: bool  # declared `: scalar`
    init: Expr  # in hyperparameters, numbers and w
    init_scalar: bool  # the initial value is scalar-valued (broadcast when the state is not)
    line: int = 0


@dataclass(frozen=True)
class DiscreteStatement:
    target: str
    role: str  # state | local | w
    value: Expr
    value_scalar: bool  # the value is scalar-valued
    target_scalar: bool  # the target holds a scalar (a scalar state, or a scalar local)
    line: int = 0


@dataclass(frozen=True)
class DiscreteSpec:
    """One optimizer's discrete step at given hyperparameters, as checked AST."""

    name: str
    description: str
    path: str
    sha256: str
    source: str
    hyper: dict[str, float]
    states: tuple[DiscreteState, ...]
    statements: tuple[DiscreteStatement, ...]
    program: Program

    def state(self, name: str) -> DiscreteState:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)


def build_discrete(program: Program, overrides: Mapping[str, object] | None = None) -> DiscreteSpec:
    """The :class:`DiscreteSpec` of a checked ``program`` (``overrides`` replace the
    hyperparameters' defaults; they are validated here, see ``check_hyper_values``)."""
    values = dict(program.hyper_defaults)
    values.update(check_hyper_values(program, overrides or {}))
    kinds = local_kinds(program)
    states = {s.name: s for s in program.states}
    out_states = tuple(
        DiscreteState(s.name, s.scalar, s.init, expr_is_scalar(s.init, program, kinds), line=s.line)
        for s in program.states
    )
    statements = []
    for stmt in program.update:
        if stmt.target == "w":
            role, target_scalar = "w", False
        elif stmt.target in states:
            role, target_scalar = "state", states[stmt.target].scalar
        else:
            role, target_scalar = "local", kinds[stmt.target]
        statements.append(
            DiscreteStatement(
                stmt.target,
                role,
                stmt.value,
                expr_is_scalar(stmt.value, program, kinds),
                target_scalar,
                line=stmt.line,
            )
        )
    return DiscreteSpec(
        name=program.name,
        description=program.description,
        path=program.path,
        sha256=hashlib.sha256(program.source.encode()).hexdigest(),
        source=program.source,
        hyper=values,
        states=out_states,
        statements=tuple(statements),
        program=program,
    )
