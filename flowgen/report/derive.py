"""The ``flowgen derive`` report: the rule, the state classes, the stability
threshold, the drift equations and a plain-words reading."""

from __future__ import annotations

import sympy as sp
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from flowgen.flow.spec import FlowSpec
from flowgen.symbolic.model import tidy_signs
from flowgen.symbolic.moments import MOMENTS
from flowgen.symbolic.stability import Bifurcation

KIND_WORDS = {
    "fast": "fast — responds linearly to g; oscillates with the iterate",
    "slow": "slow — feels the oscillation only through second moments",
    "counter": "counter — deterministic, independent of g",
    "delay": "delay — the previous step's value of its argument; not an ODE state",
}


def pretty(e: sp.Expr) -> str:
    return sp.pretty(e, use_unicode=True, wrap_line=False)


def _fmt_num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.6g}"


def quasi_static(spec: FlowSpec) -> list[tuple[str, sp.Expr, sp.Expr]]:
    """States whose drift is affine and decaying: (name, time scale, fixed point)."""
    out = []
    for s in spec.states:
        if s.drift is None or s.kind == "counter":
            continue
        x = sp.Symbol(s.name, real=True)
        slope = sp.diff(s.drift, x)
        if slope == 0 or sp.diff(slope, x) != 0:
            continue
        rate = sp.cancel(-slope)
        fixed = sp.cancel(s.drift.subs(x, 0) / rate)
        out.append((s.name, tidy_signs(sp.factor(1 / rate)), fixed))
    return out


def reading(spec: FlowSpec) -> str:
    """One paragraph in plain words."""
    st = spec.stability
    P, C = spec.shown("p"), spec.shown("c")
    parts = []
    if st is None:
        return (
            f"{spec.name} has no central flow: {spec.central_reason}. "
            "Its discrete optimizer and raw rates are still available to "
            "`flowgen codegen` and `run`."
        )
    hyp = ", ".join(
        f"{k}={v:g}"
        for k, v in spec.hyper.items()
        if st.threshold is not None
        and sp.Symbol(k) in {sp.Symbol(s.name) for s in st.threshold.free_symbols}
    )
    if st.bifurcation == Bifurcation.FLIP and st.threshold is not None:
        parts.append(
            f"The effective sharpness λ_max(P⁻¹H), with P⁻¹ = diag({P}), "
            f"{P} = {sp.sstr(st.effective_step)} (the steady-state step per unit gradient), "
            f"equilibrates at {C} = {sp.sstr(st.threshold)}"
            + (f" = {_fmt_num(st.threshold_value)}" if st.threshold.free_symbols else "")
            + (f" for {hyp}" if hyp else "")
            + ": above it the iterate oscillates with period 2 along the top eigenvectors (a flip "
            "bifurcation), and the central flow holds it there with a covariance Σ."
        )
        if st.step_note:
            parts.append(st.step_note[0].upper() + st.step_note[1:] + ".")
    elif st.bifurcation == Bifurcation.FLIP:
        parts.append(
            f"The update loses stability at curvature λ* = {sp.sstr(st.critical_curvature)} "
            f"(flip); {st.step_note or 'there is no single effective Hessian'}."
        )
    else:
        parts.append(f"Stability: {Bifurcation(st.bifurcation).value}. {st.note}")
    fast = [s for s in spec.states if s.kind == "fast"]
    slow = [s for s in spec.states if s.kind == "slow"]
    delays = [s for s in spec.states if s.kind == "delay"]
    qs = {name: (tau, fix) for name, tau, fix in quasi_static(spec)}
    for s in fast:
        txt = f"`{s.name}` is fast: it oscillates with the gradient"
        if s.kappa is not None:
            txt += f" (δ{s.name} = {sp.sstr(s.kappa)}·δg)"
        if s.name in qs:
            tau, fix = qs[s.name]
            txt += (
                f"; it stays an ODE state of the flow, and on time scales ≫ {sp.sstr(tau)} steps "
                f"{s.name} ≈ {sp.sstr(fix)}"
            )
        parts.append(txt + ".")
    for s in slow:
        d = s.drift
        if d is not None and d.has(sp.Symbol("Vg", nonnegative=True)):
            txt = f"`{s.name}` is slow: it feels the oscillation through {MOMENTS[1].unicode}"
        else:
            txt = f"`{s.name}` is slow"
        if s.name in qs:
            tau, fix = qs[s.name]
            txt += f"; it relaxes on a time scale of {sp.sstr(tau)} steps towards {sp.sstr(fix)}"
        parts.append(txt + ".")
    for s in delays:
        arg = sp.sstr(s.argument)
        txt = f"`{s.name}` is a delay state: the previous step's {arg}"
        if s.kappa is not None:
            txt += f" (on the flip mode δ{s.name} = {sp.sstr(s.kappa)}·δg)"
        txt += (
            f"; it is not an ODE state of the flow: in the drift its mean is that of {arg}, and "
            "its oscillation is its argument's with the opposite sign"
        )
        parts.append(txt + ".")
    if spec.has_central:
        parts.append(
            f"Every gradient in the drift is the time average {MOMENTS[0].unicode}: the implicit "
            "curvature penalty steers the flow away from sharp regions."
        )
    else:
        parts.append(f"No central flow: {spec.central_reason}.")
    return " ".join(parts)


def derive_report(spec: FlowSpec, console: Console) -> None:
    head = Text.assemble(
        (spec.name, "bold cyan"),
        "  ",
        (spec.description or "", "italic"),
        "\n",
        (f"{spec.path}  sha256 {spec.sha256[:12]}…", "dim"),
    )
    console.print(Panel(head, title="flowgen derive", expand=False))

    rule = Table(
        title="Update rule (one step; g = ∇L(w), t = 1, 2, …)",
        show_header=False,
        box=None,
        title_justify="left",
    )
    for st in spec.statements:
        rule.add_row(Text(st.target, style="bold"), "←", sp.sstr(st.expr))
    hyp = Table(title="Hyperparameters", box=None, title_justify="left")
    hyp.add_column("name")
    hyp.add_column("value", justify="right")
    for k, v in spec.hyper.items():
        hyp.add_row(k, f"{v:g}")
    console.print(rule)
    console.print(hyp)

    if spec.states:
        tab = Table(title="States", title_justify="left")
        tab.add_column("state")
        tab.add_column("class")
        tab.add_column("shape")
        tab.add_column("init")
        tab.add_column("rate ds/dt (time convention: backward difference)")
        for s in spec.states:
            tab.add_row(
                s.name,
                KIND_WORDS[s.kind],
                "scalar" if s.scalar else "per-coordinate",
                sp.sstr(s.init),
                sp.sstr(s.rate)
                if s.rate is not None
                else f"— (holds {sp.sstr(s.argument)} for the next step)",
            )
        console.print(tab)

    st = spec.stability
    if st is not None:
        stab = Table(
            title="Stability (1-D curvature λ, slow states frozen)",
            show_header=False,
            title_justify="left",
        )
        stab.add_column(style="bold")
        stab.add_column()
        P, C = spec.shown("p"), spec.shown("c")
        in_alpha = st.char_poly is not None and "α" in {x.name for x in st.char_poly.free_symbols}
        stab.add_row("bifurcation", Bifurcation(st.bifurcation).value)
        stab.add_row(
            "characteristic polynomial",
            sp.sstr(st.char_poly) + (f"   (α = λ·{P})" if in_alpha else "   (λ: curvature)"),
        )
        stab.add_row("critical curvature λ*", sp.sstr(st.critical_curvature))
        stab.add_row(
            f"effective step {P}",
            sp.sstr(st.effective_step) + "   (steady-state step per unit gradient)"
            if st.effective_step is not None
            else f"— ({st.step_note})",
        )
        if st.threshold is not None:
            stab.add_row(
                f"threshold {C} = λ*·{P}",
                f"{sp.sstr(st.threshold)}  =  {_fmt_num(st.threshold_value)}",
            )
            stab.add_row("applies to", f"λ_max(P⁻¹H), P⁻¹ = diag({P})   (the effective Hessian)")
        if st.step_note and st.effective_step is not None:
            stab.add_row("note", st.step_note)
        if st.note:
            stab.add_row("note", st.note)
        console.print(stab)

    if spec.has_central:
        eqs = [
            Text(
                "Central flow (second-order average; "
                + ", ".join(m.unicode for m in MOMENTS)
                + "):",
                style="bold",
            )
        ]
        eqs.append(Text(f"dw/dt = {sp.sstr(spec.w_drift)}"))
        for s in spec.flow_states:
            eqs.append(Text(f"d{s.name}/dt = {sp.sstr(s.drift)}"))
        delays = [s for s in spec.states if not s.is_flow_state]
        if delays:
            eqs.append(
                Text(
                    "delay states (not flow states): "
                    + ", ".join(f"{s.name} = previous {sp.sstr(s.argument)}" for s in delays),
                    style="dim",
                )
            )
        eqs.append(
            Text(
                "Σ = U X Uᵀ on the critical eigenvectors U of P⁻¹H, with X ⪰ 0, "
                f"{spec.shown('c')}·P − H ⪰ 0 and ⟨X, Uᵀ({spec.shown('c')}P − H)U⟩ = 0.",
                style="dim",
            )
        )
        console.print(Panel(Group(*eqs), title="Drift", expand=False))
    console.print(Panel(Text(reading(spec)), title="Reading", expand=False))


LATEX_NAMES = {"lr": r"\eta", "eps": r"\epsilon"}
#: how flowgen's own quantities render in LaTeX; a file's name that would render the same
#: way is printed upright instead (\mathrm{lambda}), so that no two things look alike
LATEX_INTERNAL = {r"\lambda", r"\mu", r"\alpha", "p", "c", "H", "P", "L", r"\Sigma", "X", "U"}


def latex_names(spec: FlowSpec | None, free: set) -> dict:
    """``symbol_names`` for :func:`sympy.latex`: the moments, conventional Greek names for
    ``lr``/``eps`` where free, and upright names wherever a file's name would look like
    flowgen's own symbols or like another of the file's names."""
    from collections import Counter

    user = sorted({s.name for s in free} | (set(spec.names) if spec is not None else set()))
    user = [n for n in user if n not in {m.name for m in MOMENTS}]

    def upright(n):
        return r"\mathrm{" + n.replace("_", r"\_") + "}"

    out = {}
    for n in user:
        r = sp.latex(sp.Symbol(n))
        out[n] = upright(n) if r in LATEX_INTERNAL else r
    for n, conventional in LATEX_NAMES.items():
        if n in out and conventional not in out.values():
            out[n] = conventional
    counts = Counter(out.values())
    out = {n: (upright(n) if counts[r] > 1 else r) for n, r in out.items()}
    for m in MOMENTS:
        out[m.name] = m.latex
    return out


def latex(e: sp.Expr, spec: FlowSpec | None = None) -> str:
    names = latex_names(spec, e.free_symbols)
    return sp.latex(e, symbol_names={s: names[s.name] for s in e.free_symbols if s.name in names})


def derive_latex(spec: FlowSpec) -> str:
    lines = [f"% flowgen derive {spec.path} (sha256 {spec.sha256[:12]})"]
    st = spec.stability
    P, C = (r"\hat p", r"\hat c") if {"p", "c"} & spec.names else ("p", "c")
    if st is not None:
        if st.effective_step is not None:
            lines.append(f"{P} = " + latex(st.effective_step, spec))
        if st.critical_curvature is not None:
            lines.append(r"\lambda^\star = " + latex(st.critical_curvature, spec))
        if st.threshold is not None:
            lines.append(r"\lambda_{\max}(P^{-1}H) \le " + f"{C} = " + latex(st.threshold, spec))
    if spec.has_central:
        lines.append(r"\frac{dw}{dt} = " + latex(spec.w_drift, spec))
        for s in spec.flow_states:
            lines.append(rf"\frac{{d{s.name}}}{{dt}} = " + latex(s.drift, spec))
        lines.append(r"\text{with } " + r",\ ".join(m.latex_meaning for m in MOMENTS))
    return "\n".join(lines)
