"""From a checked program to a :class:`FlowSpec`: runs the symbolic stages in order."""

from __future__ import annotations

import hashlib

import sympy as sp

from flowgen.errors import DerivationError, UsageError
from flowgen.flow.spec import FlowSpec, StabilitySpec, StateFlow, Statement
from flowgen.language.ast import Program
from flowgen.symbolic import classify, drift, stability, stationary
from flowgen.symbolic.model import EG_NAME, VG_NAME, W, build_model


def check_overrides(program: Program, overrides: dict[str, float] | None) -> dict[str, float]:
    import difflib

    out = {}
    known = list(program.hyper_defaults)
    for k, v in (overrides or {}).items():
        if k not in program.hyper_defaults:
            close = difflib.get_close_matches(k, known, n=1)
            hint = (
                f"did you mean `{close[0]}`?" if close else f"hyperparameters: {', '.join(known)}"
            )
            raise UsageError(
                f"--set {k}=...: `{program.name}` has no hyperparameter `{k}`", hint=hint
            )
        out[k] = float(v)
    return out


def build_flow(
    program: Program,
    overrides: dict[str, float] | None = None,
    *,
    require_central: bool = True,
) -> FlowSpec:
    """Derive the flow of ``program``.

    With ``require_central=False`` an optimizer whose update has no
    second-order expansion (``sign(g)``...) still yields a spec with the
    discrete step and raw rates (``central_reason`` says why there is no
    central flow); with ``True`` that raises :class:`DerivationError`.
    """
    overrides = check_overrides(program, overrides)
    for name in (*program.hyper_defaults, *program.state_names):
        if name in (EG_NAME, VG_NAME):
            raise DerivationError(
                f"`{name}` is reserved for the moments of the gradient in derived flows; rename it"
            )
    model = build_model(program, overrides)
    classes = classify.classify_states(model)
    statements = tuple(
        Statement(st.target, st.role, st.raw, st.node.line) for st in model.statements
    )
    rates = {
        s: classify.state_rate(model, s)
        for s in model.states
        if s in model.f and s in model.assign_node
    }
    for s in model.states:  # never assigned: constant
        rates.setdefault(s, sp.Integer(0))
    w_rate = classify.w_rate(model)

    reason = None
    try:
        drift.nonsmooth_check(model, classes)
    except DerivationError as err:
        if require_central:
            raise
        reason = err.message

    stab_spec = None
    kappa: dict[str, sp.Expr] = {}
    if reason is None:
        stab = stability.analyse(model, classes)
        stab_spec = StabilitySpec(
            stab.bifurcation,
            stab.char_poly.xreplace(
                {
                    stability.LAM: sp.Symbol("lambda"),
                    stability.A: sp.Symbol("a"),
                    stability.MU: sp.Symbol("mu"),
                }
            ),
            stab.critical_curvature,
            stab.effective_step,
            stab.threshold,
            stab.threshold_value,
            stab.note,
        )
        kappa = stab.kappa
        if stab.bifurcation != stability.FLIP:
            reason = (
                f"the first instability is a {stab.bifurcation} bifurcation, not a flip "
                "(period-2) one; central flows of the period-2 kind do not apply"
                if stab.bifurcation != stability.NONE
                else f"no edge of stability: {stab.note}"
            )
            if require_central and stab.bifurcation == stability.NS:
                raise model.error(reason, model.assign_node.get("w"))

    drifts: dict[str, sp.Expr | None] = {s: None for s in model.states}
    w_drift = None
    if reason is None:
        kstep = {f: -k for f, k in kappa.items()}
        lam_star = stab_spec.critical_curvature
        if lam_star is not None and w_rate.has(W):
            kstep["w"] = 1 / lam_star
        for s in model.states:
            drifts[s] = drift.average(model, rates[s], kstep, s)
        w_drift = drift.average(model, w_rate, kstep, "w")

    states = tuple(
        StateFlow(
            name=s,
            kind=classes[s],
            scalar=model.scalar[s],
            init=model.init[s],
            rate=rates[s],
            drift=drifts[s],
            kappa=kappa.get(s),
            line=program.state(s).line,
        )
        for s in model.states
    )
    return FlowSpec(
        name=program.name,
        description=program.description,
        path=program.path,
        sha256=hashlib.sha256(program.source.encode()).hexdigest(),
        source=program.source,
        hyper=dict(model.hyper_values),
        hyper_symbols=dict(model.hyper),
        states=states,
        statements=statements,
        w_rate=w_rate,
        w_drift=w_drift,
        stability=stab_spec,
        central_reason=reason,
        stationary=stationary.analyse(
            states,
            stab_spec and stab_spec.effective_step,
            stab_spec and stab_spec.threshold_value,
            dict(model.hyper_values),
            central_reason=reason,
        ),
    )
