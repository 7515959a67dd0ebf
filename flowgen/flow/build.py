"""From a checked program to a :class:`FlowSpec`: runs the symbolic stages in order.

Two levels of acceptance (``docs/language.md``):

1. the *discrete* level, :func:`flowgen.flow.discrete.build_discrete`: every
   well-formed program, no derivation;
2. the *derivation*, :func:`build_flow`: rates, classes, stability and drift,
   within the budgets of :mod:`flowgen.symbolic.budget`. It may refuse, always
   with a :class:`DerivationError` that points at the statement it was
   deriving. With ``require_flow=False`` a refusal gives instead a spec of the
   discrete step alone (``has_flow`` false, ``flow_reason`` saying why), which
   is what ``codegen``, ``run`` and the discrete process use.
"""

from __future__ import annotations

import sympy as sp

from flowgen.errors import DerivationError, FlowgenError
from flowgen.flow.discrete import DiscreteSpec, build_discrete
from flowgen.flow.spec import FlowSpec, StabilitySpec, StateFlow, Statement
from flowgen.language.ast import Program
from flowgen.language.checks import check_hyper_values
from flowgen.symbolic import budget, classify, drift, stability, stationary
from flowgen.symbolic.model import REDUCTION_CLASSES, build_model
from flowgen.symbolic.moments import MOMENT_NAMES, runtime_table
from flowgen.symbolic.stability import Bifurcation


def check_overrides(program: Program, overrides: dict[str, float] | None) -> dict[str, float]:
    """Validated hyperparameter overrides (see ``check_hyper_values``)."""
    return check_hyper_values(program, overrides or {})


def one_line(err: FlowgenError) -> str:
    """``path:line:col: message`` (or the message alone when it has no location)."""
    loc = err.location
    return f"{loc.path}:{loc.line}:{loc.column}: {err.message}" if loc else err.message


def discrete_only(discrete: DiscreteSpec, reason: str) -> FlowSpec:
    """A :class:`FlowSpec` of the discrete step alone: no rates, stability or drift."""
    states = tuple(
        StateFlow(s.name, "", s.scalar, None, None, None, None, line=s.line)
        for s in discrete.states
    )
    return FlowSpec(
        name=discrete.name,
        description=discrete.description,
        path=discrete.path,
        sha256=discrete.sha256,
        source=discrete.source,
        hyper=dict(discrete.hyper),
        hyper_symbols={},
        states=states,
        statements=(),
        w_rate=None,
        w_drift=None,
        stability=None,
        central_reason=reason,
        discrete=discrete,
        flow_reason=reason,
    )


def build_flow(
    program: Program,
    overrides: dict[str, float] | None = None,
    *,
    require_central: bool = True,
    require_flow: bool = True,
    time_budget: float | None = None,
) -> FlowSpec:
    """Derive the flow of ``program``.

    With ``require_central=False`` an optimizer whose update has no
    second-order expansion (``sign(g)``...) still yields a spec with the
    discrete step and raw rates (``central_reason`` says why there is no
    central flow); with ``True`` that raises :class:`DerivationError`. With
    ``require_flow=False`` (which implies ``require_central=False``) any refusal
    of the derivation yields :func:`discrete_only` instead of raising; errors in
    the hyperparameters (:class:`~flowgen.errors.UsageError`) always raise.
    ``time_budget`` is in CPU seconds (default ``budget.DERIVATION_SECONDS``).
    """
    discrete = build_discrete(program, overrides)
    try:
        return _derive(
            program,
            discrete,
            require_central=require_central and require_flow,
            seconds=time_budget,
        )
    except DerivationError as err:
        if require_flow:
            raise
        return discrete_only(discrete, one_line(err))


def _derive(
    program: Program, discrete: DiscreteSpec, *, require_central: bool, seconds: float | None
) -> FlowSpec:
    for decl in (*program.hypers, *program.states, *program.update):
        name = getattr(decl, "name", None) or getattr(decl, "target", None)
        if name in MOMENT_NAMES:
            raise DerivationError(
                f"`{name}` is reserved for the moments of the gradient in derived flows",
                location=_loc(program, decl),
                hint=f"rename it; the discrete optimizer runs with the name `{name}`",
            )
    budget.check_derivable(program)
    with budget.time_budget(program, seconds) as progress:
        try:
            return _stages(program, discrete, require_central)
        except FlowgenError:
            raise
        except RecursionError:
            raise DerivationError(
                f"the derivation recursed too deeply while deriving {progress.what}",
                location=progress.location(),
                hint="the discrete optimizer still runs (flowgen codegen, run)",
            ) from None
        except Exception as exc:  # an internal error: located, never a traceback
            raise DerivationError(
                f"internal error while deriving {progress.what} "
                f"({type(exc).__name__}: {str(exc)[:200]})",
                location=progress.location(),
                hint="please report it with the file; the discrete optimizer still runs "
                "(flowgen codegen, run)",
            ) from None


def _loc(program: Program, node):
    from flowgen.errors import location_in

    if not getattr(node, "line", 0):
        return None
    return location_in(program.path or "<string>", program.source, node.line, node.column)


def _frozen_reductions(model) -> dict:
    """``{Symbol("sum(x)"): sum(x)}`` for every reduction in the step."""
    out = {}
    for st in model.statements:
        for r in st.value.atoms(*REDUCTION_CLASSES):
            out[sp.Symbol(str(r), real=True)] = r
    return out


def _thaw(expr, thaw):
    return None if expr is None else expr.xreplace(thaw)


def _stages(program: Program, discrete: DiscreteSpec, require_central: bool) -> FlowSpec:
    model = build_model(program, discrete.hyper)
    node = model.assign_node.get
    budget.stage("the classes of the states", node("w"))
    classes = classify.classify_states(model)
    statements = tuple(
        Statement(st.target, st.role, st.raw, st.node.line) for st in model.statements
    )
    flow_states = [s for s in model.states if classes[s] != classify.DELAY]
    # raw rates: delay states (no rate) read as the previous step's value of their argument
    raw_rates = {}
    for s in flow_states:
        if s in model.f and s in model.assign_node:
            budget.stage(f"the rate of `{s}`", node(s))
            raw_rates[s] = classify.state_rate(model, s)
    for s in flow_states:  # never assigned: constant
        raw_rates.setdefault(s, sp.Integer(0))
    budget.stage("the rate of `w`", node("w"))
    raw_w_rate = classify.w_rate(model)
    rates = {s: drift.at_rest(model, r) for s, r in raw_rates.items()}
    w_rate = drift.at_rest(model, raw_w_rate)

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
        budget.stage("the stability of the update of `w`", node("w"))
        stab = stability.analyse(model, classes)
        # the stability analysis freezes reductions as symbols named like them: put the
        # reductions back, so that p, λ* and c compute them (``sum(1)`` is n, not a name)
        thaw = _frozen_reductions(model)
        stab_spec = StabilitySpec(
            stab.bifurcation,
            stab.char_poly.xreplace({**stability.SHOWN, **thaw}),
            _thaw(stab.critical_curvature, thaw),
            _thaw(stab.effective_step, thaw),
            _thaw(stab.threshold, thaw),
            stab.threshold_value,
            stab.note,
            stab.step_note,
        )
        kappa = {f: k.xreplace(thaw) for f, k in stab.kappa.items()}
        if not stab.bifurcation.has_central_flow:
            reason = (
                f"the first instability is a {stab.bifurcation.value} bifurcation, not a flip "
                "(period-2) one; central flows of the period-2 kind do not apply"
                if stab.bifurcation != Bifurcation.NONE
                else f"no edge of stability: {stab.note}"
            )
            if require_central and stab.bifurcation == Bifurcation.NEIMARK_SACKER:
                raise model.error(reason, model.assign_node.get("w"))

    drifts: dict[str, sp.Expr | None] = {s: None for s in model.states}
    w_drift = None
    if reason is None:
        kstep = {f: -k for f, k in kappa.items() if classes[f] == classify.FAST}
        lam_star = stab_spec.critical_curvature
        osc = drift.oscillation(model, kstep, None if lam_star is None else 1 / lam_star)
        for s in flow_states:
            budget.stage(f"the drift of `{s}`", node(s))
            drifts[s] = drift.average(model, raw_rates[s], osc, s)
        budget.stage("the drift of `w`", node("w"))
        w_drift = drift.average(model, raw_w_rate, osc, "w")

    states = tuple(
        StateFlow(
            name=s,
            kind=classes[s],
            scalar=model.scalar[s],
            init=model.init[s],
            rate=rates.get(s),
            drift=drifts[s],
            kappa=kappa.get(s),
            line=program.state(s).line,
            argument=model.to_current(model.f[s]) if s in model.delays else None,
        )
        for s in model.states
    )
    return FlowSpec(
        name=program.name,
        description=program.description,
        path=program.path,
        sha256=discrete.sha256,
        source=program.source,
        hyper=dict(model.hyper_values),
        hyper_symbols=dict(model.hyper),
        states=states,
        statements=statements,
        w_rate=w_rate,
        w_drift=w_drift,
        stability=stab_spec,
        central_reason=reason,
        discrete=discrete,
        moments=runtime_table(),
        stationary=stationary.analyse(
            states,
            stab_spec and stab_spec.effective_step,
            stab_spec and stab_spec.threshold_value,
            dict(model.hyper_values),
            central_reason=reason,
        ),
    )
