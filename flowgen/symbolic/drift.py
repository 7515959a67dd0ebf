"""Second-order averaging of the rates over the oscillation (``docs/mathematics.md`` §2–3).

Write the iterate as ``w̄ + δ``. The gradient read by a step oscillates,
``g = E[g] + δg`` with ``Var[g_i] = diag(HΣH)_i =: Vg``; a fast state moves with
it on the flip mode, ``δf = κ_step·δg`` (``κ_step = −κ``: the step reads the
gradient at the previous iterate); a delay state reads its argument one step
back (same mean, oscillation of opposite sign); slow states and counters are
frozen. For a smooth rate ``r(g, f, ...)``

    E r ≈ r(Eg, f̄) + ½ Vg · d²/dε² r(Eg + ε, f̄ + κ_step ε)|₀ .

The rules themselves are the tables of :mod:`flowgen.symbolic.moments`.

Reductions average coordinate by coordinate: ``E sum(h) = sum(E h)``. A rate
that is nonlinear in a reduction of an oscillating quantity would need
cross-coordinate covariances beyond ``diag(HΣH)``; flowgen refuses it.
"""

from __future__ import annotations

import sympy as sp

from flowgen.symbolic import moments
from flowgen.symbolic.classify import oscillating
from flowgen.symbolic.model import (
    NONSMOOTH,
    REDUCTION_CLASSES,
    G,
    StepModel,
    T,
    W,
    new_symbol,
    tidy,
)
from flowgen.symbolic.moments import Oscillation


def nonsmooth_check(model: StepModel, classes: dict[str, str]) -> None:
    """Refuse sign/abs/min/max of anything that oscillates (``g``, ``w``, fast states,
    delays of oscillating values)."""
    moving = oscillating(model, classes)
    osc = {G, W} | {sp.Symbol(s, real=True) for s in moving}
    osc |= {new_symbol(s) for s in moving}
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


def oscillation(
    model: StepModel, kappa_step: dict[str, sp.Expr], w_amplitude: sp.Expr | None
) -> Oscillation:
    """The oscillation rules of :data:`~flowgen.symbolic.moments.OSCILLATIONS` for this
    model: ``kappa_step`` maps each fast state to its oscillation per unit oscillation of
    the gradient the step reads; ``w`` moves by ``w_amplitude`` (``1/λ*``); delay states
    read their argument one step back."""
    amp = {sp.Symbol(f, real=True): k for f, k in kappa_step.items()}
    if w_amplitude is not None:
        amp[W] = w_amplitude
    return Oscillation(
        gradient=G,
        amplitude=amp,
        delays={sp.Symbol(d, real=True): model.f[d] for d in model.delays},
        new_values={new_symbol(s): sp.Symbol(s, real=True) for s in model.states},
        iterate=W,
        counter=T,
    )


def average(model: StepModel, rate: sp.Expr, osc: Oscillation, who: str) -> sp.Expr:
    """``E[rate]`` to second order, in the moments (``Eg``, ``Vg``) and current state values
    (:func:`flowgen.symbolic.moments.average`)."""

    def refuse(r):
        raise model.error(
            f"the rate of `{who}` is nonlinear in {r}, a reduction of an oscillating "
            "quantity; its average needs cross-coordinate covariances flowgen does not model",
            model.assign_node.get(who),
        )

    out = moments.average(rate, osc, REDUCTION_CLASSES, on_cross_coordinate=refuse)
    if out == rate.xreplace({G: moments.MEAN}):  # linear in what oscillates: already tidy
        return out
    return tidy(out)


def at_rest(model: StepModel, rate: sp.Expr) -> sp.Expr:
    """A raw rate without oscillation: delay states read their argument's value."""
    if not {sp.Symbol(d, real=True) for d in model.delays} & rate.free_symbols:
        return rate
    return tidy(oscillation(model, {}, None).at_rest(rate))
