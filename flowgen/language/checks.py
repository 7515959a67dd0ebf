"""Static checks of a parsed `.opt` program (names, order, arity, shapes).

:func:`check_program` raises :class:`~flowgen.errors.OptCheckError` at the first
problem, in source order, pointing at the offending token. Values are either
*per-coordinate* (shape of ``w``: ``g``, ``w``, per-coordinate states) or
*scalar* (numbers, hyperparameters, ``t``, scalar states, reductions); locals
inherit the kind of their value. :func:`expr_is_scalar` and
:func:`local_kinds` expose this classification to later stages.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import NoReturn

from flowgen.errors import Location, OptCheckError, UsageError, location_in
from flowgen.language.ast import (
    FUNCTIONS,
    REDUCTIONS,
    RESERVED,
    Assign,
    BinOp,
    Call,
    Expr,
    HyperDecl,
    Name,
    Neg,
    Node,
    Num,
    Program,
    StateDecl,
)
from flowgen.language.consts import find_overflow, format_value, hyper_names
from flowgen.language.limits import (
    MAX_DEPTH,
    MAX_EXPR_NODES,
    MAX_PROGRAM_NODES,
    depth_and_size,
)
from flowgen.language.printer import to_text

__all__ = ["check_hyper_values", "check_program", "expr_is_scalar", "local_kinds"]

ROLES = {"w": "the parameters", "g": "the gradient", "t": "the step counter"}


# ------------------------------------------------------------------ helpers


def _location(prog: Program, line: int, column: int) -> Location:
    path = prog.path or "<string>"
    loc = location_in(path, prog.source, line, column)
    lines = prog.source.split("\n")
    text = lines[line - 1].rstrip("\r") if 1 <= line <= len(lines) else ""
    return replace(loc, source_line=text)


def _fail(
    prog: Program, at: Node | tuple[int, int], message: str, hint: str | None = None
) -> NoReturn:
    line, column = (at.line, at.column) if isinstance(at, Node) else at
    raise OptCheckError(message, location=_location(prog, line, column), hint=hint)


def _closest(word: str, candidates) -> str | None:
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(word: str, candidates, fallback: str | None = None) -> str | None:
    close = _closest(word, candidates)
    return f"did you mean `{close}`?" if close else fallback


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class _Kind:
    """What the checker knows of a value: scalar or not, and if it comes from a reduction."""

    scalar: bool
    reduced: bool = False


_PER_COORD = _Kind(False)
_SCALAR = _Kind(True)


# ------------------------------------------------------------- expressions


def _check_expr(prog: Program, expr: Expr, resolve: Callable[[Name], _Kind]) -> _Kind:
    """Check names and calls of ``expr`` left to right; return its kind."""
    if isinstance(expr, Num):
        if not math.isfinite(expr.value):
            _fail(prog, expr, f"the number `{expr.text}` is too large")
        return _SCALAR
    if isinstance(expr, Name):
        if expr.id in FUNCTIONS:
            args = "x, y" if FUNCTIONS[expr.id] == 2 else "x"
            _fail(
                prog,
                expr,
                f"`{expr.id}` is a function, not a value",
                hint=f"call it with parentheses, e.g. `{expr.id}({args})`",
            )
        return resolve(expr)
    if isinstance(expr, Neg):
        return _check_expr(prog, expr.operand, resolve)
    if isinstance(expr, BinOp):
        left = _check_expr(prog, expr.left, resolve)
        right = _check_expr(prog, expr.right, resolve)
        return _Kind(left.scalar and right.scalar, left.reduced or right.reduced)
    if isinstance(expr, Call):
        return _check_call(prog, expr, resolve)
    raise TypeError(f"not an expression node: {expr!r}")  # pragma: no cover


def _checked_expr(
    prog: Program, owner: Node, expr: Expr, resolve: Callable[[Name], _Kind]
) -> _Kind:
    """:func:`_check_expr`, reporting a too deeply nested expression at ``owner``."""
    try:
        return _check_expr(prog, expr, resolve)
    except RecursionError:
        _fail(
            prog,
            owner,
            "this expression is nested too deeply to check",
            hint="split it into several local assignments",
        )


def _check_call(prog: Program, call: Call, resolve: Callable[[Name], _Kind]) -> _Kind:
    func = call.func
    if func not in FUNCTIONS:
        known = _known_values(prog)
        if func in known:
            hint = f"`{func}` is {known[func]}, not a function; multiply with `*`: `{func} * (...)`"
        else:
            listing = ", ".join(FUNCTIONS)
            hint = _did_you_mean(func, FUNCTIONS, f"the functions are {listing}")
        _fail(prog, call, f"unknown function `{func}`", hint)
    arity = FUNCTIONS[func]
    if len(call.args) != arity:
        _fail(
            prog,
            call,
            f"`{func}` takes {_plural(arity, 'argument')}, got {len(call.args)}",
            hint=f"write `{func}({', '.join('xy'[:arity])})`" if arity <= 2 else None,
        )
    kinds = [_check_expr(prog, arg, resolve) for arg in call.args]
    if func in REDUCTIONS:
        (arg,) = kinds
        if arg.scalar:
            inner = call.args[0]
            if arg.reduced:
                message = f"reduction of a reduction: the argument of `{func}` is already a scalar"
            else:
                message = f"reduction of a scalar: the argument of `{func}` is already a scalar"
            what = f"`{inner.id}`" if isinstance(inner, Name) else "its argument"
            _fail(
                prog,
                call,
                message,
                hint=f"`{func}` turns a per-coordinate value into a scalar, and {what} is scalar; "
                f"drop the `{func}` or apply it to a per-coordinate value",
            )
        return _Kind(True, True)
    return _Kind(all(k.scalar for k in kinds), any(k.reduced for k in kinds))


def _known_values(prog: Program) -> dict[str, str]:
    known: dict[str, str] = dict(ROLES)
    known.update({h.name: "a hyperparameter" for h in prog.hypers})
    known.update({s.name: "a state" for s in prog.states})
    for stmt in prog.update:
        known.setdefault(stmt.target, "a local value")
    return known


# ------------------------------------------------------------ declarations


def _check_declarations(prog: Program) -> None:
    decls: list[HyperDecl | StateDecl] = sorted(
        [*prog.hypers, *prog.states], key=lambda d: (d.line, d.column)
    )
    seen: dict[str, HyperDecl | StateDecl] = {}
    for decl in decls:
        kind = "hyper" if isinstance(decl, HyperDecl) else "state"
        if decl.name in RESERVED:
            _fail(
                prog,
                decl,
                f"cannot declare `{decl.name}`: it is reserved for {ROLES[decl.name]}",
                hint="`w`, `g` and `t` are always available; choose another name",
            )
        if decl.name in FUNCTIONS:
            _fail(
                prog,
                decl,
                f"cannot declare `{decl.name}`: it is the name of a function",
                hint="choose another name",
            )
        first = seen.get(decl.name)
        if first is not None:
            first_kind = "hyper" if isinstance(first, HyperDecl) else "state"
            if first_kind == kind:
                message = f"{kind} `{decl.name}` is declared twice"
            else:
                message = f"`{decl.name}` is declared both as a hyper and as a state"
            _fail(
                prog,
                decl,
                message,
                hint=f"`{decl.name}` is first declared as a {first_kind} at line {first.line}",
            )
        seen[decl.name] = decl
        if isinstance(decl, HyperDecl) and not math.isfinite(decl.value):
            _fail(prog, decl, f"the value of hyper `{decl.name}` is too large: `{decl.text}`")


def _check_state_inits(prog: Program) -> None:
    hypers = {h.name for h in prog.hypers}
    states = set(prog.state_names)
    for state in prog.states:

        def resolve(node: Name, state=state) -> _Kind:
            if node.id in hypers:
                return _SCALAR
            if node.id == "w":
                return _PER_COORD
            allowed = "a state's initial value may use only hyperparameters, numbers and `w`"
            if node.id in ("g", "t"):
                _fail(
                    prog,
                    node,
                    f"the initial value of state `{state.name}` cannot use `{node.id}` "
                    f"({ROLES[node.id]})",
                    hint=allowed,
                )
            if node.id in states:
                _fail(
                    prog,
                    node,
                    f"the initial value of state `{state.name}` cannot use the state `{node.id}`",
                    hint=allowed,
                )
            _fail(
                prog,
                node,
                f"undeclared name `{node.id}`",
                hint=_did_you_mean(node.id, [*hypers, "w"], allowed),
            )
            raise AssertionError  # pragma: no cover - _fail raises

        kind = _checked_expr(prog, state, state.init, resolve)
        if state.scalar and not kind.scalar:
            _fail(
                prog,
                state,
                f"state `{state.name}` is scalar but its initial value is per-coordinate; "
                "reduce it with sum/mean/norm",
                hint="or drop `: scalar` to make the state per-coordinate",
            )


# ------------------------------------------------------------------ update


def _update_position(prog: Program) -> tuple[int, int]:
    return (prog.update_line or prog.line or 1, prog.update_column or prog.column or 1)


def _check_update(prog: Program) -> dict[str, _Kind]:
    if not prog.update:
        _fail(
            prog,
            _update_position(prog),
            "the update block is empty",
            hint="assign the new parameters in it, e.g. `w = w - lr * g`",
        )
    hypers = {h.name for h in prog.hypers}
    states = {s.name: s for s in prog.states}
    first_local: dict[str, Assign] = {}
    for stmt in prog.update:
        if stmt.target not in states and stmt.target not in ("w", "g", "t"):
            first_local.setdefault(stmt.target, stmt)

    locals_: dict[str, _Kind] = {}
    assigned: dict[str, Assign] = {}  # states and w assigned so far
    current: list[Assign] = []

    def resolve(node: Name) -> _Kind:
        name = node.id
        if name in ("w", "g"):
            return _PER_COORD
        if name == "t" or name in hypers:
            return _SCALAR
        if name in states:
            return _SCALAR if states[name].scalar else _PER_COORD
        if name in locals_:
            return locals_[name]
        if name in first_local:
            where = first_local[name]
            if where is current[0]:
                hint = (
                    f"`{name}` has no value before this assignment; "
                    "declare it as a `state` to use its value from the previous step"
                )
            else:
                hint = (
                    f"`{name}` is assigned at line {where.line}; "
                    "move that statement before this one"
                )
            _fail(prog, node, f"local `{name}` is used before it is assigned", hint)
        candidates = [*hypers, *states, "w", "g", "t", *locals_]
        _fail(
            prog,
            node,
            f"undeclared name `{name}`",
            hint=_did_you_mean(
                name,
                candidates,
                "declare it with `hyper NAME = NUMBER` or `state NAME = EXPR`, "
                "or assign it before this line",
            ),
        )
        raise AssertionError  # pragma: no cover - _fail raises

    for stmt in prog.update:
        target = stmt.target
        current[:] = [stmt]
        if target in ("g", "t"):
            _fail(
                prog,
                stmt,
                f"cannot assign to `{target}`: it is {ROLES[target]}, read-only",
                hint="assign a new local name instead",
            )
        if target in hypers:
            _fail(
                prog,
                stmt,
                f"cannot assign to `{target}`: it is a hyperparameter, read-only",
                hint="use a `state` for a value that changes from step to step, "
                "or a new local name",
            )
        if target in FUNCTIONS:
            _fail(
                prog,
                stmt,
                f"cannot assign to `{target}`: it is the name of a function",
                hint="choose another name",
            )
        if "w" in assigned:
            if target == "w":
                _fail(
                    prog,
                    stmt,
                    "`w` is assigned twice in the update",
                    hint=f"`w` is first assigned at line {assigned['w'].line}; "
                    "compute intermediate values in locals",
                )
            _fail(
                prog,
                stmt,
                f"`w` must be assigned last; `{target}` is assigned after it",
                hint=f"move `w = ...` (line {assigned['w'].line}) to the end of the update block",
            )
        if target in assigned:
            _fail(
                prog,
                stmt,
                f"state `{target}` is assigned twice in the update",
                hint=f"`{target}` is first assigned at line {assigned[target].line}; "
                "a state takes one new value per step, use locals for intermediate values",
            )
        if target in locals_:
            _fail(
                prog,
                stmt,
                f"local `{target}` is assigned twice",
                hint=f"`{target}` is first assigned at line {first_local[target].line}; "
                "give the new value another name",
            )

        kind = _checked_expr(prog, stmt, stmt.value, resolve)

        if target == "w" or target in states:
            if target in states and states[target].scalar and not kind.scalar:
                _fail(
                    prog,
                    stmt,
                    f"state `{target}` is scalar but the value is per-coordinate; "
                    "reduce it with sum/mean/norm",
                    hint=f"or declare it per-coordinate: `state {target} = ...`",
                )
            assigned[target] = stmt
        else:
            locals_[target] = kind

    if "w" not in assigned:
        _fail(
            prog,
            _update_position(prog),
            "the update never assigns `w`",
            hint="end the update block with the new parameters, e.g. `w = w - lr * g`",
        )
    return locals_


# ------------------------------------------------------------------ public


def _check_limits(prog: Program) -> None:
    """Depth and size of every expression (iteratively: before anything recurses)."""
    total = 0
    owners: list[tuple[Node, Expr]] = [(s, s.init) for s in prog.states]
    owners += [(stmt, stmt.value) for stmt in prog.update]
    for owner, expr in owners:
        depth, nodes, deepest = depth_and_size(expr)
        if depth > MAX_DEPTH:
            _fail(
                prog,
                deepest if deepest.line else owner,
                f"this expression nests {depth} operations (the limit is {MAX_DEPTH})",
                hint="split it into several local assignments",
            )
        if nodes > MAX_EXPR_NODES:
            _fail(
                prog,
                owner,
                f"this expression has {nodes} terms (the limit is {MAX_EXPR_NODES})",
                hint="split it into several local assignments",
            )
        total += nodes
        if total > MAX_PROGRAM_NODES:
            _fail(
                prog,
                owner,
                f"the program has more than {MAX_PROGRAM_NODES} terms in its expressions",
                hint="an update rule this long is out of flowgen's range",
            )


_FLOAT64_HINT = "float64 numbers reach about 1.8e308"


def _check_constants(prog: Program) -> None:
    """No constant subexpression overflows float64 at the hyperparameters' defaults."""
    site = find_overflow(prog, prog.hyper_defaults)
    if site is None:
        return
    hypers = hyper_names(site.node, prog.hyper_defaults)
    at = ", ".join(f"{h} = {prog.hyper_defaults[h]:g}" for h in hypers)
    _fail(
        prog,
        site.node,
        f"`{to_text(site.node)}` overflows float64" + (f" with {at}" if at else ""),
        hint=f"{_FLOAT64_HINT}; "
        + ("change the hyperparameter's value" if hypers else "this constant is infinite"),
    )


def check_hyper_values(prog: Program, values: Mapping[str, object]) -> dict[str, float]:
    """Validate hyperparameter overrides (``--set``, API keywords) of a checked program.

    Returns them as floats. Raises :class:`UsageError` for an unknown name, a
    value that is not a finite number, or one with which a constant
    subexpression of the program overflows float64 (located there).
    """
    known = list(prog.hyper_defaults)
    out: dict[str, float] = {}
    for name, raw in values.items():
        if name not in prog.hyper_defaults:
            close = _closest(name, known)
            hint = f"did you mean `{close}`?" if close else f"hyperparameters: {', '.join(known)}"
            if not known:
                hint = f"`{prog.name}` declares no hyperparameters"
            raise UsageError(
                f"--set {name}=...: `{prog.name}` has no hyperparameter `{name}`", hint=hint
            )
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise UsageError(
                f"--set {name}: `{raw}` is not a number", hint=f"e.g. --set {name}=0.01"
            ) from None
        if not math.isfinite(value):
            raise UsageError(
                f"--set {name}={raw}: the value of `{name}` must be a finite number",
                hint=f"{_FLOAT64_HINT}; give `{name}` a finite value",
            )
        out[name] = value
    merged = {**prog.hyper_defaults, **out}
    site = find_overflow(prog, merged)
    if site is not None:
        hypers = hyper_names(site.node, merged)
        culprits = [h for h in hypers if h in out] or hypers
        shown = " ".join(f"{h}={format_value(merged[h])}" for h in culprits)
        raise UsageError(
            f"--set {shown}: `{to_text(site.node)}` overflows float64 at this value",
            location=_location(prog, site.node.line, site.node.column),
            hint=f"{_FLOAT64_HINT}; choose a smaller value",
        )
    return out


def check_program(prog: Program) -> None:
    """Check a parsed program; raises :class:`OptCheckError` at the first problem.

    In order: the size limits of :mod:`flowgen.language.limits`, declarations,
    state initial values, the update block, and constant subexpressions
    (no float64 overflow at the hyperparameters' defaults).
    """
    _check_limits(prog)
    try:
        _check_declarations(prog)
        _check_state_inits(prog)
        _check_update(prog)
    except RecursionError:  # pragma: no cover - the limits keep expressions shallow
        _fail(
            prog,
            (prog.line or 1, prog.column or 1),
            "an expression is nested too deeply to check",
            hint="split it into several local assignments",
        )
    _check_constants(prog)


def local_kinds(prog: Program) -> dict[str, bool]:
    """``{local name: is scalar}`` for every local of a checked program, in update order."""
    return {name: kind.scalar for name, kind in _check_update(prog).items()}


def expr_is_scalar(
    expr: Expr, prog: Program, local_scalars: Mapping[str, bool] | None = None
) -> bool:
    """Whether ``expr`` is scalar-valued in ``prog`` (locals from ``local_scalars``).

    Unknown names count as per-coordinate; the program is assumed to be checked.
    """
    hypers = {h.name for h in prog.hypers}
    states = {s.name: s.scalar for s in prog.states}
    local_scalars = local_scalars or {}

    def scalar(e: Expr) -> bool:
        if isinstance(e, Num):
            return True
        if isinstance(e, Name):
            if e.id == "t" or e.id in hypers:
                return True
            if e.id in states:
                return states[e.id]
            return bool(local_scalars.get(e.id, False))
        if isinstance(e, Neg):
            return scalar(e.operand)
        if isinstance(e, BinOp):
            return scalar(e.left) and scalar(e.right)
        if isinstance(e, Call):
            return e.func in REDUCTIONS or all(scalar(a) for a in e.args)
        return False

    return scalar(expr)
