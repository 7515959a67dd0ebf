"""Rates under the time convention, and the classification of states.

``docs/mathematics.md`` §3: the state after its update at step t is the state of
step t. The continuous-time rate of a state is its backward difference
expressed in the new value: solve ``s_new = f(s_old, ...)`` for ``s_old``;
``rate = s_new - s_old``. For an EMA ``s = β s + (1-β) x`` this gives
``ds/dt = (1-β)/β (x - s)``. The rate of ``w`` is ``w_new - w_old``.
"""

from __future__ import annotations

import sympy as sp

from flowgen.symbolic.model import (
    REDUCTION_CLASSES,
    G,
    StepModel,
    W,
    new_symbol,
    simp,
    tidy,
)

COUNTER, FAST, SLOW, DELAY = "counter", "fast", "slow", "delay"


def strip_reductions(expr: sp.Expr) -> sp.Expr:
    """Replace each reduction by its argument: the derivative of a coordinate's
    own contribution (used for linear responses at ``g = 0``)."""
    return expr.replace(lambda e: isinstance(e, REDUCTION_CLASSES), lambda e: e.args[0])


def _solve_linear(expr: sp.Expr, x: sp.Symbol) -> list[sp.Expr] | None:
    """Root of ``expr = 0`` when it is affine in ``x`` (the common case: EMAs); else None."""
    a = sp.diff(expr, x)
    if a.has(x) or a == 0:
        return None
    return [sp.cancel(-expr.subs(x, 0) / a)]


def state_rate(model: StepModel, s: str) -> sp.Expr:
    """``ds/dt`` (raw, before averaging) in current values, ``g``, ``t``, hypers."""
    f = model.f[s]
    old = sp.Dummy(s + "_old", real=True)
    cur = sp.Symbol(s, real=True)
    f_old = model.to_current(f.xreplace({cur: old}))
    node = model.assign_node.get(s)
    if s in model.delays:
        raise ValueError(f"`{s}` is a delay state: it has no rate")
    if not f_old.has(old):
        raise model.error(
            f"state `{s}` does not depend on its previous value and no statement reads that "
            "value, so it is a local value of the step, not a state",
            node,
            hint=f"drop the `state` declaration of `{s}`; to keep a value for the next step, "
            f"read `{s}` in a statement before the one that assigns it (a delay state)",
        )
    sols = _solve_linear(f_old - cur, old)
    if sols is None:
        try:
            sols = sp.solve(sp.Eq(cur, f_old), old, dict=False)
        except (NotImplementedError, ValueError, TypeError):
            sols = []
    sols = [sol for sol in sols if not sol.has(sp.I)]
    if len(sols) != 1:
        raise model.error(
            f"cannot express the old value of `{s}` from its update "
            f"({'no' if not sols else len(sols)} solutions), so its rate is undefined",
            node,
            hint="flowgen needs updates that can be solved for the previous value (e.g. EMAs)",
        )
    return tidy(cur - sols[0])


def w_rate(model: StepModel) -> sp.Expr:
    """``dw/dt = w_new - w_old`` in current values."""
    return tidy(model.to_current(model.w_new) - W)


def _response(expr: sp.Expr, var: sp.Symbol, at: dict) -> sp.Expr:
    d = sp.diff(strip_reductions(expr), var)
    return simp(d.subs(at))


def classify_states(model: StepModel) -> dict[str, str]:
    """counter / fast / slow / delay, per ``docs/mathematics.md`` §3.

    * delay: the previous step's value of an expression (``gp = g``), see
      :class:`~flowgen.symbolic.model.StepModel`; not an ODE state of the flow;
    * counter: the update depends (transitively) on neither ``g`` nor ``w``;
    * fast: linear response to ``g`` (or to another fast state, or to an
      oscillating delay) at the zero-gradient point (``g = 0``, g-dependent
      states at 0) — it takes part in the oscillation;
    * slow: everything else (feels the oscillation only through second moments).
    """
    states = model.states
    olds = {s: sp.Symbol(s, real=True) for s in states}
    # stochastic: depends on g or w (directly or through another stochastic state)
    stochastic: set[str] = set()
    changed = True
    while changed:
        changed = False
        for s in states:
            if s in stochastic:
                continue
            free = model.f_full[s].free_symbols
            if G in free or W in free or any(olds[o] in free for o in stochastic if o != s):
                stochastic.add(s)
                changed = True
    # linear responses at the zero-gradient point: g = 0, w = 0, g-dependent states at 0
    at = {G: 0, W: 0, **{olds[o]: 0 for o in stochastic}}
    fast: set[str] = set()  # fast states and oscillating delays
    changed = True
    while changed:
        changed = False
        for s in states:
            if s not in stochastic or s in fast:
                continue
            expr = model.f_full[s]
            resp = [_response(expr, G, at), _response(expr, W, at)]
            resp += [_response(expr, olds[f], at) for f in fast if f != s]
            if any(r != 0 for r in resp):
                fast.add(s)
                changed = True
    return {
        s: (
            DELAY
            if s in model.delays
            else FAST
            if s in fast
            else SLOW
            if s in stochastic
            else COUNTER
        )
        for s in states
    }


def oscillating(model: StepModel, classes: dict[str, str]) -> tuple[str, ...]:
    """Fast states and the delays that respond linearly to the oscillation, in state order:
    the variables (besides ``w``) of the linearised map."""
    olds = {s: sp.Symbol(s, real=True) for s in model.states}
    osc = [s for s in model.states if classes[s] == FAST]
    stochastic = [s for s in model.states if classes[s] != COUNTER]
    at = {G: 0, W: 0, **{olds[o]: 0 for o in stochastic}}
    delays = [d for d in model.states if classes[d] == DELAY]
    changed = True
    while changed:
        changed = False
        for d in delays:
            if d in osc:
                continue
            expr = model.f_full[d]
            resp = [_response(expr, G, at), _response(expr, W, at)]
            resp += [_response(expr, olds[f], at) for f in osc if f != d]
            if any(r != 0 for r in resp):
                osc.append(d)
                changed = True
    return tuple(s for s in model.states if s in osc)


def uses_new_value(model: StepModel, expr: sp.Expr) -> bool:
    return any(new_symbol(s) in expr.free_symbols for s in model.states)
