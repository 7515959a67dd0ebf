"""``flowgen explain``: what an adaptive optimizer adapts to (``docs/mathematics.md`` §4).

Runs the discrete optimizer and the central flow to step ``N`` in lockstep
(:class:`~flowgen.runtime.loop.Experiment`, checkpointed), then interprets the
flow at ``w̄(N)``: the effective sharpness and critical directions, the implicit
curvature penalty ``½∇⟨H,Σ⟩``, and the stationary preconditioner ``P*(w̄)``
computed two independent ways (:mod:`flowgen.runtime.stationary`: relaxation and,
where the derivation says the SDP applies — exactly or asymptotically — the SDP),
compared with each other and with the discrete run's actual preconditioner. In
the asymptotic case (bias correction, ε outside the root) the agreement is
reported with the bound ``max_i |P(ν*_i, t)/P_lim(ν*_i) − 1|`` at the current
``t``, ``ε`` and ``ν*``.

With ``stationary_flow=True`` the same experiment also runs, as lanes of the
loop, the stable flow (from the discrete iterate at the flows' start) and the
stationary flows (:mod:`flowgen.runtime.stationary_flow`; exact and simplified)
from the central flow's ``w̄`` at ``stationary_from`` (default: the central
flow's start), each compared with the discrete run and the central flow.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import UsageError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime.central import CentralConfig, CentralFlow
from flowgen.runtime.checkpoint import CheckpointStore
from flowgen.runtime.loop import Experiment, FlowLane, Progress, default_start, no_progress
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.processes import StableFlow
from flowgen.runtime.series import json_values
from flowgen.runtime.stationary import (
    Relaxation,
    SDPResult,
    compare,
    dead_coordinates,
    form_error,
    harmonic_mean,
    relax,
    sigma_agreement,
    slow_precond_states,
    stationary_form,
    stationary_scalar,
    stationary_sdp,
)
from flowgen.runtime.stationary_flow import StationaryConfig, StationaryFlow, resolve_method

__all__ = ["ExplainConfig", "Explanation", "explain", "sdp_bound"]


@dataclass(frozen=True)
class ExplainConfig:
    steps: int = 600  # run the discrete optimizer and the central flow to this step
    restart_at: int | None = None  # central flow from the discrete iterate here (None: start)
    substeps: int = 2  # central flow (the run): Euler substeps per step (CentralConfig's)
    refine_tol: float | None = None  # its step control (None: CentralConfig's default)
    eig_every: int = 5  # discrete effective sharpness every K steps
    chunk: int = 25
    relax_tol: float = 1e-7
    relax_max_units: int = 5000
    relax_substeps: int = 1
    default_form: bool = True  # also relax with the derivation's default moment form
    sdp_k: int = 12
    sdp_k_max: int = 48
    sdp_tol: float = 1e-6
    stationary_flow: bool = False  # also run the stable flow and the stationary flows
    stationary_from: int | None = None  # their start (None: the central flow's start)
    stationary_substeps: int = 2  # Euler substeps per step of the stationary flows
    stationary_method: str = "auto"  # how P* is recomputed along them (stationary_flow.py)


@dataclass
class Explanation:
    optimizer: str
    problem: str
    n: int
    threshold: float
    config: ExplainConfig
    start: int
    precond: dict  # slow states, adaptive?, SDP form or why not
    point: dict  # the state of the run at N
    series: dict  # per step
    P: dict  # name -> (n,) preconditioner diagonals
    comparisons: dict
    relax_talk: Relaxation | None = None
    relax_default: Relaxation | None = None
    sdp: SDPResult | None = None
    timings: dict = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # the devices the run used
    flows: dict = field(default_factory=dict)  # stationary_flow, stable_flow (report.json)

    def to_json(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "problem": self.problem,
            "n_params": self.n,
            "threshold": self.threshold,
            "config": asdict(self.config),
            "flow_start": self.start,
            "preconditioner": self.precond,
            "point": self.point,
            "relaxation_talk": self.relax_talk.summary() if self.relax_talk else None,
            "relaxation_default": self.relax_default.summary() if self.relax_default else None,
            "sdp": self.sdp.summary() if self.sdp else None,
            "comparisons": self.comparisons,
            "timings": self.timings,
            "series": {k: json_values(v) for k, v in self.series.items()},
            **self.flows,
        }


def _block_weights(problem: Problem, u: np.ndarray, top: int = 3) -> list[tuple[str, float]]:
    """Share of ``‖u‖²`` per parameter block (pytree leaf), largest first."""
    if problem.unravel is None:
        return []
    tree = problem.unravel(jnp.asarray(np.asarray(u) ** 2))
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    tot = float(np.sum(np.asarray(u) ** 2)) or 1.0
    out = [(jax.tree_util.keystr(path), float(jnp.sum(x)) / tot) for path, x in leaves]
    return sorted(out, key=lambda kv: -kv[1])[:top]


@in_float64
def explain(
    opt: Optimizer,
    problem: Problem,
    config: ExplainConfig = ExplainConfig(),
    progress: Progress | None = None,
    *,
    store: CheckpointStore | None = None,
    resume: bool = False,
    should_stop=None,
) -> Explanation:
    """Run to ``config.steps``, then interpret the flow at ``w̄(N)`` (module docstring)."""
    N = int(config.steps)
    c = opt.threshold
    if c is None or not opt.has_precond:
        raise UsageError(
            f"{opt.name} has no stability threshold on λ_max(P⁻¹H): nothing to explain"
        )
    if not opt.spec.has_central:
        raise UsageError(f"{opt.name} has no central flow: {opt.spec.central_reason}")
    prog = progress or no_progress
    timings = {}
    n = problem.n
    slow = slow_precond_states(opt)

    # 1–2. the discrete run and the central flow to N, in lockstep
    start = default_start(opt) if config.restart_at is None else int(config.restart_at)
    if start >= N:
        raise UsageError(
            f"the central flow would start at step {start}, at or after step {N}",
            hint="run more --steps or restart earlier",
        )
    ccfg = CentralConfig.given(substeps=config.substeps, refine_tol=config.refine_tol)

    flows = [
        FlowLane(
            "central",
            lambda w, s, t: CentralFlow(opt, problem, w, s, t, ccfg),
            rename={"loss_pred": "loss_pred", "n_crit": "n_crit"},
        )
    ]
    stat_lanes, skipped = [], {}
    if config.stationary_flow:
        stat_lanes, skipped = _stationary_lanes(opt, problem, config, start, N)
        flows.append(
            FlowLane(
                "stable",
                lambda w, s, t: StableFlow(opt, problem, w, s, t),
                measure_sharpness=True,
                compare=("central",),
            )
        )
        flows.extend(stat_lanes)

    def hmeans(exp, rows):
        r = rows.get("central")
        if r is not None and "p" in r.extra:
            exp.series.put("hmean_central", r.steps, [harmonic_mean(p) for p in r.extra["p"]])
        r = rows.get("stable")
        if r is not None:
            exp.series.put(
                "hmean_stable", r.steps, np.asarray(exp._hm(r.w, r.states, r.steps + 1.0))
            )

    exp = Experiment(
        opt,
        problem,
        steps=N,
        flows=tuple(flows),
        start=start,
        chunk=config.chunk,
        eig_every=config.eig_every,
        store=store,
        resume=resume,
        progress=progress,
        should_stop=should_stop,
        after_chunk=hmeans,
    ).run()
    timings["discrete_s"] = exp.timings.get("discrete_s", 0.0) + exp.timings.get("sharpness_s", 0.0)
    timings["central_s"] = exp.timings.get("central_s", 0.0)
    ser = {
        k: np.array(exp.series[k])
        for k in (
            "loss_discrete",
            "loss_central",
            "loss_pred",
            "sharpness_discrete",
            "sharpness_central",
            "hmean_discrete",
            "hmean_central",
            "n_crit",
            "distance_central",
            "distance_travelled",
        )
    }
    w_disc, s_disc = exp.discrete.w, exp.discrete.state
    p_disc = np.asarray(opt.effective_step(w_disc, s_disc, float(N + 1)))
    central = exp.procs["central"]
    tic = time.perf_counter()
    L_N, rec, info = central.point()
    w_bar = central.w
    s_bar = central.state
    p_c = np.asarray(info["p"])
    ser["loss_central"][N] = L_N
    X = np.asarray(info["X"])
    lam = np.asarray(info["lam"])
    ser["loss_pred"][N] = L_N + (0.5 * float(np.sum(lam * np.diag(X))) if X.size else 0.0)
    ser["sharpness_central"][N] = info["sharpness"]
    ser["n_crit"][N] = X.shape[0]
    ser["hmean_central"][N] = harmonic_mean(p_c)
    timings["central_s"] += time.perf_counter() - tic

    # 3. the point: sharpness, critical directions, implicit curvature penalty
    g0, Eg = np.asarray(info["g0"]), np.asarray(info["Eg"])
    pen = Eg - g0
    gn = float(np.linalg.norm(g0))
    Q = np.asarray(info["Q"])
    crit = []
    Xe, Xv = np.linalg.eigh(X) if X.size else (np.zeros(0), np.zeros((0, 0)))
    for j in range(X.shape[0]):
        u = np.sqrt(p_c) * Q[:, j]
        crit.append(
            {
                "eigenvalue": float(lam[j]),
                "X_jj": float(X[j, j]),
                "blocks": _block_weights(problem, u),
            }
        )
    sd = ser["sharpness_discrete"]
    lo = max(N - 50, 0)
    window = sd[lo : N + 1][np.isfinite(sd[lo : N + 1])]
    point = {
        "step": N,
        "sharpness_central": float(info["sharpness"]),
        "sharpness_discrete": float(sd[N]) if np.isfinite(sd[N]) else None,
        "sharpness_discrete_mean_last50": float(np.mean(window)) if window.size else None,
        "tracked_eigenvalues": [float(x) for x in np.asarray(rec.evals)],
        "n_crit": int(X.shape[0]),
        "X_eigenvalues": [float(x) for x in Xe],
        "critical_directions": crit,
        "grad_norm": gn,
        "penalty_norm": float(np.linalg.norm(pen)),
        "penalty_fraction": float(np.linalg.norm(pen) / gn) if gn > 0 else None,
        "penalty_fraction_preconditioned": float(
            np.linalg.norm(p_c * pen) / np.linalg.norm(p_c * g0)
        )
        if gn > 0
        else None,
        "penalty_cos": float(np.dot(pen, g0) / (np.linalg.norm(pen) * gn))
        if gn > 0 and np.linalg.norm(pen) > 0
        else None,
        "loss_central": float(L_N),
        "loss_pred": float(ser["loss_pred"][N]),
        "loss_discrete": float(ser["loss_discrete"][N]),
        "hmean_discrete": float(ser["hmean_discrete"][N]),
        "hmean_central": float(ser["hmean_central"][N]),
        "at_eos": bool(info["sharpness"] >= c * (1 - ccfg.margin)),
    }

    # 4. the stationary preconditioner
    form, why = (
        stationary_form(opt) if slow else (None, "the optimizer has no slow preconditioner state")
    )
    st_spec = getattr(opt.spec, "stationary", None)
    precond = {
        "slow_states": slow,
        "adaptive": bool(slow),
        "effective_step": str(opt.spec.stability.effective_step),
        "sdp_applicable": form is not None,
        "sdp_reason": why,
        "form": asdict(form) if form else None,
        "sdp_kind": st_spec.kind if st_spec is not None else None,
        "stationary": st_spec.to_json() if st_spec is not None else None,
    }
    P = {"discrete": 1.0 / p_disc, "central": 1.0 / p_c}
    comps = {}
    rel_t = rel_d = sdp = None
    if slow:
        tic = time.perf_counter()
        rel_t = relax(
            opt,
            problem,
            w_bar,
            s_bar,
            N,
            moment_form="talk",
            tol=config.relax_tol,
            max_units=config.relax_max_units,
            substeps=config.relax_substeps,
            progress=prog,
            label="relax (talk form)",
        )
        timings["relax_talk_s"] = time.perf_counter() - tic
        P["relax_talk"] = rel_t.P
        if config.default_form:
            tic = time.perf_counter()
            st = {k: jnp.asarray(v) for k, v in rel_t.states.items()}
            rel_d = relax(
                opt,
                problem,
                w_bar,
                st,
                N,
                moment_form="consistent",
                tol=config.relax_tol,
                max_units=config.relax_max_units,
                substeps=config.relax_substeps,
                progress=prog,
                label="relax (default form)",
            )
            timings["relax_default_s"] = time.perf_counter() - tic
            P["relax_default"] = rel_d.P
        point["penalty_fraction_stationary"] = (
            float(np.linalg.norm(rel_t.penalty) / np.linalg.norm(rel_t.g0)) if gn > 0 else None
        )
        point["hmean_stationary"] = harmonic_mean(rel_t.p)
        if form is not None:
            tic = time.perf_counter()
            if form.shape == "scalar":
                sdp = stationary_scalar(
                    problem.loss, w_bar, form.lr, eps=form.eps, threshold=c,
                    alpha=form.alpha, const=form.const, tol=config.sdp_tol,
                )  # fmt: skip
            else:
                sdp = stationary_sdp(
                    problem.loss,
                    w_bar,
                    form.lr,
                    eps=form.eps,
                    threshold=c,
                    k=config.sdp_k,
                    k_max=config.sdp_k_max,
                    tol=config.sdp_tol,
                    progress=prog,
                    alpha=form.alpha,
                    const=form.const,
                )
            timings["sdp_s"] = time.perf_counter() - tic
            P["sdp"] = sdp.P
            dead = sdp.dead
        else:
            dead = dead_coordinates(problem.loss, w_bar)
        live = ~dead
        precond["n_dead"] = int(dead.sum())
        ref = "sdp" if sdp is not None else "relax_talk"
        if sdp is not None:
            comps["relax_talk_vs_sdp"] = compare(rel_t.P, sdp.P, mask=live)
            if form.shape == "diagonal":
                comps["sigma_relax_vs_sdp_dual"] = sigma_agreement(rel_t, sdp)
            if form.kind == "asymptotic":
                comps["sdp_bound"] = sdp_bound(form, rel_t, sdp, live, t=N + 1)
        if rel_d is not None:
            comps["relax_default_vs_talk"] = compare(rel_d.P, rel_t.P, mask=live)
        comps[f"discrete_vs_{ref}"] = compare(P["discrete"], P[ref], mask=live)
        comps[f"central_vs_{ref}"] = compare(P["central"], P[ref], mask=live)
        comps["reference"] = ref
        comps["coordinates"] = (
            "all coordinates except dead ones (∇L_i = 0 and H e_i = 0, where "
            "P* = √ε/η in both computations)"
        )
    flows_report = {}
    if config.stationary_flow:
        flows_report = _flows_report(exp, N, stat_lanes, skipped, ser)
        for name in ("stable", *(lane.name for lane in stat_lanes)):
            timings[f"{name}_s"] = exp.timings.get(f"{name}_s", 0.0)
    timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s"))
    return Explanation(
        optimizer=opt.name,
        problem=problem.name,
        n=n,
        threshold=float(c),
        config=config,
        start=start,
        precond=precond,
        point=point,
        series={"step": np.arange(N + 1.0), **ser},
        P=P,
        comparisons=comps,
        relax_talk=rel_t,
        relax_default=rel_d,
        sdp=sdp,
        timings=timings,
        devices=exp.placement.describe(),
        flows=flows_report,
    )


def sdp_bound(form, rel: Relaxation, sdp: SDPResult, live, *, t: float) -> dict:
    """The asymptotic SDP against the relaxation, with the bound at the current state.

    The SDP is solved for the limit form ``P_lim(ν) = √(ν + ε_in)/η``; the optimizer's
    preconditioner at the relaxed state is ``P(ν*, t)`` (``rel.P``). The bound is the
    error of the form there, ``r_i = P(ν*_i, t)/P_lim(ν*_i) − 1`` (the limits not yet
    reached at this ``t``, ``ε`` and ``ν*``). Where the stability constraint does not
    bind, ``P*_i`` is the form applied to ``ν*_i = α∇L_i² + β`` in both computations,
    so the disagreement there *is* ``|r_i|`` (the bound is attained); where it binds,
    ``P*_i`` is set by the curvature and moves less. ``holds`` compares the largest
    measured disagreement with the largest ``|r_i|`` (a measured statement, not a theorem).
    """
    nu = np.asarray(rel.states[form.state], float)
    r = np.abs(form_error(form, rel.P, nu))
    live = np.asarray(live, bool) & np.isfinite(r)
    P_sdp = np.asarray(sdp.P, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(np.asarray(rel.P, float) - P_sdp) / P_sdp
    ok = live & np.isfinite(err)
    bound_max = float(np.max(r[ok])) if ok.any() else float("nan")
    meas_max = float(np.max(err[ok])) if ok.any() else float("nan")
    # coordinates the oscillation does not reach (no binding direction there)
    free = ok & (np.asarray(rel.Vg, float) <= 1e-12 * max(float(np.max(rel.Vg)), 1e-300))
    return {
        "kind": form.kind,
        "limits": list(form.limits),
        "t": float(t),
        "bound": "max_i |P(nu*_i, t)/P_lim(nu*_i) - 1| over live coordinates",
        "bound_max": bound_max,
        "bound_median": float(np.median(r[ok])) if ok.any() else float("nan"),
        "measured_max_rel_err": meas_max,
        "measured_median_rel_err": float(np.median(err[ok])) if ok.any() else float("nan"),
        "holds": bool(meas_max <= bound_max * (1 + 1e-6) + 1e-12),
        "n_free": int(free.sum()),
        "free_max_abs_err_minus_bound": float(np.max(np.abs(err[free] - r[free])))
        if free.any()
        else None,
    }


def _stationary_lanes(opt, problem, config: ExplainConfig, start: int, N: int):
    """The stationary-flow lanes (exact, simplified where the SDP of a diagonal
    preconditioner applies), from the central flow's w̄ at ``stationary_from``."""
    at = config.stationary_from
    if at is not None and not start <= int(at) < N:
        raise UsageError(
            f"the stationary flows would start at step {at}, outside the central flow's "
            f"steps {start}..{N - 1}"
        )
    lanes, skipped = [], {}
    for form in ("exact", "simplified"):
        cfg = StationaryConfig(
            form=form, method=config.stationary_method, substeps=config.stationary_substeps
        )
        try:
            resolve_method(opt, cfg)
        except UsageError as err:
            if form == "exact":
                raise
            skipped[form] = err.message
            continue

        def make(w, s, t, cfg=cfg):
            return StationaryFlow(opt, problem, w, s, t, cfg)

        lanes.append(
            FlowLane(
                f"stationary_{form}",
                make,
                source="central",
                start=None if at is None else int(at),
                compare=("central",),
                label=f"stationary flow ({form})",
            )
        )
    return lanes, skipped


def _flows_report(exp: Experiment, N: int, lanes, skipped: dict, ser: dict) -> dict:
    """``stationary_flow`` and ``stable_flow`` for report.json (and their series in ``ser``)."""
    S = exp.series

    def one(name: str) -> dict:
        trav_key = (
            f"distance_travelled_{name}"
            if f"distance_travelled_{name}" in S
            else "distance_travelled"
        )
        trav = float(S[trav_key][N])
        d_disc = float(S[f"distance_{name}"][N])
        d_cent = float(S[f"distance_{name}_central"][N])
        keys = ("loss", "sharpness", "hmean", "trace_P", "n_crit", "penalty_norm", "grad_norm")
        series = {k: S[f"{k}_{name}"] for k in keys if f"{k}_{name}" in S}
        series["distance_to_discrete"] = S[f"distance_{name}"]
        series["distance_to_central"] = S[f"distance_{name}_central"]
        series["distance_travelled"] = S[trav_key]
        for k, v in series.items():
            ser[f"{k}_{name}"] = np.asarray(v)
        return {
            "start": int(exp.lane_starts.get(name, exp.flow_start)),
            "distance_to_discrete": d_disc,
            "distance_to_central": d_cent,
            "distance_travelled": trav,
            "distance_to_discrete_rel": d_disc / trav if trav > 0 else float("nan"),
            "distance_to_central_rel": d_cent / trav if trav > 0 else float("nan"),
            "final": {k: float(np.asarray(v)[N]) for k, v in series.items()},
            "series": {k: json_values(v) for k, v in series.items()},
        }

    stable = one("stable")
    if "hmean_stable" in S:
        stable["series"]["hmean"] = json_values(S["hmean_stable"])
        ser["hmean_stable"] = np.asarray(S["hmean_stable"])
    out = {"stable_flow": stable}
    stat = {}
    for lane in lanes:
        form = lane.name.split("_", 1)[1]
        rep = one(lane.name)
        proc = exp.procs.get(lane.name)
        if proc is not None:
            rep["method"] = proc.method
            rep["substeps"] = int(proc.cfg.substeps)
            rep["stats"] = dict(proc.stats)
            rep["timings"] = dict(proc.timings)
        stat[form] = rep
    for form, why in skipped.items():
        stat[form] = {"skipped": why}
    out["stationary_flow"] = stat
    return out
