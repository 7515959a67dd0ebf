"""Second-order averaging of the rates over the oscillation (``central-flows.md`` §2–3).

Write the iterate as ``w̄ + δ``. The gradient read by a step oscillates,
``g = E[g] + δg`` with ``Var[g_i] = diag(HΣH)_i =: Vg``; a fast state moves with
it on the flip mode, ``δf = κ_step·δg`` (``κ_step = −κ``: the step reads the
gradient at the previous iterate); slow states and counters are frozen. For a
smooth rate ``r(g, f, ...)``

    E r ≈ r(Eg, f̄) + ½ Vg · d²/dε² r(Eg + ε, f̄ + κ_step ε)|₀ .

Reductions average coordinate by coordinate: ``E sum(h) = sum(E h)``. A rate
that is nonlinear in a reduction of an oscillating quantity would need
cross-coordinate covariances beyond ``diag(HΣH)``; flowgen refuses it.
"""

from __future__ import annotations

import sympy as sp

from flowgen.symbolic.classify import FAST
from flowgen.symbolic.model import NONSMOOTH, REDUCTION_CLASSES, Eg, G, StepModel, Vg, simp, tidy

EPS = sp.Symbol("epsilon")


def nonsmooth_check(model: StepModel, classes: dict[str, str]) -> None:
    """Refuse sign/abs/min/max of anything that oscillates (``g``, ``w``, fast states)."""
    osc = {G, sp.Symbol("w", real=True)} | {
        sp.Symbol(s, real=True) for s in model.states if classes[s] == FAST
    }
    osc |= {sp.Symbol(s + "'", real=True) for s in model.states if classes[s] == FAST}
    local_osc: set[str] = set()
    for st in model.statements:
        for fn in st.value.atoms(*NONSMOOTH):
            if any(a.free_symbols & osc for a in fn.args) or fn.free_symbols & osc:
                what = (
                    "the update of `w`"
                    if st.target == "w"
                    else (
                        f"the update of `{st.target}`"
                        if st.role == "state"
                        else f"the local `{st.target}`"
                    )
                )
                name = {sp.sign: "sign", sp.Abs: "abs", sp.Min: "min", sp.Max: "max"}[fn.func]
                shown = (
                    sp.sstr(model.to_current(fn))
                    .replace("Abs(", "abs(")
                    .replace("Min(", "min(")
                    .replace("Max(", "max(")
                )
                raise model.error(
                    f"{what} uses {shown}, which has no second-order expansion at 0"
                    if name in ("sign", "abs")
                    else f"{what} uses {shown}, which is not smooth where its arguments cross",
                    st.node,
                    hint="the discrete optimizer still runs (flowgen codegen/run); central flows "
                    "need a smooth update",
                )
        if st.role == "local" and st.value.free_symbols & osc:
            local_osc.add(st.target)


def average(model: StepModel, rate: sp.Expr, kappa_step: dict[str, sp.Expr], who: str) -> sp.Expr:
    """``E[rate]`` to second order, in ``Eg``, ``Vg`` and current state values.

    ``kappa_step`` maps each oscillating name (fast states, and ``w``) to its
    oscillation per unit oscillation of the gradient the step reads.
    """
    fsyms = {sp.Symbol(f, real=True): k for f, k in kappa_step.items()}
    osc_syms = {G, *fsyms}

    # reductions -> placeholders R_k, averaged separately
    reds = sorted(rate.atoms(*REDUCTION_CLASSES), key=sp.default_sort_key)
    placeholders = {r: sp.Dummy(f"R{i}", real=True) for i, r in enumerate(reds)}
    body = rate.xreplace(placeholders)
    osc_reds = {r for r in reds if r.args[0].free_symbols & osc_syms}
    direction = {G: G + EPS, **{f: f + k * EPS for f, k in fsyms.items()}}

    def second(expr):
        e = expr.xreplace(direction)
        return sp.diff(e, EPS, 2).subs(EPS, 0)

    # reductions of oscillating quantities must enter linearly and not multiply oscillation
    for r in osc_reds:
        R = placeholders[r]
        bad = sp.diff(body, R, 2) != 0 or any(simp(sp.diff(body, R, x)) != 0 for x in osc_syms)
        if bad:
            raise model.error(
                f"the rate of `{who}` is nonlinear in {r}, a reduction of an oscillating "
                "quantity; its average needs cross-coordinate covariances flowgen does not model",
                model.assign_node.get(who),
            )
    mean_reds = {}
    for r in reds:
        arg = r.args[0]
        if r in osc_reds:
            avg_arg = arg.xreplace({G: Eg}) + sp.Rational(1, 2) * Vg * second(arg).xreplace({G: Eg})
            mean_reds[placeholders[r]] = r.func(sp.expand(avg_arg))
        else:
            mean_reds[placeholders[r]] = r
    first = body.xreplace({G: Eg})
    corr = sp.Rational(1, 2) * Vg * second(body).xreplace({G: Eg})
    out = (first + corr).xreplace(mean_reds)
    return tidy(out)
