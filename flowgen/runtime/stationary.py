"""The stationary preconditioner (``central-flows.md`` §4), computed two independent ways.

Freeze the time-averaged iterate ``w̄`` and let the optimizer's slow
preconditioner state and ``Σ`` relax: they settle at ``ν*(w̄), Σ*(w̄)`` and the
preconditioner at ``P*(w̄)``. For RMSProp-type preconditioners ``P*`` also
solves a small SDP; the two must agree, which tests the derivation end to end.

1. :func:`relax` — generic. The derived central-flow rates with ``w̄`` frozen
   (:class:`~flowgen.runtime.central.CentralFlow` with ``freeze_w=True``):
   every substep re-solves the SDCP for ``X`` (``Σ = U X Uᵀ``) and moves the
   states by their averaged rates. Stops when the relative change of the
   states (counters excluded) over one unit of time is below ``tol``. With
   ``moment_form="talk"`` the state rates read ``E[g] = ∇L`` (the talk's
   ν-rate ``∇L⊙∇L + diag(HΣH) − ν``); ``"consistent"`` is the derivation's
   default (``E[g] = ∇L + ½∇⟨H,Σ⟩``). ``dt = 1/substeps``; ``substeps = 1`` is
   stable for the ν-rate and its linearisation bias in ``P*`` is measured at
   ~4e-6 (median, digits-mlp) against ``substeps = 4``.

2. :func:`stationary_sdp` — the RMSProp family only: a diagonal
   preconditioner ``P = √(ν + ε)/η`` whose slow state has the stationary value
   ``ν = E[g]² + Var[g] = ∇L² + diag(HΣH)`` (the talk's form). Then ``P*``
   solves (talk, "Lemma"; ``a_i = (∇L_i² + ε)/η²``)::

       min_{P diagonal ≻ 0}  tr(P) + Σ_i a_i / P_i    s.t.  H ⪯ c·P

   (c = 2 for RMSProp; ε enters as if it were part of ``∇L²``, which keeps
   ``P_i = √ε/η`` on coordinates the loss does not see). With ``q = 1/P`` and
   a PSD factorisation ``H ≈ B Bᵀ`` (``B`` n×k), ``c·P ⪰ B Bᵀ`` is, by a Schur
   complement, the k×k LMI ``I_k − (1/c) Bᵀ diag(q) B ⪰ 0`` — linear in ``q`` —
   and ``Σ 1/q_i + Σ a_i q_i`` is convex: cvxpy (Clarabel) solves it for any n
   with a k×k cone. ``B`` is a top-k eigen-factorisation of ``H`` *in the
   metric of a reference* ``P_ref``: ``B = P_ref^{1/2} V Λ₊^{1/2}`` with
   ``(Λ, V)`` the top eigenpairs of ``P_ref^{-1/2} H P_ref^{-1/2}``.

   * ``basis="hessian"``: ``P_ref = I`` (the top-k eigenspace of ``H`` itself),
     ``k`` doubled until the solution is verified. Measured on digits-mlp
     (n = 2948) this converges slowly: k = 40 still gives λ_max(P⁻¹H) = 2.019
     and a 4e-3 median error, with a 33 s solve.
   * ``basis="adaptive"`` (default): ``P_ref`` is iterated — start at the
     unconstrained optimum ``√a``, solve, move ``P_ref`` towards the solution
     (geometric damping), re-factorise. ``P*`` is a fixed point (if ``V`` spans
     the tight directions, ``P*`` satisfies the KKT conditions of the model), and
     at a fixed point the KKT conditions of the full problem hold. With
     ``k = 12`` directions (doubled if, near the fixed point, the 12th
     eigenvalue is still above ``0.75·c``) it converges linearly (factor ≈ 0.3
     per iteration with damping 0.7; 13 models on digits-mlp).

   Either way the answer is then verified on the full problem:
   ``margin = c − λ_max(P⁻¹H)`` by the iterative eigensolver (``verified`` iff
   ``λ_max ≤ c(1 + tol)``).

   Dual: the LMI's multiplier ``Y`` (k×k) satisfies ``P_i² = a_i + (1/c)·(B Y Bᵀ)_ii``
   (the ``kkt_residual`` checks it); with ``ν = η²P² − ε`` this is
   ``ν = ∇L² + (η²/c)·diag(B Y Bᵀ)``, i.e. ``diag(HΣH) = (η²/c) diag(B Y Bᵀ)``:
   ``Y = (c/η²) Bᵀ Σ B``. In the P-form (``cP − H ⪰ 0`` with multiplier ``Z``,
   stationarity ``1 − a_i/P_i² = c Z_ii``) the same chain rule gives
   ``Z = P⁻¹ B Y Bᵀ P⁻¹ / c²``, and with ``HU = cPU`` on the tight directions
   ``Z = cΣ/η²``: for c = 2 the dual matrix is ``2Σ/η²``, as the talk says.
   :func:`sigma_agreement` compares ``HΣH`` of the relaxation with ``(η²/c) B Y Bᵀ``.

Dead coordinates (``∇L_i = 0`` and ``H e_i = 0``, e.g. weights on an input that
is constantly zero) have ``ν* = 0``: ``P*_i = √ε/η`` in both computations (0
for ε = 0). :func:`dead_coordinates` finds them (two random Hessian probes);
the SDP fixes them analytically; :func:`compare` leaves them out when given
``mask``.

:func:`explain` runs the discrete optimizer and the central flow to a step,
then does both computations at the central flow's ``w̄`` there and compares
them with each other and with the discrete run's actual preconditioner.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp

from flowgen.errors import SimulationError, UsageError
from flowgen.precision import in_float64
from flowgen.runtime import derivatives, eigen
from flowgen.runtime.central import CentralConfig, CentralFlow
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.problems import Problem

__all__ = [
    "Relaxation",
    "SDPResult",
    "PrecondForm",
    "ExplainConfig",
    "Explanation",
    "slow_precond_states",
    "rmsprop_form",
    "relax",
    "stationary_sdp",
    "compare",
    "dead_coordinates",
    "sigma_agreement",
    "harmonic_mean",
    "explain",
]

Progress = Callable[[str, int, int], None]


def _noprog(*_a):
    return None


def harmonic_mean(p) -> float:
    """Harmonic mean of the effective step sizes ``n / Σ 1/p_i`` (0 if some ``p_i = 0``)."""
    p = np.asarray(p, dtype=float).ravel()
    if np.any(p <= 0):
        return 0.0
    return float(p.size / np.sum(1.0 / p))


# ----------------------------------------------------------------- the optimizer's form


def slow_precond_states(opt: Optimizer) -> list[str]:
    """Names of the states of kind ``slow`` that the effective step ``p`` depends on."""
    st = opt.spec.stability
    if st is None or st.effective_step is None:
        return []
    names = {s.name for s in st.effective_step.free_symbols}
    return [s.name for s in opt.spec.states if s.kind == "slow" and s.name in names]


@dataclass(frozen=True)
class PrecondForm:
    """``P = √(ν + eps)/lr`` with ν the slow state ``state`` (stationary at E[g]² + Var[g])."""

    state: str
    lr: float  # η: the effective learning rate of the form
    eps: float


def rmsprop_form(opt: Optimizer, t: float = 1.0) -> tuple[PrecondForm | None, str]:
    """Whether ``opt`` has the RMSProp-type preconditioner the SDP applies to.

    Checks, at the hyperparameters (and counter ``t``): one per-coordinate slow
    state ν in ``p``; ``1/p²`` affine in ν with positive slope
    (``1/p² = (ν + ε)/η²``); the ν drift vanishing exactly at
    ``ν = E[g]² + Var[g]`` and decaying. Returns ``(form, "")`` or ``(None, reason)``.
    """
    spec = opt.spec
    slow = slow_precond_states(opt)
    if not slow:
        return None, "the optimizer has no slow preconditioner state"
    if len(slow) > 1:
        return None, f"the preconditioner depends on {len(slow)} slow states ({', '.join(slow)})"
    name = slow[0]
    state = next(s for s in spec.states if s.name == name)
    if state.scalar:
        return None, (
            f"the slow state {name} is a scalar (one step size for all coordinates), "
            "not a per-coordinate ν"
        )
    if state.drift is None:
        return None, f"the state {name} has no averaged drift"

    def numeric(expr):
        subs = {}
        for s in expr.free_symbols:
            if s.name in spec.hyper:
                subs[s] = spec.hyper[s.name]
            elif s.name == "t":
                subs[s] = t
        return expr.subs(subs)

    p = numeric(spec.stability.effective_step)
    v = next((s for s in p.free_symbols if s.name == name), None)
    if v is None or p.free_symbols - {v}:
        return None, f"p = {spec.stability.effective_step} depends on more than {name}"
    inv2 = sp.simplify(1 / p**2)
    slope = sp.simplify(sp.diff(inv2, v))
    if sp.simplify(sp.diff(slope, v)) != 0 or slope.free_symbols:
        return None, (
            f"1/p² is not affine in {name} (p = {spec.stability.effective_step}): "
            "P is not √(ν + ε)/η"
        )
    slope = float(slope)
    icpt = float(inv2.subs(v, 0))
    if slope <= 0 or icpt < 0:
        return None, "1/p² = a·ν + b needs a > 0 and b ≥ 0"
    drift = numeric(state.drift)
    syms = {s.name: s for s in drift.free_symbols}
    if "Eg" not in syms or "Vg" not in syms or name not in syms:
        return None, f"the drift of {name} does not read E[g] and Var[g]"
    Eg, Vg, vv = syms["Eg"], syms["Vg"], syms[name]
    if sp.simplify(drift.subs(vv, Eg**2 + Vg)) != 0:
        return None, f"the drift of {name} is not stationary at E[g]² + Var[g]"
    d = sp.simplify(sp.diff(drift, vv))
    if d.free_symbols or float(d) >= 0:
        return None, f"the drift of {name} does not decay towards its fixed point"
    return PrecondForm(state=name, lr=float(1 / np.sqrt(slope)), eps=icpt / slope), ""


# ----------------------------------------------------------------------- relaxation


@dataclass
class Relaxation:
    """The slow states and Σ relaxed with ``w̄`` frozen."""

    states: dict  # name -> array at the fixed point
    p: np.ndarray  # (n,) effective step P⁻¹
    X: np.ndarray  # (k, k) Σ = U X Uᵀ, U = √p ⊙ Q
    Q: np.ndarray  # (n, k) critical eigenvectors of P^{-1/2} H P^{-1/2}
    lam: np.ndarray  # (k,) their eigenvalues
    HU: np.ndarray  # (n, k) H U: HΣH = HU X (HU)ᵀ
    g0: np.ndarray  # ∇L(w̄)
    Eg: np.ndarray  # ∇L + ½∇⟨H, Σ⟩
    Vg: np.ndarray  # diag(HΣH)
    sharpness: float  # λ_max(P⁻¹H) at the last substep
    iterations: int  # units of time
    substeps: int
    converged: bool
    history: np.ndarray  # relative change of the states per unit
    moment_form: str
    time_s: float

    @property
    def P(self) -> np.ndarray:
        return 1.0 / self.p

    @property
    def penalty(self) -> np.ndarray:
        """The implicit curvature penalty ``½∇⟨H, Σ⟩``."""
        return self.Eg - self.g0

    def summary(self) -> dict:
        return {
            "iterations": self.iterations,
            "substeps": self.substeps,
            "converged": self.converged,
            "last_rel_change": float(self.history[-1]) if len(self.history) else None,
            "n_crit": int(self.X.shape[0]),
            "critical_eigenvalues": [float(x) for x in self.lam],
            "X_eigenvalues": [float(x) for x in np.linalg.eigvalsh(self.X)] if self.X.size else [],
            "sharpness": self.sharpness,
            "moment_form": self.moment_form,
            "time_s": self.time_s,
        }


def _state_vec(opt: Optimizer, state: dict) -> np.ndarray:
    kinds = {s.name: s.kind for s in opt.spec.states}
    parts = [np.ravel(np.asarray(state[k])) for k in sorted(state) if kinds.get(k) != "counter"]
    return np.concatenate(parts) if parts else np.zeros(0)


@in_float64
def relax(
    opt: Optimizer,
    problem: Problem,
    w_bar,
    state: dict,
    t: float,
    *,
    moment_form: str = "talk",
    tol: float = 1e-7,
    max_units: int = 5000,
    min_units: int = 5,
    substeps: int = 1,
    k_max: int = 16,
    eig_tol: float = 1e-8,
    progress: Progress | None = None,
    label: str = "relax",
) -> Relaxation:
    """Relax the optimizer's states and Σ with ``w̄`` frozen (generic over derived optimizers).

    Uses the derived central-flow rates (``CentralFlow(freeze_w=True)``).
    Stops when ``max_i |s_i(τ+1) − s_i(τ)| / |s_i(τ+1)| < tol`` over one unit of
    time (every coordinate of every non-counter state; a norm-wise criterion
    left coordinates with small ν 3e-4 away from the fixed point) after at
    least ``min_units`` units, or after ``max_units`` (``converged=False``).
    The relaxation time of an EMA state is ``β/(1 − β)`` units (~100 for
    β₂ = 0.99), so expect ~10³ units.

    ``eig_tol`` (the eigensolver's relative residual; the central flow's run
    default is 1e-5) matters here: the critical subspace is separated from the
    next eigenvalue by a small gap (1.967 vs 2 on digits-mlp), and a 1e-5
    residual mixes the two at ~3e-4, which showed up as a 3e-4 error in P* on
    a few coordinates; 1e-8 brings the largest error to ~2e-5.
    """
    if not _state_vec(opt, state).size:
        raise UsageError(
            f"{opt.name} has no optimizer state to relax (no slow preconditioner state)"
        )
    prog = progress or _noprog
    cfg = CentralConfig(
        substeps=substeps, freeze_w=True, moment_form=moment_form, k_max=k_max, eig_tol=eig_tol
    )
    cf = CentralFlow(opt, problem, jnp.asarray(w_bar), state, int(t), cfg)
    tic = time.perf_counter()
    s_old = _state_vec(opt, cf.state)
    hist = []
    converged = False
    info = rec = None
    units = 0
    for units in range(1, max_units + 1):
        for _ in range(substeps):
            _, rec, info = cf.substep()
        s_new = _state_vec(opt, cf.state)
        scale = np.abs(s_new) + 1e-12 * np.max(np.abs(s_new), initial=0.0) + 1e-300
        rel = float(np.max(np.abs(s_new - s_old) / scale)) if s_new.size else 0.0
        if not np.isfinite(rel):
            raise SimulationError(f"{label}: the state became NaN or infinite after {units} units")
        hist.append(rel)
        s_old = s_new
        if units % 25 == 0:
            prog(label, units, max_units)
        if units >= min_units and rel < tol:
            converged = True
            break
    prog(label, max_units, max_units)
    # the fixed point: p, X, Q of one more substep at the final state (no state change kept)
    probe = CentralFlow(opt, problem, cf.w, cf.state, int(t), cfg)
    probe.eig = cf.eig
    _, rec, info = probe.substep()
    Q = np.asarray(info["Q"])
    p = np.asarray(info["p"])
    X = np.asarray(info["X"])
    U = np.sqrt(p)[:, None] * Q
    HU = (
        np.asarray(derivatives.hess_times(problem.loss, cf.w, jnp.asarray(U)))
        if X.size
        else np.zeros((p.size, 0))
    )
    return Relaxation(
        states={k: np.asarray(v) for k, v in cf.state.items()},
        p=p,
        X=X,
        Q=Q,
        lam=np.asarray(info["lam"]),
        HU=HU,
        g0=np.asarray(info["g0"]),
        Eg=np.asarray(info["Eg"]),
        Vg=np.asarray(info["Vg"]),
        sharpness=float(info["sharpness"]),
        iterations=units,
        substeps=substeps,
        converged=converged,
        history=np.asarray(hist),
        moment_form=moment_form,
        time_s=time.perf_counter() - tic,
    )


# ------------------------------------------------------------------------------ SDP


@dataclass
class SDPResult:
    """The stationary preconditioner from the SDP (RMSProp family)."""

    P: np.ndarray  # (n,) diagonal of P*
    q: np.ndarray  # (n,) 1/P
    k: int  # size of the LMI (k×k) in the final model
    B: np.ndarray  # (n, k) factor of the final model (c P ⪰ B Bᵀ)
    dual: np.ndarray  # (k, k) multiplier Y of I − (1/c) Bᵀ diag(q) B ⪰ 0
    lam_max: float  # λ_max(P⁻¹H), full problem, by the eigensolver
    margin: float  # threshold − lam_max
    verified: bool  # lam_max ≤ threshold (1 + tol)
    kkt_residual: float  # max |P² − a − (1/c) diag(B Y Bᵀ)| / max P²
    objective: float  # tr P + Σ a/P
    iterations: int  # models solved
    solve_time_s: float  # cvxpy, all models
    solve_time_last_s: float  # cvxpy, the final model
    eig_time_s: float  # eigensolver, all calls
    time_s: float  # wall, everything
    dead: np.ndarray  # (n,) bool: ∇L_i = 0 and H e_i = 0
    basis: str
    threshold: float
    lr: float
    eps: float
    history: list = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "k": self.k,
            "n": int(self.P.size),
            "n_dead": int(self.dead.sum()),
            "lam_max": self.lam_max,
            "margin": self.margin,
            "verified": self.verified,
            "kkt_residual": self.kkt_residual,
            "objective": self.objective,
            "iterations": self.iterations,
            "solve_time_s": self.solve_time_s,
            "solve_time_last_s": self.solve_time_last_s,
            "eig_time_s": self.eig_time_s,
            "time_s": self.time_s,
            "basis": self.basis,
            "threshold": self.threshold,
            "lr": self.lr,
            "eps": self.eps,
            "history": self.history,
        }


def dead_coordinates(loss, w, g=None, *, key=None) -> np.ndarray:
    """Coordinates with ``∇L_i = 0`` and ``H e_i = 0`` (two random Hessian probes)."""
    w = jnp.asarray(w)
    if g is None:
        g = jax.grad(loss)(w)
    key = jax.random.PRNGKey(1) if key is None else key
    R = jax.random.normal(key, (w.shape[0], 2), dtype=w.dtype)
    HR = np.asarray(derivatives.hess_times(loss, w, R))
    return (np.asarray(g) == 0) & np.all(HR == 0, axis=1)


def _solve_model(B: np.ndarray, a: np.ndarray, c: float, solver_tol: float):
    """``min Σ 1/q + a·q  s.t.  I − (1/c) Bᵀ diag(q) B ⪰ 0`` (rescaled); returns (q, Y, status)."""
    import cvxpy as cp

    n, m = B.shape
    pos = a[a > 0]
    s = float(np.median(np.sqrt(pos))) if pos.size else 1.0  # q = q̃/s makes q̃ ~ 1
    Bt = B / np.sqrt(s)
    q = cp.Variable(n)
    obj = cp.sum(cp.inv_pos(q)) + (a / s**2) @ q
    if m == 0:
        cons = []
    else:
        K = (Bt[:, :, None] * Bt[:, None, :]).reshape(n, m * m).T  # (m², n): vec(b_i b_iᵀ)
        M = cp.reshape(K @ q, (m, m), order="C")
        cons = [np.eye(m) - (0.5 / c) * (M + M.T) >> 0]
    prob = cp.Problem(cp.Minimize(obj), cons)
    opts = dict(
        tol_gap_abs=solver_tol,
        tol_gap_rel=solver_tol,
        tol_feas=solver_tol,
        tol_ktratio=1e-8,
        max_iter=400,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            prob.solve(solver="CLARABEL", **opts)
        except Exception as err:  # noqa: BLE001 - solver failures are reported below
            raise SimulationError(f"stationary SDP: Clarabel failed ({err})") from None
    if prob.status not in ("optimal", "optimal_inaccurate") or q.value is None:
        raise SimulationError(
            f"stationary SDP: the solver returned status {prob.status!r} (n={n}, k={m})"
        )
    qv = np.asarray(q.value) / s
    Y = s * np.asarray(cons[0].dual_value) if cons else np.zeros((0, 0))
    return qv, 0.5 * (Y + Y.T), prob.status


@in_float64
def stationary_sdp(
    loss,
    w_bar,
    lr: float,
    *,
    eps: float = 0.0,
    threshold: float = 2.0,
    k: int = 12,
    k_max: int = 48,
    basis: str = "adaptive",
    frac: float = 0.75,
    tol: float = 1e-6,
    rtol: float = 1e-5,
    max_iter: int = 60,
    damping: float = 0.7,
    eig_tol: float = 1e-8,
    solver_tol: float = 1e-10,
    grad=None,
    progress: Progress | None = None,
) -> SDPResult:
    """The stationary preconditioner of an RMSProp-type optimizer from its SDP.

    ``min_P tr(P) + (1/η²) Σ (∇L_i² + ε)/P_i  s.t.  H ⪯ threshold·P`` at ``w̄``
    (``η = lr``), as a k×k LMI in ``q = 1/P`` (module docstring). Only valid for
    ``P = √(ν + ε)/η`` with ν stationary at ``∇L² + diag(HΣH)``
    (:func:`rmsprop_form` checks an optimizer).

    Args:
      loss: ``(n,) -> scalar`` (jax).
      k: LMI size (eigenpairs per model). ``basis="adaptive"``: doubled (at most
        ``k_max``) when, near the fixed point, the k-th eigenvalue is still above
        ``frac·threshold``; ``"hessian"``: doubled until verified. The block size is
        kept fixed otherwise, so the eigensolver compiles once.
      tol: verified iff ``λ_max(P⁻¹H) ≤ threshold (1 + tol)``.
      rtol: adaptive: stop when the model's solution moves ``P_ref`` by less
        than this (max over coordinates, relative) and the solution is verified.
      damping: adaptive: ``P_ref ← P_new^damping · P_ref^(1−damping)``.
    """
    if basis not in ("adaptive", "hessian"):
        raise ValueError(f"basis must be 'adaptive' or 'hessian', got {basis!r}")
    prog = progress or _noprog
    tic0 = time.perf_counter()
    c = float(threshold)
    w = jnp.asarray(w_bar)
    n = int(w.shape[0])
    g = np.asarray(jax.grad(loss)(w) if grad is None else grad)
    dead = dead_coordinates(loss, w, jnp.asarray(g))
    live = ~dead
    a_full = (g**2 + eps) / lr**2
    a = a_full[live]
    if not np.any(a > 0):
        raise UsageError("stationary SDP: the gradient is zero and eps = 0 (nothing sets P)")
    a = np.maximum(a, 1e-16 * a.max())  # eps = 0 and ∇L_i = 0 on a curved coordinate
    P_dead = np.sqrt(eps) / lr
    k = int(min(max(k, 1), n))
    k_max = int(min(max(k_max, k), n))

    def full(P_live):
        P = np.full(n, P_dead)
        P[live] = P_live
        return P

    def eigs(P_live, prev, kk, etol=eig_tol):
        """Top ``kk`` eigenpairs of ``P^{-1/2} H P^{-1/2}`` (one block size: one compilation)."""
        p = np.zeros(n)
        p[live] = 1.0 / P_live  # dead coordinates: rows of H are zero
        mv = eigen.sym_eff_hessian_matvec(loss, w, jnp.asarray(p))
        st = eigen.top_eigenpairs(mv, n, kk, init=prev, tol=etol)
        return np.asarray(st.vals), np.asarray(st.vecs)

    t_solve = t_eig = t_last = 0.0
    hist = []
    Y = np.zeros((0, 0))
    B = np.zeros((int(live.sum()), 0))
    lam_max = None
    if basis == "adaptive":
        P_ref = np.sqrt(a)  # the unconstrained optimum
        V = None
        kk = k
        accepted = False  # P_ref is the (undamped) solution of the last model
        change = np.inf
        it = 0
        for it in range(max_iter + 1):
            coarse = change > 1e-3  # far from the fixed point: looser eigen/solver tolerances
            etol = max(eig_tol, 1e-6) if coarse else eig_tol
            tic = time.perf_counter()
            lam, V = eigs(P_ref, V, kk, etol)
            # near the fixed point the model must hold every eigenvalue above frac·c
            while not coarse and lam[-1] >= frac * c and kk < k_max:
                kk = min(2 * kk, k_max)
                lam, V = eigs(P_ref, V, kk, etol)
            t_eig += time.perf_counter() - tic
            entry = {"iteration": it, "k": int((lam > 0).sum()), "lam_max_ref": float(lam[0])}
            hist.append(entry)
            if (it == 0 or accepted) and lam[0] <= c * (1 + tol):
                lam_max = float(lam[0]) if etol == eig_tol else None
                break  # verified: the unconstrained optimum, or the accepted solution
            if it == max_iter:
                break
            pos = lam > 0
            B = np.sqrt(P_ref)[:, None] * V[live][:, pos] * np.sqrt(lam[pos])
            tic = time.perf_counter()
            q, Y, status = _solve_model(B, a, c, max(solver_tol, 1e-7) if coarse else solver_tol)
            t_last = time.perf_counter() - tic
            t_solve += t_last
            P_new = 1.0 / q
            change = float(np.max(np.abs(P_new - P_ref) / P_ref))
            entry.update(change=change, solve_s=t_last, status=status)
            prog("SDP", it + 1, max_iter)
            accepted = change <= rtol
            P_ref = P_new if accepted else P_new**damping * P_ref ** (1 - damping)
        P_live = P_ref
        iterations = it
    else:
        kk = k
        iterations = 0
        while True:
            tic = time.perf_counter()
            lam, V = eigs(np.ones(int(live.sum())), None, kk)
            pos = lam > 0
            B = V[live][:, pos] * np.sqrt(lam[pos])
            t_eig += time.perf_counter() - tic
            tic = time.perf_counter()
            q, Y, status = _solve_model(B, a, c, solver_tol)
            t_last = time.perf_counter() - tic
            t_solve += t_last
            iterations += 1
            P_live = 1.0 / q
            tic = time.perf_counter()
            lv, _ = eigs(P_live, None, kk)
            t_eig += time.perf_counter() - tic
            lam_max = float(lv[0])
            hist.append(
                {
                    "iteration": iterations,
                    "k": int(pos.sum()),
                    "lam_max": lam_max,
                    "solve_s": t_last,
                    "status": status,
                }
            )
            prog("SDP", kk, k_max)
            if lam_max <= c * (1 + tol) or kk >= k_max:
                break
            kk = min(2 * kk, k_max)
    if lam_max is None:  # verification on the full problem
        tic = time.perf_counter()
        lv, _ = eigs(P_live, None, kk)
        t_eig += time.perf_counter() - tic
        lam_max = float(lv[0])
    P = full(P_live)
    Bf = np.zeros((n, B.shape[1]))
    Bf[live] = B
    if Y.size:
        kkt = np.abs(P_live**2 - a - np.einsum("ia,ab,ib->i", B, Y, B) / c)
        kkt_res = float(kkt.max() / np.max(P_live**2))
    else:
        kkt_res = float(np.max(np.abs(P_live**2 - a)) / np.max(P_live**2))
    obj = float(np.sum(P_live) + np.sum(a / P_live))
    with np.errstate(divide="ignore"):
        qf = np.where(P > 0, 1.0 / np.where(P > 0, P, 1.0), np.inf)
    return SDPResult(
        P=P,
        q=qf,
        k=int(B.shape[1]),
        B=Bf,
        dual=Y,
        lam_max=lam_max,
        margin=c - lam_max,
        verified=lam_max <= c * (1 + tol),
        kkt_residual=kkt_res,
        objective=obj,
        iterations=int(iterations),
        solve_time_s=t_solve,
        solve_time_last_s=t_last,
        eig_time_s=t_eig,
        time_s=time.perf_counter() - tic0,
        dead=dead,
        basis=basis,
        threshold=c,
        lr=float(lr),
        eps=float(eps),
        history=hist,
    )


# ------------------------------------------------------------------------ comparison


def compare(P_a, P_b, *, mask=None) -> dict:
    """Per-coordinate agreement of ``P_a`` with the reference ``P_b``.

    Relative error ``|P_a − P_b| / P_b`` on the compared coordinates: those in
    ``mask`` (default: all) where both are finite and ``P_b > 0``. Pass
    ``mask = ~dead`` to leave out dead coordinates (``∇L_i = 0``, ``H e_i = 0``),
    where both methods give ``√ε/η`` by construction. Correlations: Pearson on
    the values and on their logarithms (the log-log scatter).
    """
    a = np.asarray(P_a, dtype=float).ravel()
    b = np.asarray(P_b, dtype=float).ravel()
    sel = np.isfinite(a) & np.isfinite(b) & (b > 0)
    if mask is not None:
        sel &= np.asarray(mask, bool)
    a, b = a[sel], b[sel]
    if a.size == 0:
        return {"n_compared": 0}
    rel = np.abs(a - b) / b
    out = {
        "n_compared": int(a.size),
        "median_rel_err": float(np.median(rel)),
        "mean_rel_err": float(np.mean(rel)),
        "p90_rel_err": float(np.quantile(rel, 0.9)),
        "max_rel_err": float(rel.max()),
    }
    if a.size > 1 and np.std(a) > 0 and np.std(b) > 0:
        out["corr"] = float(np.corrcoef(a, b)[0, 1])
        if np.all(a > 0):
            out["corr_log"] = float(np.corrcoef(np.log(a), np.log(b))[0, 1])
    return out


def sigma_agreement(rel: Relaxation, sdp: SDPResult) -> dict:
    """``HΣH`` of the relaxation (``HU X (HU)ᵀ``) against the SDP's dual ``(η²/c) B Y Bᵀ``.

    Relative Frobenius distance, computed from the low-rank factors."""
    F1, G1 = rel.HU, rel.X
    F2, G2 = sdp.B, sdp.dual * (sdp.lr**2 / sdp.threshold)
    if G1.size == 0 and G2.size == 0:
        return {"rel_frobenius": 0.0, "norm_relax": 0.0, "norm_sdp": 0.0}

    def inner(Fa, Ga, Fb, Gb):
        if Ga.size == 0 or Gb.size == 0:
            return 0.0
        C = Fa.T @ Fb
        return float(np.trace(Ga @ C @ Gb @ C.T))

    n11, n22, n12 = inner(F1, G1, F1, G1), inner(F2, G2, F2, G2), inner(F1, G1, F2, G2)
    d = np.sqrt(max(n11 + n22 - 2 * n12, 0.0))
    d1 = np.diag(F1 @ G1 @ F1.T) if G1.size else np.zeros(F1.shape[0])
    d2 = np.einsum("ia,ab,ib->i", F2, G2, F2) if G2.size else np.zeros(F2.shape[0])
    return {
        "rel_frobenius": float(d / np.sqrt(n11)) if n11 > 0 else float("nan"),
        "norm_relax": float(np.sqrt(n11)),
        "norm_sdp": float(np.sqrt(n22)),
        "diag_rel_err": float(np.linalg.norm(d1 - d2) / max(np.linalg.norm(d1), 1e-300)),
    }


# --------------------------------------------------------------------------- explain


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

    def to_json(self) -> dict:
        def clean(v):
            return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, float)]

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
            "series": {k: clean(v) for k, v in self.series.items()},
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
) -> Explanation:
    """Run to ``config.steps``, then interpret the flow at ``w̄(N)`` (module docstring)."""
    from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter
    from flowgen.runtime.run import default_start

    N = int(config.steps)
    c = opt.threshold
    if c is None or not opt.has_precond:
        raise UsageError(
            f"{opt.name} has no stability threshold on λ_max(P⁻¹H): nothing to explain"
        )
    if not opt.spec.has_central:
        raise UsageError(f"{opt.name} has no central flow: {opt.spec.central_reason}")
    prog = progress or _noprog
    timings = {}
    n = problem.n
    slow = slow_precond_states(opt)

    # 1. the discrete run, with its preconditioner and (every eig_every steps) sharpness
    tic = time.perf_counter()
    start = default_start(opt) if config.restart_at is None else int(config.restart_at)
    if start >= N:
        raise UsageError(
            f"the central flow would start at step {start}, at or after step {N}",
            hint="run more --steps or restart earlier",
        )
    disc = DiscreteProcess(opt, problem, problem.w0)
    meter = SharpnessMeter(opt, problem)
    nan = lambda: np.full(N + 1, np.nan)  # noqa: E731
    ser = {
        k: nan()
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
    ser["loss_discrete"][0] = float(problem.loss(problem.w0))
    s0 = opt.init(jnp.asarray(problem.w0))
    hm = jax.jit(jax.vmap(lambda w, s, t: problem.n / jnp.sum(1.0 / opt.effective_step(w, s, t))))
    ser["hmean_discrete"][0] = float(
        hm(problem.w0[None], jax.tree_util.tree_map(lambda a: a[None], s0), jnp.ones(1))[0]
    )
    w_start = s_start = None
    t = 0
    while t < N:
        K = min(config.chunk, N - t)
        ch = disc.advance(K)
        idx = np.arange(t + 1, t + K + 1)
        ser["loss_discrete"][idx] = ch.loss
        ser["hmean_discrete"][idx] = np.asarray(hm(ch.w, ch.states, jnp.asarray(idx + 1.0)))
        for j, step in enumerate(idx):
            if step == start:
                w_start = ch.w[j]
                s_start = jax.tree_util.tree_map(lambda a, j=j: a[j], ch.states)
            if step % config.eig_every == 0 or step == N:
                st = jax.tree_util.tree_map(lambda a, j=j: a[j], ch.states)
                ser["sharpness_discrete"][step] = meter(ch.w[j], st, float(step + 1))
        t += K
        prog("discrete", t, N)
    if start == 0:
        w_start, s_start = jnp.asarray(problem.w0), s0
    w_disc, s_disc = disc.w, disc.state
    p_disc = np.asarray(opt.effective_step(w_disc, s_disc, float(N + 1)))
    timings["discrete_s"] = time.perf_counter() - tic

    # 2. the central flow to N
    tic = time.perf_counter()
    ccfg = CentralConfig(substeps=config.substeps)
    central = CentralFlow(opt, problem, w_start, s_start, start, ccfg)
    t = start
    for cc in (central.observe(),):  # the record at the start
        ser["loss_central"][start] = cc.loss[0]
        ser["loss_pred"][start] = cc.loss_pred[0]
        ser["sharpness_central"][start] = cc.sharpness[0]
        ser["n_crit"][start] = cc.n_crit[0]
        ser["hmean_central"][start] = harmonic_mean(cc.p[0])
    while t < N:
        K = min(config.chunk, N - t)
        cc = central.advance(K)  # values at t+1 .. t+K
        idx = np.arange(t + 1, t + K + 1)
        ser["loss_central"][idx] = cc.loss
        ser["loss_pred"][idx] = cc.loss_pred
        ser["sharpness_central"][idx] = cc.sharpness
        ser["n_crit"][idx] = cc.n_crit
        ser["hmean_central"][idx] = [harmonic_mean(p) for p in cc.p]
        t += K
        prog("central flow", t - start, N - start)
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
    timings["central_s"] = time.perf_counter() - tic

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
    )
