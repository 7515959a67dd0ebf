"""``flowgen explain``: what an adaptive optimizer adapts to (``central-flows.md`` §4).

Runs the discrete optimizer and the central flow to step ``N`` in lockstep
(:class:`~flowgen.runtime.loop.Experiment`, checkpointed), then interprets the
flow at ``w̄(N)``: the effective sharpness and critical directions, the implicit
curvature penalty ``½∇⟨H,Σ⟩``, and the stationary preconditioner ``P*(w̄)``
computed two independent ways (:mod:`flowgen.runtime.stationary`: relaxation and,
for the RMSProp family, the SDP), compared with each other and with the discrete
run's actual preconditioner.
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
from flowgen.runtime.series import json_values
from flowgen.runtime.stationary import (
    Relaxation,
    SDPResult,
    compare,
    dead_coordinates,
    harmonic_mean,
    relax,
    rmsprop_form,
    sigma_agreement,
    slow_precond_states,
    stationary_sdp,
)

__all__ = ["ExplainConfig", "Explanation", "explain"]


@dataclass(frozen=True)
class ExplainConfig:
    steps: int = 600  # run the discrete optimizer and the central flow to this step
    restart_at: int | None = None  # central flow from the discrete iterate here (None: start)
    substeps: int = 4  # central flow (the run): Euler substeps per step
    eig_every: int = 5  # discrete effective sharpness every K steps
    chunk: int = 25
    relax_tol: float = 1e-7
    relax_max_units: int = 5000
    relax_substeps: int = 1
    default_form: bool = True  # also relax with the derivation's default moment form
    sdp_k: int = 12
    sdp_k_max: int = 48
    sdp_tol: float = 1e-6


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
    ccfg = CentralConfig(substeps=config.substeps)

    def hmean_central(exp, rows):
        r = rows.get("central")
        if r is not None and "p" in r.extra:
            exp.series.put("hmean_central", r.steps, [harmonic_mean(p) for p in r.extra["p"]])

    exp = Experiment(
        opt,
        problem,
        steps=N,
        flows=(
            FlowLane(
                "central",
                lambda w, s, t: CentralFlow(opt, problem, w, s, t, ccfg),
                rename={"loss_pred": "loss_pred", "n_crit": "n_crit"},
            ),
        ),
        start=start,
        chunk=config.chunk,
        eig_every=config.eig_every,
        store=store,
        resume=resume,
        progress=progress,
        should_stop=should_stop,
        after_chunk=hmean_central,
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
        )
    }
    w_disc, s_disc = exp.discrete.w, exp.discrete.state
    p_disc = np.asarray(opt.effective_step(w_disc, s_disc, float(N + 1)))
    central = exp.procs["central"]
    tic = time.perf_counter()
    probe = CentralFlow(opt, problem, central.w, central.state, N, ccfg)
    probe.eig = central.eig
    L_N, rec, info = probe.substep()
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
        rmsprop_form(opt, float(N + 1))
        if slow
        else (None, "the optimizer has no slow preconditioner state")
    )
    precond = {
        "slow_states": slow,
        "adaptive": bool(slow),
        "effective_step": str(opt.spec.stability.effective_step),
        "sdp_applicable": form is not None,
        "sdp_reason": why,
        "form": asdict(form) if form else None,
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
            comps["sigma_relax_vs_sdp_dual"] = sigma_agreement(rel_t, sdp)
        if rel_d is not None:
            comps["relax_default_vs_talk"] = compare(rel_d.P, rel_t.P, mask=live)
        comps[f"discrete_vs_{ref}"] = compare(P["discrete"], P[ref], mask=live)
        comps[f"central_vs_{ref}"] = compare(P["central"], P[ref], mask=live)
        comps["reference"] = ref
        comps["coordinates"] = (
            "all coordinates except dead ones (∇L_i = 0 and H e_i = 0, where "
            "P* = √ε/η in both computations)"
        )
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
    )
