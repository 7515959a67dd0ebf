"""The stationary flow (talk, "The Stationary RMSProp Central Flow"), as a process.

Along the central flow the preconditioner's slow state ``ν`` relaxes towards its
stationary value ``ν*(w̄)`` on the time scale ``β₂/(1 − β₂)``. The *stationary
flow* assumes it is always there: the optimizer's states and ``Σ`` are replaced
by their stationary values at the current ``w̄`` (:mod:`flowgen.runtime.stationary`),

* ``form="exact"``:       ``dw̄/dt = −P*(w̄)⁻¹ [∇L(w̄) + ½∇⟨H(w̄), Σ*(w̄)⟩]``;
* ``form="simplified"``:  ``dw̄/dt = −P*(w̄)⁻¹ [∇L(w̄) + κ ∇tr P*(w̄)]`` with
  ``κ = η²/(2γc)`` (``η²/4`` for RMSProp, c = 2, γ = 1), the talk's reading
  "RMSProp implicitly penalises tr P*". ``∇tr P*`` comes from implicit
  differentiation of the SDP's KKT system (:func:`~flowgen.runtime.stationary.trace_gradient`).

The two forms differ by what the simplification drops: by the envelope theorem
(``f* = tr P* + Σ a_i/P*_i`` the SDP's optimal value),
``½∇⟨H, Σ*⟩ = κ [∇f* − (2α/η²) H (∇L/P*)]``, so the simplified form replaces
``∇f*`` by ``∇tr P*`` and drops the gradient term — small when the oscillation,
not the gradient, sets ``P*``.

``P*(w̄)`` and ``Σ*(w̄)`` are recomputed at every substep (``method``):

* ``"kkt"`` (default where the SDP applies): Newton on the SDP's KKT system from
  the previous point (a few CG solves of Hessian-vector products); the set of
  binding directions is checked with the eigensolver (the next eigenvalue of
  ``P*⁻¹H`` below ``c``) and, when it changes, the SDP is solved again from the
  previous ``P*`` and polished;
* ``"sdp"``: the SDP (cvxpy) at every substep, warm-started from the previous ``P*``;
* ``"relax"``: the relaxation of the derived central-flow rates with ``w̄``
  frozen, warm-started from the previous ``ν*`` (generic: any optimizer with a
  slow preconditioner state; exact form only);
* ``"scalar"``: a scalar ``ν`` (scalar RMSProp), in closed form
  ``P* = max(√(α‖∇L‖² + β + ε)/η, λ_max(H)/c)``, ``Σ* = σ u uᵀ`` on the top
  eigenvector of ``H`` (exact form only).

Which warm start is cheaper for the same accuracy is measured in
``docs/interpretation.md``. Time is integrated with explicit Euler,
``substeps`` per unit (one unit = one step). Along the binding directions the
flow's rate is ``c`` times the step (``λ_max(P*⁻¹H) = c``), so ``dt = 1/2``
damps them in one substep where ``dt = 1`` would oscillate, as the discrete
optimizer does.

Records at the integer times ``t0+1 … t0+K`` (``advance``): ``loss``,
``grad_norm``, ``sharpness`` (``λ_max(P*⁻¹H)``), ``hmean`` (``n/Σ 1/p_i``,
``p = 1/P*``), ``trace_P`` (``tr P*``), ``n_crit`` (binding directions) and
``penalty_norm`` (``‖½∇⟨H,Σ*⟩‖`` or ``‖κ∇tr P*‖``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import SimulationError, UsageError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime import derivatives, eigen
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.stationary import (
    KKTPoint,
    PrecondForm,
    a_floor,
    curvature_penalty,
    dead_coordinates,
    kkt_from_relaxation,
    kkt_from_sdp,
    kkt_polish,
    kkt_predict,
    relax,
    slow_precond_states,
    stationary_form,
    stationary_scalar,
    stationary_sdp,
    trace_gradient,
    verify_kkt,
)

__all__ = ["FORMS", "METHODS", "StationaryConfig", "StationaryFlow", "StationaryPoint"]

FORMS = ("exact", "simplified")
METHODS = ("auto", "kkt", "sdp", "relax", "scalar")


@dataclass(frozen=True)
class StationaryConfig:
    form: str = "exact"  # exact | simplified (module docstring)
    method: str = "auto"  # how P* is recomputed: auto | kkt | sdp | relax | scalar
    substeps: int = 2  # Euler substeps per unit of time
    kkt_tol: float = 1e-10  # Newton: KKT residual
    bind_tol: float = 1e-6  # a new direction binds when λ_{k+1}(P*⁻¹H) > c (1 + bind_tol)
    sdp_k: int = 12  # LMI size of the SDP (cold start and re-solves)
    sdp_tol: float = 1e-6
    relax_tol: float = 1e-6  # relaxation (method relax): relative change per unit
    relax_max_units: int = 5000
    relax_substeps: int = 1  # relaxation: Euler substeps per unit (4: a smaller Euler bias in Σ*)
    max_added: int = 4  # kkt: binding directions added per point before giving up


@dataclass
class StationaryPoint:
    """``P*`` and the flow's right-hand side at one ``w̄``."""

    P: np.ndarray  # (n,) P*
    penalty: np.ndarray  # (n,) ½∇⟨H,Σ*⟩ (exact) or κ∇tr P* (simplified)
    g: np.ndarray  # (n,) ∇L(w̄)
    loss: float
    sharpness: float  # λ_max(P*⁻¹H)
    k: int  # binding directions
    how: str  # what computed P* here (kkt, kkt+sdp, sdp, relax, scalar)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "P": self.P,
            "penalty": self.penalty,
            "g": self.g,
            "loss": np.asarray(self.loss),
            "sharpness": np.asarray(self.sharpness),
            "k": np.asarray(self.k),
            "how": np.asarray(self.how),
        }

    @classmethod
    def from_arrays(cls, a: dict) -> StationaryPoint:
        return cls(
            np.asarray(a["P"]),
            np.asarray(a["penalty"]),
            np.asarray(a["g"]),
            float(a["loss"]),
            float(a["sharpness"]),
            int(a["k"]),
            str(a["how"]),
        )


@dataclass
class StationaryChunk:
    """Values at the integer times ``steps`` (``t0+1 … t0+K``)."""

    steps: np.ndarray  # (K,)
    w: jax.Array  # (K, n)
    states: dict
    series: dict[str, np.ndarray]  # name -> (K,)
    P: list = field(default_factory=list)  # (n,) P* at each step


def resolve_method(opt: Optimizer, config: StationaryConfig) -> tuple[str, PrecondForm | None]:
    """The method that computes ``P*`` for ``opt`` (``auto``: kkt where the SDP applies,
    the closed form for a scalar ν, else relaxation), and the SDP form (or None)."""
    if config.form not in FORMS:
        raise UsageError(f"the stationary flow has forms {FORMS}, not `{config.form}`")
    if config.method not in METHODS:
        raise UsageError(f"P* is computed by one of {METHODS}, not `{config.method}`")
    if not slow_precond_states(opt):
        raise UsageError(
            f"{opt.name} has no slow preconditioner state, so no stationary preconditioner "
            "and no stationary flow"
        )
    form, why = stationary_form(opt)
    method = config.method
    if method == "auto":
        if form is None:
            method = "relax"
        else:
            method = "scalar" if form.shape == "scalar" else "kkt"
    if method in ("kkt", "sdp") and (form is None or form.shape != "diagonal"):
        raise UsageError(
            f"P* by `{method}` needs the SDP of a diagonal preconditioner; for {opt.name}: "
            + (why or "ν is a scalar"),
            hint="use method relax",
        )
    if method == "scalar" and (form is None or form.shape != "scalar"):
        raise UsageError(f"{opt.name}'s preconditioner is not a scalar √(ν + ε)/η")
    if config.form == "simplified" and method not in ("kkt", "sdp"):
        raise UsageError(
            "the simplified stationary flow needs ∇tr P* from the SDP of a diagonal "
            f"preconditioner; for {opt.name} P* is computed by `{method}`"
            + (f" ({why})" if why else ""),
        )
    return method, form


class StationaryFlow:
    """The stationary flow of a derived optimizer on a problem (module docstring)."""

    label = "stationary"

    @in_float64
    def __init__(
        self,
        opt: Optimizer,
        problem: Problem,
        w0,
        state0=None,
        t0: int = 0,
        config: StationaryConfig = StationaryConfig(),
    ):
        self.opt, self.problem, self.cfg = opt, problem, config
        self.method, self.form = resolve_method(opt, config)
        self.c = float(opt.threshold)
        self.w = jnp.asarray(w0)
        self.n = int(self.w.shape[0])
        self.state = dict(opt.flow_state(opt.init(self.w) if state0 is None else state0))
        self.t = int(t0)
        self.dt = 1.0 / int(config.substeps)
        self._grad = jax.jit(jax.value_and_grad(problem.loss))
        self.live = ~dead_coordinates(problem.loss, self.w) if self.method != "scalar" else None
        self._kkt: KKTPoint | None = None  # the last KKT point (kkt, sdp)
        self._eig = None  # (n, j) warm start of the eigensolver
        self._point: StationaryPoint | None = None  # cached at self.w
        self.timings = {"P_star": 0.0, "penalty": 0.0}
        self.stats = {"points": 0, "newton": 0, "cg": 0, "sdp": 0, "relax_units": 0}

    # ------------------------------------------------------------ P* and the rhs

    def _sdp(self, w, P_init=None):
        f = self.form
        self.stats["sdp"] += 1
        return stationary_sdp(
            self.problem.loss,
            w,
            f.lr,
            eps=f.eps,
            threshold=self.c,
            k=self.cfg.sdp_k,
            tol=self.cfg.sdp_tol,
            alpha=f.alpha,
            const=f.const,
            P_init=P_init,
            V_init=self._eig,
        )

    def _kkt_point(self, w) -> tuple[KKTPoint, float, str]:
        """P* at ``w``: Newton on the KKT system from the previous point (method kkt) or
        from the SDP's solution, with the set of binding directions managed actively —
        a direction whose dual weight vanishes is dropped (in the Newton iteration), and
        a direction with ``λ(P*⁻¹H) > c`` is added with a small weight and Newton rerun.
        The SDP is solved again when Newton fails."""
        loss, c = self.problem.loss, self.c
        floor = a_floor(loss, w, self.form, self.live)
        how = "kkt"
        used_sdp = False
        if self._kkt is not None and self.method == "kkt":
            P, V = self._kkt.P, self._kkt.V
        else:
            P, V = self._from_sdp(w)
            how, used_sdp = "sdp", True
        added = 0
        while True:
            try:
                kp = kkt_polish(
                    loss, w, self.form, P, V, self.live, floor=floor, tol=self.cfg.kkt_tol
                )
            except SimulationError:
                if used_sdp:
                    raise
                P, V = self._from_sdp(w)
                how, used_sdp, added = how + "+sdp", True, 0
                continue
            self.stats["newton"] += kp.iterations
            self.stats["cg"] += kp.cg_steps
            vals, vecs = verify_kkt(loss, w, kp, c, init=self._eig)
            self._eig = vecs
            if vals[0] <= c * (1 + self.cfg.bind_tol):
                return kp, float(vals[0]), how
            if added >= self.cfg.max_added:
                if used_sdp:
                    break
                # the active set did not settle from the previous point: the SDP afresh
                P, V = self._from_sdp(w)
                how, used_sdp, added = how + "+sdp", True, 0
                continue
            # a direction the stability constraint now binds: add it, small, and rerun
            u = np.where(self.live, vecs[:, 0] / np.sqrt(np.where(kp.P > 0, kp.P, 1.0)), 0.0)
            if kp.k:  # a third of the weakest binding direction's weight
                u *= 0.3 * np.linalg.svd(kp.V, compute_uv=False)[-1] / np.linalg.norm(u)
            else:  # c·v_i² ≤ 0.1
                u *= np.sqrt(0.1 / c) / np.max(np.abs(u))
            P, V = kp.P, np.concatenate([kp.V, u[:, None]], axis=1)
            how += "+dir"
            added += 1
        raise SimulationError(
            f"stationary flow at t={self.t}: P* violates the stability constraint "
            f"(λ = {vals[0]:.8g} > c = {c:g}) after adding {self.cfg.max_added} directions, "
            "also from the SDP solved afresh",
            hint="raise sdp_k (the SDP's LMI size) or use --stationary-method sdp",
        )

    def _from_sdp(self, w) -> tuple[np.ndarray, np.ndarray]:
        sdp = self._sdp(w, None if self._kkt is None else self._kkt.P)
        self._eig = sdp.eigvecs
        return kkt_from_sdp(sdp, self.problem.loss, w)

    @in_float64
    def point(self) -> StationaryPoint:
        """``P*`` and the right-hand side at the current ``w̄`` (cached)."""
        if self._point is not None:
            return self._point
        w = self.w
        L, g = self._grad(w)
        loss = self.problem.loss
        tic = time.perf_counter()
        if self.method in ("kkt", "sdp"):
            kp, sharp, how = self._kkt_point(w)
            self._kkt = kp
            P, k = kp.P, kp.k
            self.timings["P_star"] += time.perf_counter() - tic
            tic = time.perf_counter()
            if self.cfg.form == "exact":
                pen = curvature_penalty(loss, w, self.form, kp)
            else:
                gt, ns = trace_gradient(loss, w, self.form, kp)
                self.stats["cg"] += ns
                kappa = self.form.lr**2 / (2 * self.form.gamma * self.c)
                pen = kappa * gt
        elif self.method == "relax":
            rel = relax(
                self.opt,
                self.problem,
                w,
                self.state,
                float(self.t),
                moment_form="talk",
                tol=self.cfg.relax_tol,
                max_units=self.cfg.relax_max_units,
                substeps=self.cfg.relax_substeps,
            )
            self.stats["relax_units"] += rel.iterations
            self.state = {k: jnp.asarray(v) for k, v in rel.states.items()}
            P, k, sharp, how = rel.P, int(rel.X.shape[0]), rel.sharpness, "relax"
            pen = rel.penalty
            if self.form is not None:
                self._kkt = KKTPoint(*kkt_from_relaxation(rel, self.form), self.live, np.nan)
        else:  # scalar, closed form
            f = self.form
            sd = stationary_scalar(
                loss, w, f.lr, eps=f.eps, threshold=self.c, alpha=f.alpha, const=f.const
            )
            P, k, how = sd.P, int(sd.history[0]["binding"]), "scalar"
            sharp = sd.lam_max
            pen = np.zeros(self.n)
            if k:
                # Σ* = σ u uᵀ: η²P² = α‖∇L‖² + β + ε + γσλ², ½∇⟨H,Σ*⟩ = ½σ∇(uᵀHu)
                lam_H = sd.history[0]["lambda_max_H"]
                mv = eigen.sym_eff_hessian_matvec(loss, w, jnp.ones(self.n))
                est = eigen.top_eigenpairs(mv, self.n, 1, init=self._eig, tol=1e-10)
                self._eig = est.vecs
                gn2 = float(jnp.dot(g, g))
                sigma = (f.lr**2 * P[0] ** 2 - f.alpha * gn2 - f.offset) / (f.gamma * lam_H**2)
                G = derivatives.third_contractions(loss, w, est.vecs)  # (1, 1, n)
                pen = 0.5 * max(sigma, 0.0) * np.asarray(G[0, 0])
        self.timings["penalty" if self.method in ("kkt", "sdp") else "P_star"] += (
            time.perf_counter() - tic
        )
        pen = np.asarray(pen)
        if self.live is not None:
            pen = np.where(self.live, pen, 0.0)
        pt = StationaryPoint(np.asarray(P), pen, np.asarray(g), float(L), float(sharp), int(k), how)
        if not (np.all(np.isfinite(pt.P)) and np.all(np.isfinite(pt.penalty))):
            raise SimulationError(f"stationary flow: P* or the penalty is not finite at t={self.t}")
        self.stats["points"] += 1
        self._point = pt
        return pt

    def rate(self, pt: StationaryPoint) -> jax.Array:
        """``dw̄/dt = −P*⁻¹ (∇L + penalty)`` (0 on dead coordinates)."""
        P = pt.P
        with np.errstate(divide="ignore", invalid="ignore"):
            dw = -(pt.g + pt.penalty) / P
        if self.live is not None:
            dw = np.where(self.live, dw, 0.0)
        return jnp.asarray(dw)

    # ----------------------------------------------------------------- process

    @in_float64
    def advance(self, K: int) -> StationaryChunk:
        """``K`` units of time; values at the integer times ``t0+1 … t0+K``."""
        S = int(self.cfg.substeps)
        ws, Ps = [], []
        rec = {k: [] for k in ("loss", "grad_norm", "sharpness", "hmean", "trace_P", "n_crit")}
        rec["penalty_norm"] = []
        steps = self.t + 1 + np.arange(K)
        for _ in range(K):
            for _ in range(S):
                pt = self.point()
                dw = self.dt * self.rate(pt)
                w_new = self.w + dw
                if self.method == "kkt" and self._kkt is not None:  # Newton's next start
                    tic = time.perf_counter()
                    P1, V1 = kkt_predict(self.problem.loss, self.w, dw, self.form, self._kkt)
                    self._kkt = KKTPoint(P1, V1, self.live, np.nan)
                    self.timings["P_star"] += time.perf_counter() - tic
                if not bool(jnp.all(jnp.isfinite(w_new))):
                    raise SimulationError(
                        f"stationary flow: w is NaN or infinite at t={self.t + self.dt:.3f}"
                    )
                self.w, self._point = w_new, None
            self.t += 1
            pt = self.point()
            ws.append(self.w)
            Ps.append(pt.P)
            rec["loss"].append(pt.loss)
            rec["grad_norm"].append(float(np.linalg.norm(pt.g)))
            rec["sharpness"].append(pt.sharpness)
            rec["hmean"].append(float(self.n / np.sum(pt.P)))  # n / Σ(1/p_i), p = 1/P*
            rec["trace_P"].append(float(np.sum(pt.P)))
            rec["n_crit"].append(pt.k)
            rec["penalty_norm"].append(float(np.linalg.norm(pt.penalty)))
        return StationaryChunk(
            steps=steps,
            w=jnp.stack(ws),
            states={},
            series={k: np.asarray(v, float) for k, v in rec.items()},
            P=Ps,
        )

    def snapshot(self) -> dict[str, np.ndarray]:
        """Everything the next steps depend on (warm starts included): resumed == uninterrupted."""
        out = {"w": np.asarray(self.w), "t": np.asarray(self.t)}
        out.update({f"state/{k}": np.asarray(v) for k, v in self.state.items()})
        if self.live is not None:
            out["live"] = np.asarray(self.live)
        if self._kkt is not None:
            out["kkt/P"], out["kkt/V"] = np.asarray(self._kkt.P), np.asarray(self._kkt.V)
        if self._eig is not None:
            out["eig"] = np.asarray(self._eig)
        if self._point is not None:
            out.update({f"point/{k}": v for k, v in self._point.arrays().items()})
        out.update({f"stats/{k}": np.asarray(v) for k, v in self.stats.items()})
        return out

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        self.w = jnp.asarray(snap["w"])
        self.t = int(snap["t"])
        self.state = {k[6:]: jnp.asarray(v) for k, v in snap.items() if k.startswith("state/")}
        if "live" in snap:
            self.live = np.asarray(snap["live"], bool)
        self._kkt = (
            KKTPoint(np.asarray(snap["kkt/P"]), np.asarray(snap["kkt/V"]), self.live, 0.0)
            if "kkt/P" in snap
            else None
        )
        self._eig = np.asarray(snap["eig"]) if "eig" in snap else None
        pt = {k[6:]: v for k, v in snap.items() if k.startswith("point/")}
        self._point = StationaryPoint.from_arrays(pt) if pt else None
        for k in self.stats:
            if f"stats/{k}" in snap:
                self.stats[k] = int(snap[f"stats/{k}"])
