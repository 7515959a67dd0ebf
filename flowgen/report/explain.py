"""The ``flowgen explain`` report: what the flow says about the optimizer at one
point of a run, in plain words and numbers, with figures and ``report.json``.

Figures (in ``--out``):

* ``stationary_preconditioner.png`` — optimizers with a slow preconditioner
  state: left, the stationary ``P*`` against the discrete run's actual ``P``
  (the talk's "true and predicted coordinates of ν"; log-log, one dot per
  coordinate); right, the two computations of ``P*`` (relaxation against SDP)
  against each other;
* ``harmonic_mean.png`` — the harmonic mean of the effective step sizes
  ``n / Σ 1/p_i`` along the run, discrete and central flow (the talk's
  "acceleration via regularization"), with the stationary value at the end,
  and the effective sharpness against the threshold;
* ``stationary_flow.png`` (``--stationary-flow``) — every process side by side:
  the discrete run, the central flow, the stable flow and the two stationary
  flows: loss, effective sharpness, harmonic mean of the effective step sizes,
  and the distance to the discrete run and to the central flow, relative to
  the distance the discrete run travelled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowgen.report.outputs import _plt, write_outputs

PAIR_WORDS = {
    "relax_talk_vs_sdp": "relaxation (talk's ν-rate) vs SDP",
    "relax_default_vs_talk": "relaxation, default ν-rate vs talk's",
    "discrete_vs_sdp": "discrete run's actual P vs P* (SDP)",
    "central_vs_sdp": "central flow's P at N vs P* (SDP)",
    "discrete_vs_relax_talk": "discrete run's actual P vs P* (relaxation)",
    "central_vs_relax_talk": "central flow's P at N vs P* (relaxation)",
}


def _f(x, fmt=".4g") -> str:
    if x is None:
        return "—"
    try:
        if not np.isfinite(x):
            return "—"
    except TypeError:
        return str(x)
    return format(x, fmt)


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


# --------------------------------------------------------------------------- text


def explain_text(res) -> list[tuple[str, str]]:
    """The report as ``(heading, paragraph)`` pairs of plain text (also used by tests)."""
    pt, pc = res.point, res.precond
    c = res.threshold
    N = pt["step"]
    out = []
    out.append(
        (
            "threshold",
            f"c = {c:g} is a threshold on the effective sharpness λ_max(P⁻¹H): the largest "
            "eigenvalue of the loss Hessian H preconditioned by P⁻¹ = diag(p), "
            f"p = {pc['effective_step']}. While it is below c the optimizer follows its stable "
            "flow; when progressive sharpening pushes it above c, the iterate oscillates (period "
            "2) along the top eigenvectors, the oscillation bends the trajectory back, and "
            "λ_max(P⁻¹H) stays at c: the edge of stability.",
        )
    )
    where = (
        f"At step {N} the central flow's effective sharpness is "
        f"{_f(pt['sharpness_central'])} (threshold {c:g}); the discrete run's is "
        f"{_f(pt['sharpness_discrete'])} (mean over the last 50 steps "
        f"{_f(pt['sharpness_discrete_mean_last50'])}). "
    )
    k = pt["n_crit"]
    if k:
        evs = ", ".join(_f(d["eigenvalue"], ".5g") for d in pt["critical_directions"])
        xs = ", ".join(_f(x, ".3g") for x in pt["X_eigenvalues"])
        where += (
            f"{k} critical direction{'s' if k > 1 else ''} (eigenvalue{'s' if k > 1 else ''} "
            f"{evs} of P⁻¹H) carr{'y' if k > 1 else 'ies'} the oscillation; its covariance "
            f"Σ = U X Uᵀ has X eigenvalues {xs}."
        )
        blocks = pt["critical_directions"][0]["blocks"]
        if blocks:
            where += (
                " The top critical direction lives mostly on "
                + ", ".join(f"{name} ({100 * w:.0f}%)" for name, w in blocks)
                + "."
            )
    else:
        where += (
            "No eigenvalue of P⁻¹H is at the threshold: the run is not at the edge of "
            "stability here, Σ = 0 and the central flow is the stable flow."
        )
    out.append(("edge of stability", where))
    if pt["penalty_fraction"] is not None:
        txt = (
            "The oscillation changes the gradient the optimizer sees on average by the implicit "
            f"curvature penalty ½∇⟨H,Σ⟩: {_pct(pt['penalty_fraction'])} of ‖∇L‖ at step {N} "
            f"({_pct(pt['penalty_fraction_preconditioned'])} of the preconditioned step "
            f"P⁻¹∇L; cosine with ∇L {_f(pt['penalty_cos'], '.3f')}). It pushes w̄ towards "
            "flatter regions."
        )
        if pt.get("penalty_fraction_stationary") is not None:
            txt += (
                " With the preconditioner settled (stationary Σ*) it would be "
                f"{_pct(pt['penalty_fraction_stationary'])}."
            )
        out.append(("implicit curvature penalty", txt))
    if not pc["adaptive"]:
        out.append(
            (
                "stationary preconditioner",
                f"{res.optimizer} has no slow preconditioner state: p = {pc['effective_step']} "
                "does not depend on any optimizer state that adapts to the gradients, so there is "
                "no adaptive preconditioner to settle and nothing to relax or to optimise. The "
                f"effective step size is constant: harmonic mean {_f(pt['hmean_central'])} at "
                "every step.",
            )
        )
        return out
    names = pc["slow_states"]
    states = ", ".join(names)
    txt = (
        f"The preconditioner adapts through the slow state{'s' if len(names) > 1 else ''} "
        f"{states}. Freezing w̄ and letting {states} and Σ relax gives the stationary "
        "preconditioner P*(w̄): the step sizes the optimizer would settle to here. "
    )
    rt = res.relax_talk
    if rt is not None:
        txt += (
            "Relaxation (talk's ν-rate, E[g] = ∇L in the state rates): "
            f"{'converged' if rt.converged else 'NOT converged'} after {rt.iterations} units "
            f"of time (dt = 1/{rt.substeps}; last relative change "
            f"{_f(rt.history[-1], '.2g')}), {rt.X.shape[0]} critical direction(s) at the fixed "
            f"point, {rt.time_s:.0f} s. "
        )
    s = res.sdp
    if s is not None:
        txt += (
            f"SDP (min tr P + (1/η²) Σ (∇L_i² + ε)/P_i s.t. H ⪯ {c:g}P: the step sizes with "
            "the largest harmonic mean that keep the point stable): a "
            f"{s.k}×{s.k} LMI in q = 1/P over n = {s.P.size} coordinates, {s.iterations} "
            f"model(s), solve time {s.solve_time_s:.1f} s (last {s.solve_time_last_s:.1f} s); "
            f"verified on the full problem: λ_max(P*⁻¹H) = {s.lam_max:.8g}, margin "
            f"{s.margin:.2g} ({'ok' if s.verified else 'VIOLATED'}), KKT residual "
            f"{s.kkt_residual:.1g}. "
        )
    else:
        txt += f"The SDP does not apply: {pc['sdp_reason']}. "
    cm = res.comparisons
    for key in ("relax_talk_vs_sdp", "relax_default_vs_talk"):
        d = cm.get(key, {})
        if d.get("n_compared"):
            txt += (
                f"{PAIR_WORDS[key]}: median relative error {d['median_rel_err']:.2g}, "
                f"max {d['max_rel_err']:.2g} over {d['n_compared']} coordinates. "
            )
    if "sigma_relax_vs_sdp_dual" in cm:
        sg = cm["sigma_relax_vs_sdp_dual"]
        txt += (
            "The SDP's dual matrix reproduces the relaxed oscillation: "
            f"‖HΣ*H − (η²/c)BYBᵀ‖/‖HΣ*H‖ = {_f(sg['rel_frobenius'], '.2g')}. "
        )
    ref = cm.get("reference")
    d = cm.get(f"discrete_vs_{ref}", {})
    if d.get("n_compared"):
        txt += (
            f"Against the discrete run's actual preconditioner at step {N}: correlation "
            f"{_f(d.get('corr'), '.3f')} (of log P: {_f(d.get('corr_log'), '.3f')}), median "
            f"relative error {d['median_rel_err']:.2g}. "
        )
    if pc.get("n_dead"):
        txt += (
            f"{pc['n_dead']} dead coordinate(s) (∇L_i = 0 and H e_i = 0) are left out: "
            "there ν* = 0 and P* = √ε/η exactly. "
        )
    out.append(("stationary preconditioner", txt.strip()))
    hm = (
        f"Harmonic mean of the effective step sizes n/Σ(1/p_i) at step {N}: discrete "
        f"{_f(pt['hmean_discrete'])}, central flow {_f(pt['hmean_central'])}"
    )
    if pt.get("hmean_stationary") is not None:
        hm += f", stationary {_f(pt['hmean_stationary'])}"
    hm += (
        ". The stationary preconditioner maximises it subject to stability: adapt, but "
        "avoid regions that force small steps (the talk's acceleration via regularization)."
    )
    out.append(("harmonic mean of step sizes", hm))
    if "sdp_bound" in cm:
        b = cm["sdp_bound"]
        out.append(
            (
                "asymptotic SDP",
                f"The SDP holds for this optimizer only in the limit {', '.join(b['limits'])}: "
                f"it is solved for the limit form P_lim = {pc['stationary']['limit']}, while the "
                f"optimizer's preconditioner is P = {pc['stationary']['precond']}. At t = "
                f"{b['t']:g} and the relaxed state ν*, the form differs from P by at most "
                f"{_f(b['bound_max'], '.3g')} (median {_f(b['bound_median'], '.3g')}) per "
                "coordinate; the two computations of P* differ by at most "
                f"{_f(b['measured_max_rel_err'], '.3g')} (median "
                f"{_f(b['measured_median_rel_err'], '.3g')}): the bound "
                f"{'holds' if b['holds'] else 'is EXCEEDED'}. Where the oscillation does not "
                "reach a coordinate the disagreement equals the bound"
                + (
                    f" (measured on {b['n_free']} such coordinates: |difference − bound| ≤ "
                    f"{_f(b['free_max_abs_err_minus_bound'], '.2g')})."
                    if b.get("n_free")
                    else "."
                ),
            )
        )
    if res.flows:
        out.append(("stationary flow", stationary_flow_text(res)))
    return out


def stationary_flow_text(res) -> str:
    """The closing note: the stationary flows' distances against the stable flow's."""
    st = res.flows.get("stationary_flow", {})
    sb = res.flows.get("stable_flow", {})
    N = res.point["step"]
    parts = []
    for form, words in (("exact", "exact form −P*⁻¹[∇L + ½∇⟨H,Σ*⟩]"), ("simplified", "")):
        r = st.get(form)
        if not r:
            continue
        if "skipped" in r:
            parts.append(f"The simplified form is not computed: {r['skipped']}.")
            continue
        label = words or "simplified form −P*⁻¹[∇L + κ∇tr P*] (κ = η²/(2γc), η²/4 for RMSProp)"
        parts.append(
            f"The stationary flow in its {label}, from the central flow's w̄ at step "
            f"{r['start']}, ends {_pct(r['distance_to_discrete_rel'])} of the distance the "
            f"discrete run travelled away from it, and {_pct(r['distance_to_central_rel'])} "
            "away from the central flow."
        )
    if sb:
        parts.append(
            f"For contrast, the stable flow (Σ = 0, from step {sb['start']}) ends "
            f"{_pct(sb['distance_to_discrete_rel'])} from the discrete run and "
            f"{_pct(sb['distance_to_central_rel'])} from the central flow at step {N}."
        )
    ex, sm = st.get("exact", {}), st.get("simplified", {})
    if "distance_to_central_rel" in ex and sb.get("distance_to_central_rel"):
        better = ex["distance_to_central_rel"] < sb["distance_to_central_rel"]
        parts.append(
            "Replacing the preconditioner's state by its stationary value "
            + (
                "keeps the trajectory closer to the central flow than dropping the oscillation "
                "does."
                if better
                else "moves the trajectory further from the central flow than dropping the "
                "oscillation (the stable flow) does: here the preconditioner is far from "
                "stationary."
            )
        )
    if "distance_to_central_rel" in sm and "distance_to_central_rel" in ex:
        parts.append(
            f"The simplified reading (the talk's: RMSProp penalises tr P*) ends "
            f"{_pct(sm['distance_to_central_rel'])} from the central flow against "
            f"{_pct(ex['distance_to_central_rel'])} for the exact stationary flow."
        )
    return " ".join(parts)


def explain_report(res, out: Path | None, console) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console.print(
        f"[bold]flowgen explain: {res.optimizer} on {res.problem}[/bold] at step "
        f"{res.point['step']} (n = {res.n} parameters; central flow from step "
        f"{res.start})"
    )
    for head, para in explain_text(res):
        console.print(Panel(Text(para), title=head, title_align="left", expand=True))
    cm = res.comparisons
    rows = [k for k in PAIR_WORDS if k in cm and cm[k].get("n_compared")]
    if rows:
        tab = Table(title="preconditioners compared (per coordinate)", title_justify="left")
        for col in ("pair", "median rel. err", "max rel. err", "corr", "corr (log)", "coords"):
            tab.add_column(col, justify="left" if col == "pair" else "right")
        for k in rows:
            d = cm[k]
            tab.add_row(
                PAIR_WORDS[k],
                f"{d['median_rel_err']:.3g}",
                f"{d['max_rel_err']:.3g}",
                _f(d.get("corr"), ".5f"),
                _f(d.get("corr_log"), ".5f"),
                str(d["n_compared"]),
            )
        console.print(tab)
    t = res.timings
    console.print(
        "time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items() if k.endswith("_s"))
    )
    if res.flows:
        tab = Table(title="processes at the last step", title_justify="left")
        for col in ("process", "from step", "to discrete / travelled", "to central / travelled"):
            tab.add_column(col, justify="left" if col == "process" else "right")
        rows = [("stable flow", res.flows.get("stable_flow", {}))]
        for form, r in res.flows.get("stationary_flow", {}).items():
            rows.append((f"stationary flow ({form})", r))
        for label, r in rows:
            if not r or "skipped" in r:
                continue
            tab.add_row(
                label,
                str(r["start"]),
                _f(r["distance_to_discrete_rel"], ".4f"),
                _f(r["distance_to_central_rel"], ".4f"),
            )
        console.print(tab)
    if out is not None:
        files = ["report.json", "explain.npz", "harmonic_mean.png"]
        if res.precond["adaptive"]:
            files.append("stationary_preconditioner.png")
        if res.flows:
            files.append("stationary_flow.png")
        console.print(f"wrote {out}/" + ", ".join(files) + ", optimizer.py")


# ------------------------------------------------------------------------- files


def write_explain(res, out: Path, *, opt, command=None) -> list[Path]:
    data = res.to_json()
    data["text"] = dict(explain_text(res))
    arrays = {f"P_{k}": np.asarray(v) for k, v in res.P.items()}
    arrays.update({k: np.asarray(v) for k, v in res.series.items()})
    figures = [lambda o: plot_harmonic_mean(res, o / "harmonic_mean.png")]
    if res.precond["adaptive"] and len(res.P) > 2:
        figures.append(lambda o: plot_stationary(res, o / "stationary_preconditioner.png"))
    if res.flows:
        figures.append(lambda o: plot_stationary_flow(res, o / "stationary_flow.png"))
    return write_outputs(
        out,
        opt=opt,
        command=command,
        json_name="report.json",
        data=data,
        npz_name="explain.npz",
        arrays=arrays,
        figures=figures,
        devices=getattr(res, "devices", None),
    )


def plot_stationary(res, path: Path) -> Path:
    """True vs predicted coordinates of the preconditioner (log-log)."""
    plt = _plt()
    ref = res.comparisons.get("reference", "relax_talk")
    Pstar = np.asarray(res.P[ref])
    live = np.ones(Pstar.size, bool)
    if res.sdp is not None:
        live = ~res.sdp.dead
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    ax = axes[0]
    x = Pstar[live]
    ax.scatter(
        x,
        np.asarray(res.P["discrete"])[live],
        s=4,
        alpha=0.5,
        color="C0",
        label="discrete run: √(ν+ε)/η at step N",
    )
    ax.scatter(
        x,
        np.asarray(res.P["central"])[live],
        s=3,
        alpha=0.4,
        color="C3",
        label="central flow at step N",
    )
    lo, hi = np.nanmin(x[x > 0]), np.nanmax(x)
    ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls=":", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    label = "SDP" if ref == "sdp" else "relaxation"
    ax.set_xlabel(f"stationary P* ({label})")
    ax.set_ylabel("actual P")
    d = res.comparisons.get(f"discrete_vs_{ref}", {})
    ax.set_title(
        f"predicted vs true coordinates: corr(log) {_f(d.get('corr_log'), '.3f')}, "
        f"median rel. err {_f(d.get('median_rel_err'), '.2g')}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    if "sdp" in res.P and "relax_talk" in res.P:
        a, b = np.asarray(res.P["relax_talk"])[live], np.asarray(res.P["sdp"])[live]
        ax.scatter(b, a, s=4, color="C2", label="relaxation (talk's ν-rate)")
        if "relax_default" in res.P:
            ax.scatter(
                b,
                np.asarray(res.P["relax_default"])[live],
                s=2,
                color="C1",
                alpha=0.5,
                label="relaxation (default ν-rate)",
            )
        ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls=":")
        d = res.comparisons.get("relax_talk_vs_sdp", {})
        ax.set_title(
            "two computations of P*: median rel. err "
            f"{_f(d.get('median_rel_err'), '.2g')}, max {_f(d.get('max_rel_err'), '.2g')}",
            fontsize=10,
        )
        ax.set_xlabel("P* from the SDP")
        ax.set_ylabel("P* from relaxing the central flow with w̄ frozen")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.hist(np.log10(x), bins=60, color="C2")
        ax.set_xlabel("log10 P* (relaxation)")
        ax.set_title("stationary preconditioner (no SDP for this optimizer)", fontsize=10)
    fig.suptitle(
        f"{res.optimizer} on {res.problem}: the stationary preconditioner at step "
        f"{res.point['step']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_harmonic_mean(res, path: Path) -> Path:
    plt = _plt()
    s = res.series
    x = s["step"]
    N = res.point["step"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    m = np.isfinite(s["hmean_discrete"])
    ax.plot(x[m], s["hmean_discrete"][m], color="C0", lw=1, label="discrete")
    m = np.isfinite(s["hmean_central"])
    ax.plot(x[m], s["hmean_central"][m], color="C3", lw=1.5, ls="--", label="central flow")
    if res.point.get("hmean_stationary") is not None:
        ax.plot([N], [res.point["hmean_stationary"]], "k*", ms=10, label="stationary P* at N")
    ax.set_yscale("log")
    from matplotlib.ticker import LogFormatter

    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
    ax.set_xlabel("step")
    ax.set_title("harmonic mean of effective step sizes n / Σ(1/p_i)")
    ax.legend(fontsize=8)
    ax = axes[1]
    m = np.isfinite(s["sharpness_discrete"])
    ax.plot(x[m], s["sharpness_discrete"][m], color="C0", lw=0.8, label="discrete")
    m = np.isfinite(s["sharpness_central"])
    ax.plot(x[m], s["sharpness_central"][m], color="C3", lw=1.5, label="central flow")
    c = res.threshold
    ax.axhline(c, color="k", ls=":", label=f"threshold c = {c:g}")
    ax.set_ylim(0, 2 * c)
    ax.set_xlabel("step")
    ax.set_title(r"effective sharpness $\lambda_{\max}(P^{-1}H)$")
    ax.legend(fontsize=8)
    fig.suptitle(f"{res.optimizer} on {res.problem}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stationary_flow(res, path: Path) -> Path:
    """Every process side by side (``--stationary-flow``)."""
    from flowgen.runtime.validate import centred_window

    plt = _plt()
    s = res.series
    x = s["step"]
    N = res.point["step"]
    procs = [
        ("discrete", "discrete", "C0", "-", 0.8),
        ("central", "central flow", "C3", "-", 1.6),
        ("stable", "stable flow", "C2", ":", 1.4),
        ("stationary_exact", "stationary flow (exact)", "C1", "--", 1.6),
        ("stationary_simplified", "stationary flow (simplified)", "C4", "-.", 1.4),
    ]
    st = res.flows.get("stationary_flow", {})
    starts = [r["start"] for r in st.values() if "start" in r]
    lo = max(min([res.start, *starts]) - 20, 0)
    sel = x >= lo
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))

    def line(ax, key, label, color, ls, lw):
        if key in s:
            y = np.asarray(s[key], float)
            m = sel & np.isfinite(y)
            if m.any():
                ax.plot(x[m], y[m], color=color, ls=ls, lw=lw, label=label)

    ax = axes[0, 0]
    line(ax, "loss_discrete", "discrete", "C0", "-", 0.5)
    if "loss_discrete" in s:
        ax.plot(x[sel], centred_window(s["loss_discrete"], 21)[sel], color="C0", lw=1.4,
                label="discrete, 21-step mean")  # fmt: skip
    for key, label, color, ls, lw in procs[1:]:
        line(ax, f"loss_{key}", label, color, ls, lw)
    ax.set_yscale("log")
    ax.set_title("train loss L(w)")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for key, label, color, ls, lw in procs:
        line(ax, f"sharpness_{key}", label, color, ls, lw)
    c = res.threshold
    ax.axhline(c, color="k", ls=":", lw=1)
    ax.set_ylim(0, 2 * c)
    ax.set_title(r"effective sharpness $\lambda_{\max}(P^{-1}H)$ (stationary flows: $P^*$)")
    ax = axes[1, 0]
    for key, label, color, ls, lw in procs:
        line(ax, f"hmean_{key}", label, color, ls, lw)
    ax.set_yscale("log")
    ax.set_title("harmonic mean of effective step sizes n/Σ(1/p_i)")
    ax = axes[1, 1]
    for key, label, color, ls, lw in procs[1:]:
        name = key if key != "central" else None
        trav = s.get(f"distance_travelled_{key}", s.get("distance_travelled"))
        if trav is None:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            if name is None:
                y = np.asarray(s.get("distance_central", np.full_like(x, np.nan))) / trav
                m = sel & np.isfinite(y)
                ax.plot(x[m], y[m], color=color, ls=ls, lw=lw, label="central flow to discrete")
                continue
            y = np.asarray(s.get(f"distance_to_discrete_{key}", np.full_like(x, np.nan))) / trav
            m = sel & np.isfinite(y)
            ax.plot(x[m], y[m], color=color, ls=ls, lw=lw, label=f"{label} to discrete")
            y = np.asarray(s.get(f"distance_to_central_{key}", np.full_like(x, np.nan))) / trav
            m = sel & np.isfinite(y)
            ax.plot(x[m], y[m], color=color, ls=ls, lw=0.8, alpha=0.6,
                    label=f"{label} to central")  # fmt: skip
    ax.set_yscale("log")
    ax.set_title("distance / distance the discrete run travelled")
    ax.legend(fontsize=6, ncol=2)
    for ax in axes.ravel():
        ax.set_xlabel("step")
    fig.suptitle(f"{res.optimizer} on {res.problem}: the processes side by side (to step {N})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
