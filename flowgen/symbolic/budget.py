"""Budgets of the derivation: what it accepts before sympy sees the program, and how
long it may work on it.

The derivation is the second level of acceptance: it may refuse a well-formed
file, always with a located reason (the discrete step never needs it). Two
kinds of budget keep its work bounded.

**Limits on the AST** (:func:`check_derivable`), checked before any sympy
expression is built, because sympy evaluates numbers eagerly and exactly
(``9^9^9`` is an integer with 369 million digits) and its algorithms are
exponential in the size of what they expand:

* ``MAX_EXPONENT``: a constant exponent (numbers only) is at most 64 in
  absolute value (``x^2``, ``beta^0.5`` pass; ``2^2^2^2^2`` does not);
* constants (numbers and functions of numbers) are finite and real in float64:
  ``1/0``, ``log(0)``, ``sqrt(-1)`` and ``(-8)^(1/3)`` have no derivation
  (the discrete step computes them as ``inf`` and ``nan``);
* ``MAX_INLINED_DEPTH`` and ``MAX_INLINED_NODES``: each statement, with the
  locals and the new values of states it reads substituted (as the derivation
  sees it), nests at most 32 operations and has at most 2,000 nodes.

**A time budget** (:func:`time_budget`): the whole derivation gets
``DERIVATION_SECONDS`` (4) seconds of CPU time. CPU time, not wall time, so that
the same file is accepted or refused whatever else the machine runs. It is
enforced two ways:

* cooperatively: the derivation calls :func:`stage` when it starts on a
  statement and :func:`check` inside its loops; both raise once the budget is
  spent, naming the statement being derived;
* preemptively, only when the caller is the main thread of the process and
  ``SIGPROF`` has no handler of its own: a CPU-time interval timer
  (``setitimer(ITIMER_PROF)``) interrupts a single sympy call that runs too long
  (a ``factor`` of a huge expression gives no chance to check). The handler is
  installed for the duration of the derivation only and the previous handler
  and timer are restored, so no thread is started and nothing outlives the call;
  in another thread, or when the application uses ``SIGPROF`` itself (a
  profiler), the cooperative checks alone apply.

The interruption is a :class:`BaseException` (like ``KeyboardInterrupt``), so
that no ``except Exception`` inside sympy swallows it; the timer re-fires every
0.25 s until the derivation has stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from flowgen.errors import DerivationError, location_in
from flowgen.language.ast import BinOp, Call, Expr, Name, Neg, Node, Num, Program
from flowgen.language.consts import Overflow, fold
from flowgen.language.printer import to_text

__all__ = [
    "DERIVATION_SECONDS",
    "MAX_EXPONENT",
    "MAX_INLINED_DEPTH",
    "MAX_INLINED_NODES",
    "BudgetExceeded",
    "check",
    "check_derivable",
    "stage",
    "time_budget",
]

MAX_EXPONENT = 64
MAX_INLINED_DEPTH = 32
MAX_INLINED_NODES = 2_000
DERIVATION_SECONDS = 4.0


class BudgetExceeded(DerivationError):
    """The derivation ran out of its time budget."""


def _error(prog: Program, node: Node | None, message: str, hint: str | None = None):
    loc = None
    if node is not None and node.line:
        loc = location_in(prog.path or "<string>", prog.source, node.line, node.column)
    return DerivationError(message, location=loc, hint=hint)


# ------------------------------------------------------------------ AST limits


def _constants_and_exponents(prog: Program, owner: str, expr: Expr) -> None:
    """Every number-only subexpression is finite and real; constant exponents are small."""
    stack = [expr]
    while stack:
        e = stack.pop()
        try:
            value = fold(e, {})
        except Overflow:  # pragma: no cover - the checker refuses overflows
            value = np.float64("inf")
        if value is not None and not isinstance(e, Num):
            if not bool(abs(value) < float("inf")):
                what = "not a number (nan)" if value != value else f"{float(value)!r}"
                raise _error(
                    prog,
                    e,
                    f"`{to_text(e)}` in {owner} is {what} in float64; "
                    "the derivation needs finite real constants",
                    hint="the discrete optimizer computes it as such (flowgen codegen, run)",
                )
        if isinstance(e, BinOp):
            if e.op == "^":
                exponent = fold(e.right, {})
                if exponent is not None and not bool(abs(exponent) <= MAX_EXPONENT):
                    raise _error(
                        prog,
                        e,
                        f"the exponent `{to_text(e.right)}` in {owner} is larger than "
                        f"{MAX_EXPONENT} in absolute value, too large for the derivation",
                        hint="exact symbolic powers that large are out of the derivation's "
                        "range; the discrete optimizer still runs (flowgen codegen, run)",
                    )
            stack += [e.right, e.left]
        elif isinstance(e, Neg):
            stack.append(e.operand)
        elif isinstance(e, Call):
            stack += reversed(e.args)


@dataclass(frozen=True)
class _Shape:
    depth: int
    nodes: int


def _inlined(expr: Expr, env: Mapping[str, _Shape]) -> _Shape:
    """Depth and size of ``expr`` with the names of ``env`` replaced by their values."""
    if isinstance(expr, Num):
        return _Shape(0, 1)
    if isinstance(expr, Name):
        return env.get(expr.id, _Shape(0, 1))
    kids = (
        (expr.left, expr.right)
        if isinstance(expr, BinOp)
        else (expr.operand,)
        if isinstance(expr, Neg)
        else expr.args
    )
    shapes = [_inlined(k, env) for k in kids]
    return _Shape(1 + max(s.depth for s in shapes), 1 + sum(s.nodes for s in shapes))


def check_derivable(prog: Program) -> None:
    """Refuse, with a located :class:`DerivationError`, what the derivation cannot do in
    bounded work (see the module docstring); a checked program is assumed."""
    for s in prog.states:
        _constants_and_exponents(prog, f"the initial value of `{s.name}`", s.init)
    env: dict[str, _Shape] = {}
    for stmt in prog.update:
        owner = "the update of `w`" if stmt.target == "w" else f"the statement of `{stmt.target}`"
        _constants_and_exponents(prog, owner, stmt.value)
        shape = _inlined(stmt.value, env)
        if shape.depth > MAX_INLINED_DEPTH or shape.nodes > MAX_INLINED_NODES:
            raise _error(
                prog,
                stmt,
                f"{owner} nests {shape.depth} operations and has {shape.nodes} terms once "
                "the locals and states it reads are substituted; the derivation's limits are "
                f"{MAX_INLINED_DEPTH} and {MAX_INLINED_NODES}",
                hint="the discrete optimizer still runs (flowgen codegen, run)",
            )
        if stmt.target != "w":  # later reads of a local or a state see this value
            env[stmt.target] = shape


# ------------------------------------------------------------------ time budget


class _Expired(BaseException):
    """Raised inside the derivation when its time is up (caught by :func:`time_budget`)."""


@dataclass
class _Deadline:
    program: Program
    seconds: float
    end: float  # time.process_time() at which the budget is spent
    what: str = "the program"
    node: Node | None = None
    armed: bool = False  # the preemptive timer may raise

    def location(self):
        node = self.node if self.node is not None and self.node.line else self.program
        if not node.line:
            return None
        p = self.program
        return location_in(p.path or "<string>", p.source, node.line, node.column)

    def expired(self) -> BudgetExceeded:
        loc = self.location()
        return BudgetExceeded(
            f"the derivation ran out of its time budget ({self.seconds:g} s of CPU) "
            f"while deriving {self.what}",
            location=loc,
            hint="this statement's algebra is too large to derive; the discrete optimizer "
            "still runs (flowgen codegen, run)",
        )


_active: ContextVar[_Deadline | None] = ContextVar("flowgen_derivation_deadline", default=None)


def stage(what: str, node: Node | None) -> None:
    """The derivation starts on ``what`` (e.g. "the rate of `v`"), written at ``node``."""
    d = _active.get()
    if d is None:
        return
    d.what, d.node = what, node
    if time.process_time() > d.end:
        raise _Expired()


def check() -> None:
    """Raise if the derivation's time budget is spent (cheap; call it in loops)."""
    d = _active.get()
    if d is not None and time.process_time() > d.end:
        raise _Expired()


def _can_preempt() -> bool:
    if not hasattr(signal, "setitimer"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        return signal.getsignal(signal.SIGPROF) in (signal.SIG_DFL, signal.SIG_IGN, None)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        return False


@contextlib.contextmanager
def time_budget(program: Program, seconds: float | None = None) -> Iterator[_Deadline]:
    """Run the derivation of ``program`` within ``seconds`` of CPU time (default
    ``DERIVATION_SECONDS``); on expiry raise :class:`BudgetExceeded` naming the stage.

    Yields the deadline, whose ``what``/``node`` tell the stage reached (for errors).
    """
    seconds = DERIVATION_SECONDS if seconds is None else float(seconds)
    outer = _active.get()
    if outer is not None:  # nested: the outer budget rules
        yield outer
        return
    deadline = _Deadline(program, seconds, time.process_time() + seconds)
    token = _active.set(deadline)
    preempt = _can_preempt()
    previous = None

    def on_timer(signum, frame):
        if deadline.armed:
            raise _Expired()

    def disarm() -> None:
        # a timer signal may land while this runs: retry until all is restored
        while True:
            try:
                deadline.armed = False
                if preempt:
                    signal.setitimer(signal.ITIMER_PROF, 0, 0)
                    signal.signal(signal.SIGPROF, previous or signal.SIG_DFL)
                return
            except _Expired:
                continue

    try:
        if preempt:
            previous = signal.signal(signal.SIGPROF, on_timer)
            deadline.armed = True
            signal.setitimer(signal.ITIMER_PROF, max(seconds, 1e-3), 0.25)
        try:
            yield deadline
        finally:
            disarm()
    except _Expired:
        raise deadline.expired() from None
    finally:
        _active.reset(token)
