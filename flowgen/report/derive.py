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

KIND_WORDS = {
    "fast": "fast — responds linearly to g; oscillates with the iterate",
    "slow": "slow — feels the oscillation only through second moments",
    "counter": "counter — deterministic, independent of g",
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
    if st.bifurcation == "flip" and st.threshold is not None:
        parts.append(
            "The effective sharpness λ_max(P⁻¹H), with P⁻¹ = diag(p), "
            f"p = {sp.sstr(st.effective_step)}, "
            f"equilibrates at c = {sp.sstr(st.threshold)}"
            + (f" = {_fmt_num(st.threshold_value)}" if st.threshold.free_symbols else "")
            + (f" for {hyp}" if hyp else "")
            + ": above it the iterate oscillates with period 2 along the top eigenvectors (a flip "
            "bifurcation), and the central flow holds it there with a covariance Σ."
        )
    elif st.bifurcation == "flip":
        parts.append(
            f"The update loses stability at curvature λ* = {sp.sstr(st.critical_curvature)} "
            "(flip); the update does not factor as −p·(linear form), so there is no single "
            "effective Hessian."
        )
    else:
        parts.append(f"Stability: {st.bifurcation}. {st.note}")
    fast = [s for s in spec.states if s.kind == "fast"]
    slow = [s for s in spec.states if s.kind == "slow"]
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
            txt = f"`{s.name}` is slow: it feels the oscillation through Vg = diag(HΣH)"
        else:
            txt = f"`{s.name}` is slow"
        if s.name in qs:
            tau, fix = qs[s.name]
            txt += f"; it relaxes on a time scale of {sp.sstr(tau)} steps towards {sp.sstr(fix)}"
        parts.append(txt + ".")
    if spec.has_central:
        parts.append(
            "Every gradient in the drift is the time average Eg = ∇L + ½∇⟨H,Σ⟩: the implicit "
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
                sp.sstr(s.rate),
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
        stab.add_row("bifurcation", st.bifurcation)
        stab.add_row(
            "characteristic polynomial",
            sp.sstr(st.char_poly) + ("   (a = λ·p)" if st.effective_step is not None else ""),
        )
        stab.add_row("critical curvature λ*", sp.sstr(st.critical_curvature))
        stab.add_row(
            "effective step p",
            sp.sstr(st.effective_step)
            if st.effective_step is not None
            else "— (the update does not factor as −p·(linear form))",
        )
        if st.threshold is not None:
            stab.add_row(
                "threshold c = λ*·p", f"{sp.sstr(st.threshold)}  =  {_fmt_num(st.threshold_value)}"
            )
            stab.add_row("applies to", "λ_max(P⁻¹H), P⁻¹ = diag(p)   (the effective Hessian)")
        if st.note:
            stab.add_row("note", st.note)
        console.print(stab)

    if spec.has_central:
        eqs = [
            Text(
                "Central flow (second-order average; Eg = E[g] = ∇L + ½∇⟨H,Σ⟩, "
                "Vg = Var[g] = diag(HΣH)):",
                style="bold",
            )
        ]
        eqs.append(Text(f"dw/dt = {sp.sstr(spec.w_drift)}"))
        for s in spec.states:
            eqs.append(Text(f"d{s.name}/dt = {sp.sstr(s.drift)}"))
        eqs.append(
            Text(
                "Σ = U X Uᵀ on the critical eigenvectors U of P⁻¹H, with X ⪰ 0, "
                "c·P − H ⪰ 0 and ⟨X, Uᵀ(cP − H)U⟩ = 0.",
                style="dim",
            )
        )
        console.print(Panel(Group(*eqs), title="Drift", expand=False))
    console.print(Panel(reading(spec), title="Reading", expand=False))


LATEX_NAMES = {
    "lr": r"\eta",
    "eps": r"\epsilon",
    "Eg": r"\mathbb{E}[g]",
    "Vg": r"\operatorname{Var}[g]",
}


def latex(e: sp.Expr) -> str:
    names = {s: LATEX_NAMES[s.name] for s in e.free_symbols if s.name in LATEX_NAMES}
    return sp.latex(e, symbol_names=names)


def derive_latex(spec: FlowSpec) -> str:
    lines = [f"% flowgen derive {spec.path} (sha256 {spec.sha256[:12]})"]
    st = spec.stability
    if st is not None:
        if st.effective_step is not None:
            lines.append(r"p = " + latex(st.effective_step))
        if st.critical_curvature is not None:
            lines.append(r"\lambda^\star = " + latex(st.critical_curvature))
        if st.threshold is not None:
            lines.append(r"\lambda_{\max}(P^{-1}H) \le c = " + latex(st.threshold))
    if spec.has_central:
        lines.append(r"\frac{dw}{dt} = " + latex(spec.w_drift))
        for s in spec.states:
            lines.append(rf"\frac{{d{s.name}}}{{dt}} = " + latex(s.drift))
        lines.append(
            r"\text{with } E_g = \nabla L + \tfrac12 \nabla\langle H, \Sigma\rangle,\ "
            r"V_g = \operatorname{diag}(H \Sigma H)"
        )
    return "\n".join(lines)
