"""The stationary preconditioner (``docs/mathematics.md`` §4), computed two independent ways.

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

:func:`flowgen.runtime.explain.explain` runs the discrete optimizer and the
central flow to a step, then does both computations at the central flow's ``w̄``
there and compares them with each other and with the discrete run's actual
preconditioner.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import SimulationError, UsageError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime import caches, derivatives, eigen
from flowgen.runtime.central import CentralConfig, CentralFlow
from flowgen.runtime.optimizer import Optimizer

__all__ = [
    "Relaxation",
    "SDPResult",
    "PrecondForm",
    "slow_precond_states",
    "stationary_form",
    "rmsprop_form",
    "form_error",
    "relax",
    "stationary_sdp",
    "compare",
    "dead_coordinates",
    "sigma_agreement",
    "harmonic_mean",
]

Progress = Callable[[str, int, int], None]

A_FLOOR = 1e-16  # a_i ≥ A_FLOOR·max(a): ε = 0 and ∇L_i = 0 on a curved coordinate


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
    """The SDP's form of the preconditioner, ``P = √(ν + eps)/lr`` (module docstring).

    Read from the derivation (:class:`flowgen.symbolic.stationary.StationarySpec`):
    ``ν`` is the slow state ``state``, stationary at ``alpha·E[g]² + gamma·Var[g] + const``;
    ``kind`` is ``"exact"`` or ``"asymptotic"`` (the form holds in a limit, ``limits``).
    """

    state: str
    lr: float  # η: the effective learning rate of the form
    eps: float  # ε inside the root
    kind: str = "exact"  # exact | asymptotic
    shape: str = "diagonal"  # diagonal | scalar
    alpha: float = 1.0
    gamma: float = 1.0
    const: float = 0.0  # β of the fixed point ν* = α E[g]² + γ Var[g] + β
    threshold: float = 2.0
    limits: tuple = ()

    @property
    def offset(self) -> float:
        """``β + ε``: what ``a_i = (α ∇L_i² + β + ε)/η²`` adds to the squared gradient."""
        return self.const + self.eps


def stationary_form(opt: Optimizer) -> tuple[PrecondForm | None, str]:
    """The SDP form the derivation found for ``opt`` (``FlowSpec.stationary``),
    or ``(None, reason)`` when the SDP does not apply."""
    st = getattr(opt.spec, "stationary", None)
    if st is None:
        return None, "the derivation has no stationary analysis"
    if not st.sdp_applies:
        return None, st.reason
    return (
        PrecondForm(
            state=st.state,
            lr=float(st.eta),
            eps=float(st.eps_inside),
            kind=st.kind,
            shape=st.shape,
            alpha=float(st.alpha),
            gamma=float(st.gamma),
            const=float(st.beta),
            threshold=float(st.threshold),
            limits=tuple(st.limits),
        ),
        "",
    )


def rmsprop_form(opt: Optimizer, t: float = 1.0) -> tuple[PrecondForm | None, str]:
    """:func:`stationary_form` (kept for callers of the earlier name; ``t`` is unused:
    the derivation decides for every ``t``)."""
    return stationary_form(opt)


def form_error(form: PrecondForm, P_actual, nu) -> np.ndarray:
    """``r_i = P_i/P_lim(ν_i) − 1``: the actual preconditioner ``P`` at the state ``ν``
    against the SDP's form ``P_lim(ν) = √(ν + ε)/η`` (0 when the form is exact)."""
    P_lim = np.sqrt(np.maximum(np.asarray(nu, float), 0.0) + form.eps) / form.lr
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(P_actual, float) / P_lim - 1.0


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
    # the fixed point: p, X, Q of the analysis at the final state (w and the counter are frozen)
    _, rec, info = cf.point()
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
    eigvecs: np.ndarray | None = None  # (n, j) last eigenvectors (a warm start for the next call)

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
    alpha: float = 1.0,
    const: float = 0.0,
    P_init=None,
    V_init=None,
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
      alpha, const: the fixed point ``ν* = alpha·∇L² + Var[g] + const`` (RMSProp: 1, 0):
        ``a_i = (alpha ∇L_i² + const + eps)/η²``.
      P_init, V_init: adaptive: warm start — the first reference ``P_ref`` (n,) (e.g.
        the previous ``P*`` along a flow) and eigenvectors ``(n, j)`` of
        ``P_ref^{-1/2} H P_ref^{-1/2}``; a warm start is never accepted without a model
        solve.
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
    a_full = (alpha * g**2 + const + eps) / lr**2
    a = a_full[live]
    if not np.any(a > 0):
        raise UsageError("stationary SDP: the gradient is zero and eps = 0 (nothing sets P)")
    a = np.maximum(a, A_FLOOR * a.max())  # eps = 0 and ∇L_i = 0 on a curved coordinate
    P_dead = np.sqrt(const + eps) / lr
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
        warm = P_init is not None
        # the unconstrained optimum √a, or the warm start (P* ≥ √a: raised where ∇L grew)
        P_ref = np.maximum(np.asarray(P_init, float)[live], np.sqrt(a)) if warm else np.sqrt(a)
        V = None if V_init is None else np.asarray(V_init, float)[:, : k_max + eigen.GUARD]
        kk = k if V is None else int(min(max(k, V.shape[1]), k_max))
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
            if ((it == 0 and not warm) or accepted) and lam[0] <= c * (1 + tol):
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
        eigvecs=None if V is None else np.asarray(V),
    )


@in_float64
def stationary_scalar(
    loss,
    w_bar,
    lr: float,
    *,
    eps: float = 0.0,
    threshold: float = 2.0,
    alpha: float = 1.0,
    const: float = 0.0,
    tol: float = 1e-6,
    eig_tol: float = 1e-10,
    grad=None,
) -> SDPResult:
    """The stationary preconditioner of a scalar ``ν`` (scalar RMSProp), in closed form.

    ``P = √(ν + ε)/η`` with ``ν* = α‖∇L‖² + tr(HΣH) + β``: the one-dimensional SDP
    ``min P + (α‖∇L‖² + β + ε)/(η²P)  s.t.  λ_max(H) ≤ c·P`` has the solution
    ``P* = max(√(α‖∇L‖² + β + ε)/η, λ_max(H)/c)`` (the constraint binds when the
    curvature, not the gradient, sets the step). Returned as an :class:`SDPResult`
    with ``P`` broadcast to ``(n,)`` and ``k = 0``.
    """
    tic = time.perf_counter()
    c = float(threshold)
    w = jnp.asarray(w_bar)
    n = int(w.shape[0])
    g = np.asarray(jax.grad(loss)(w) if grad is None else grad)
    a = (alpha * float(np.dot(g, g)) + const + eps) / lr**2
    mv = eigen.sym_eff_hessian_matvec(loss, w, jnp.ones(n))
    lam_H = float(np.asarray(eigen.top_eigenpairs(mv, n, 1, tol=eig_tol).vals)[0])
    P = max(np.sqrt(a), lam_H / c)
    return SDPResult(
        P=np.full(n, P),
        q=np.full(n, 1.0 / P),
        k=0,
        B=np.zeros((n, 0)),
        dual=np.zeros((0, 0)),
        lam_max=lam_H / P,
        margin=c - lam_H / P,
        verified=lam_H / P <= c * (1 + tol),
        kkt_residual=0.0,
        objective=float(P + a / P),
        iterations=0,
        solve_time_s=0.0,
        solve_time_last_s=0.0,
        eig_time_s=time.perf_counter() - tic,
        time_s=time.perf_counter() - tic,
        dead=np.zeros(n, bool),
        basis="closed form",
        threshold=c,
        lr=float(lr),
        eps=float(eps),
        history=[{"lambda_max_H": lam_H, "binding": bool(lam_H / c > np.sqrt(a))}],
    )


# -------------------------------------------------------------------- the KKT system
#
# The SDP's Lagrangian, with the dual matrix factored as Z = V Vᵀ (n×k):
#
#     Φ(P, V; w) = Σ_i [P_i + a_i(w)/P_i] + Σ_j v_jᵀ (H(w) − c·diag P) v_j,
#     a_i(w) = (α ∇L_i(w)² + β + ε)/η².
#
# Its stationary points are the KKT points of the SDP: ∇_P Φ = 1 − a/P² − c·diag(VVᵀ) = 0
# (stationarity) and ∇_V Φ = 2(H − cP)V = 0 (complementarity); feasibility cP ⪰ H and
# Z = VVᵀ ⪰ 0 are checked separately. The Jacobian J = ∇²_z Φ (z = (P, V)) is symmetric:
#
#     J = [[A, J_PV], [J_VP, J_VV]],   A = diag(2a/P³),
#     J_PV δV = −2c Σ_j v_j ⊙ δv_j,   J_VP δP = −2c δP ⊙ V,   J_VV δV = 2(H − cP) δV,
#
# singular only in the gauge directions δV = V M (M antisymmetric), to which every
# right-hand side used here is orthogonal. It is solved matrix-free by preconditioned
# MINRES (k Hessian-vector products per iteration; ~100 iterations on digits-mlp). The
# Schur complement in V would be positive semidefinite and CG-friendly, but A⁻¹ is
# unbounded where a_i → 0 (coordinates set by the constraint alone), which stalled CG.
#
# Newton on ∇_z Φ = 0 polishes an SDP solution to machine precision and tracks P*(w̄)
# along a flow; the adjoint of the same system differentiates tr P*(w̄) (implicit
# function theorem): with J λ = (1, 0),  ∇_w tr P* = −∇_w ⟨∇_z Φ(z*; w), λ⟩.


@dataclass
class KKTPoint:
    """A KKT point of the stationary SDP: ``P*`` and the dual factor ``V`` (``Z = V Vᵀ``)."""

    P: np.ndarray  # (n,) P* (dead coordinates: √(β + ε)/η)
    V: np.ndarray  # (n, k) Z = V Vᵀ = γcΣ*/η², (cP − H) V = 0
    live: np.ndarray  # (n,) bool: coordinates the loss sees
    residual: float  # max(max|∇_P Φ|, ‖∇_V Φ‖/‖2cP ⊙ V‖)
    iterations: int = 0  # Newton iterations
    cg_steps: int = 0  # CG steps, all solves

    @property
    def k(self) -> int:
        return int(self.V.shape[1])


@functools.lru_cache(maxsize=caches.CACHE_SIZE)
def _kkt_fns(loss):
    """Jitted pieces of the KKT system for one loss (cached: one compilation per loss)."""
    grad = jax.grad(loss)

    def hv(w, V):  # (n, k) -> (n, k)
        return jax.vmap(lambda v: eigen.hvp(loss, w, v), in_axes=1, out_axes=1)(V)

    def a_of(w, alpha, offset, eta, floor):  # (n,)
        g = grad(w)
        return jnp.maximum((alpha * g**2 + offset) / eta**2, floor)

    a_jit = jax.jit(a_of)

    @jax.jit
    def residual(w, P, V, live, alpha, offset, eta, floor, c):
        a = a_of(w, alpha, offset, eta, floor)
        rP = jnp.where(live, 1.0 - a / P**2 - c * jnp.sum(V**2, axis=1), 0.0)
        rV = 2.0 * (hv(w, V) - c * P[:, None] * V)
        scale = jnp.maximum(jnp.linalg.norm(2.0 * c * P[:, None] * V), 1e-300)
        return rP, rV, jnp.maximum(jnp.max(jnp.abs(rP)), jnp.linalg.norm(rV) / scale)

    @jax.jit
    def jmv(w, P, V, live, a, c, dP, dV):
        """``J (dP, dV)`` (identity on dead coordinates)."""
        lv = live[:, None]
        dV = jnp.where(lv, dV, 0.0)
        A = 2.0 * a / P**3
        outP = jnp.where(live, A * dP - 2.0 * c * jnp.sum(V * dV, axis=1), dP)
        outV = -2.0 * c * dP[:, None] * V + 2.0 * (hv(w, dV) - c * P[:, None] * dV)
        return outP, jnp.where(lv, outV, dV)

    @jax.jit
    def trace_grad(w, P, V, live, lamP, lamV, alpha, offset, eta, floor):
        """``∇_w tr P* = −∇_w [−Σ λ_P a(w)/P² + 2 Σ_j λ_V,jᵀ H(w) v_j]``."""

        def psi(x):
            a = a_of(x, alpha, offset, eta, floor)
            return -jnp.sum(jnp.where(live, lamP * a / P**2, 0.0)) + 2.0 * jnp.sum(lamV * hv(x, V))

        return -jax.grad(psi)(w)

    @jax.jit
    def curvature_grad(w, V):
        """``∇⟨H, V Vᵀ⟩ = Σ_j ∇(v_jᵀ H v_j)``."""
        return jax.grad(lambda x: jnp.sum(V * hv(x, V)))(w)

    @functools.partial(jax.jit, static_argnames=("maxiter",))
    def solve(w, P, V, live, a, c, rhsP, rhsV, rtol, maxiter):
        """``J (xP, xV) = (rhsP, rhsV)`` with ``xV`` orthogonal to the gauge directions
        ``V M`` (M antisymmetric), as the bordered symmetric system
        ``[[J, G], [Gᵀ, 0]] (x, μ) = (rhs, 0)``, ``G μ = V M(μ)``, ``Gᵀ X = (VᵀX − XᵀV)_{i<j}``.
        Without the border, the Newton step picked up large gauge components (J is
        nearly singular along them away from the solution), which change ``Z = VVᵀ`` at
        second order and stalled Newton."""
        n, k = V.shape
        iu, ju = np.triu_indices(k, 1)  # static
        m = iu.size
        mP = jnp.where(live, 2.0 * a / P**3 + 2.0 * c * jnp.sum(V**2, axis=1) / P, 1.0)
        mV = jnp.where(live[:, None], 2.0 * c * P[:, None] * jnp.ones((1, k)), 1.0)
        # μ block: Gᵀ diag(mV)⁻¹ G on its diagonal, Σ_r (v_ri² + v_rj²)/(2cP_r)
        W2 = V**2 / mV
        mM = jnp.sum(W2[:, iu] + W2[:, ju], axis=0) if m else jnp.zeros(0)
        minv = 1.0 / jnp.concatenate([mP, mV.ravel(), jnp.maximum(mM, 1e-300)])

        def gauge(mu):  # (m,) -> (n, k): V M(μ)
            M = jnp.zeros((k, k)).at[iu, ju].set(mu).at[ju, iu].set(-mu)
            return V @ M

        def mv(z):
            xV = z[n : n + n * k].reshape(n, k)
            oP, oV = jmv(w, P, V, live, a, c, z[:n], xV)
            if m:
                oV = oV + jnp.where(live[:, None], gauge(z[n + n * k :]), 0.0)
                VX = V.T @ xV
                oM = (VX - VX.T)[iu, ju]
            else:
                oM = jnp.zeros(0)
            return jnp.concatenate([oP, oV.ravel(), oM])

        rhs = jnp.concatenate([rhsP, rhsV.ravel(), jnp.zeros(m)])
        x, its = minres(mv, rhs, minv, rtol=rtol, maxiter=maxiter)
        return x[:n], x[n : n + n * k].reshape(n, k), its

    return residual, jmv, trace_grad, curvature_grad, a_jit, solve


caches.register(_kkt_fns.cache_clear)


def minres(matvec, b, minv, *, rtol, maxiter):
    """Preconditioned MINRES (Paige & Saunders 1975) for a symmetric ``matvec``, jittable.

    ``minv`` (same shape as ``b``) is a positive diagonal preconditioner ``M⁻¹``. Stops
    when the preconditioned residual estimate falls below ``rtol·‖b‖_M⁻¹``. For a
    singular but consistent system it converges to the solution without null-space
    component. Returns ``(x, iterations)``.
    """
    tiny = jnp.finfo(b.dtype).tiny
    y = minv * b
    beta1 = jnp.sqrt(jnp.maximum(jnp.vdot(b, y), 0.0))
    z = jnp.zeros_like(b)
    init = dict(
        x=z, r1=b, r2=b, y=y, w=z, w2=z, beta=beta1, oldb=jnp.zeros(()), dbar=jnp.zeros(()),
        epsln=jnp.zeros(()), phibar=beta1, cs=-jnp.ones(()), sn=jnp.zeros(()),
        itn=jnp.zeros((), jnp.int32),
    )  # fmt: skip

    def cond(st):
        return (st["itn"] < maxiter) & (st["phibar"] > rtol * beta1) & (st["beta"] > tiny)

    def body(st):
        itn = st["itn"] + 1
        beta, oldb = st["beta"], st["oldb"]
        v = st["y"] / beta
        y = matvec(v)
        y = jnp.where(itn >= 2, y - (beta / jnp.where(oldb > 0, oldb, 1.0)) * st["r1"], y)
        alfa = jnp.vdot(v, y)
        y = y - (alfa / beta) * st["r2"]
        r1, r2 = st["r2"], y
        y = minv * r2
        oldb, beta = beta, jnp.sqrt(jnp.maximum(jnp.vdot(r2, y), 0.0))
        oldeps = st["epsln"]
        cs, sn, dbar = st["cs"], st["sn"], st["dbar"]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = jnp.maximum(jnp.hypot(gbar, beta), tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * st["phibar"]
        phibar = sn * st["phibar"]
        w1, w2 = st["w2"], st["w"]
        w = (v - oldeps * w1 - delta * w2) / gamma
        return dict(
            x=st["x"] + phi * w, r1=r1, r2=r2, y=y, w=w, w2=w2, beta=beta, oldb=oldb,
            dbar=dbar, epsln=epsln, phibar=phibar, cs=cs, sn=sn, itn=itn,
        )  # fmt: skip

    out = jax.lax.while_loop(cond, body, init)
    return out["x"], out["itn"]


def _kkt_solve(loss, w, P, V, live, a, c, rhsP, rhsV, *, rtol: float, maxiter: int):
    """``J (xP, xV) = (rhsP, rhsV)`` by preconditioned MINRES (:func:`minres`; ``J`` is
    symmetric, indefinite, singular only in the gauge directions). Preconditioner: the
    block diagonal ``diag(A + 2c|v_i|²/P_i, 2cP)`` — the P block with the Schur complement
    of ``J_VV ≈ −2cP``, so coordinates whose ``a_i`` vanishes (set by the constraint
    alone) stay well scaled. (CG on the Schur complement in V fails there: ``A⁻¹`` is
    unbounded.) Returns ``(xP (n,), xV (n, k), iterations)``."""
    *_, solve = _kkt_fns(loss)
    V = jnp.asarray(V)
    xP, xV, its = solve(
        jnp.asarray(w), jnp.asarray(P), V, jnp.asarray(live), jnp.asarray(a), float(c),
        jnp.asarray(rhsP), jnp.asarray(rhsV).reshape(V.shape), float(rtol), int(maxiter),
    )  # fmt: skip
    return xP, xV, int(its)


def _kkt_args(form: PrecondForm, a_floor: float):
    return (float(form.alpha), float(form.offset), float(form.lr), float(a_floor))


def a_floor(loss, w, form: PrecondForm, live) -> float:
    """The floor ``A_FLOOR·max(a)`` the SDP applies to ``a`` (the KKT system uses the same)."""
    a = np.asarray(_kkt_fns(loss)[4](jnp.asarray(w), form.alpha, form.offset, form.lr, 0.0))
    return float(A_FLOOR * np.max(a[np.asarray(live, bool)], initial=0.0))


def kkt_from_sdp(
    sdp: SDPResult, loss=None, w_bar=None, *, rank_tol: float = 1e-6, bind_tol: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """``(P, V)`` from an SDP solution: ``Z = P⁻¹ B Y Bᵀ P⁻¹/c²`` (module docstring).

    With ``loss`` and ``w_bar``, ``Z`` is projected on the binding directions — the
    eigenvectors ``U_b = P^{-1/2} Q_b`` of ``P⁻¹H`` with eigenvalue ``≥ c(1 − bind_tol)`` —
    which removes the interior-point solver's noise from the other directions of the
    model: ``V = U_b (U_bᵀ P Z P U_b)^{1/2}``. Otherwise ``V = P⁻¹ B Y^{1/2}/c`` on the
    eigenvalues of ``Y`` above ``rank_tol·max``."""
    P = np.asarray(sdp.P, float)
    n = P.size
    if sdp.dual.size == 0:
        return P, np.zeros((n, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        Pinv = np.where(sdp.dead | (P <= 0), 0.0, 1.0 / P)
    e, R = np.linalg.eigh(0.5 * (sdp.dual + sdp.dual.T))
    keep = e > rank_tol * max(e.max(), 1e-300)
    F = Pinv[:, None] * (sdp.B @ (R[:, keep] * np.sqrt(e[keep]))) / sdp.threshold  # Z = F Fᵀ
    if loss is None:
        return P, F
    w = jnp.asarray(w_bar)
    p = np.where(sdp.dead, 0.0, Pinv)
    mv = eigen.sym_eff_hessian_matvec(loss, w, jnp.asarray(p))
    m = int(min(max(sdp.k, 1) + 2, n))
    st = eigen.top_eigenpairs(mv, n, m, init=sdp.eigvecs, tol=1e-10)
    vals, Q = np.asarray(st.vals), np.asarray(st.vecs)
    b = vals >= sdp.threshold * (1 - bind_tol)
    if not b.any():
        return P, np.zeros((n, 0))
    Ub = np.sqrt(p)[:, None] * Q[:, b]  # (n, kb), Ub' P Ub = I
    C = Ub.T @ (P[:, None] * F)  # (kb, r): Ub' P F
    Zb = C @ C.T
    e, R = np.linalg.eigh(0.5 * (Zb + Zb.T))
    keep = e > rank_tol * max(e.max(), 1e-300)
    return P, Ub @ (R[:, keep] * np.sqrt(e[keep]))


def kkt_from_relaxation(rel: Relaxation, form: PrecondForm) -> tuple[np.ndarray, np.ndarray]:
    """``(P, V)`` from a relaxation: ``Z = γcΣ*/η²``, ``V = √(γc)/η · U X^{1/2}``."""
    if rel.X.size == 0:
        return rel.P, np.zeros((rel.P.size, 0))
    e, R = np.linalg.eigh(0.5 * (rel.X + rel.X.T))
    keep = e > 1e-12 * max(e.max(), 1e-300)
    U = np.sqrt(rel.p)[:, None] * rel.Q  # (n, k)
    V = np.sqrt(form.gamma * form.threshold) / form.lr * (U @ (R[:, keep] * np.sqrt(e[keep])))
    return rel.P, V


@in_float64
def kkt_polish(
    loss,
    w_bar,
    form: PrecondForm,
    P,
    V,
    live,
    *,
    floor: float | None = None,
    tol: float = 1e-10,
    max_iter: int = 12,
    cg_rtol: float = 1e-12,
    cg_max_steps: int = 2000,
    drop: float = 1e-5,
) -> KKTPoint:
    """Newton's method on the KKT system from ``(P, V)`` (e.g. an SDP solution, or the
    previous point along a flow). Dead coordinates are kept fixed.

    A dual direction whose weight falls below ``drop`` (relative singular value of
    ``V``) is removed: the constraint stopped binding there. Feasibility
    (``λ_max(P⁻¹H) ≤ c``: no new binding direction) is not checked here
    (:func:`verify_kkt`). Raises :class:`SimulationError` if Newton does not converge.
    """
    residual, *_ = _kkt_fns(loss)
    w = jnp.asarray(w_bar)
    live = np.asarray(live, bool)
    floor = a_floor(loss, w, form, live) if floor is None else floor
    alpha, offset, eta, fl = _kkt_args(form, floor)
    c = float(form.threshold)
    P = jnp.asarray(np.asarray(P, float))
    V = jnp.asarray(np.asarray(V, float)).reshape(P.shape[0], -1)
    lv = jnp.asarray(live)
    a = _kkt_fns(loss)[4](w, alpha, offset, eta, fl)
    P = jnp.asarray(_reset_free(np.asarray(P), np.asarray(V), np.asarray(a), c, live))
    steps = 0
    V = _drop_weak(V, drop)
    rP, rV, r = residual(w, P, V, lv, alpha, offset, eta, fl, c)
    res = float(r)
    hist = [res]
    it = 0
    while np.isfinite(res) and res > tol and it < max_iter:
        it += 1
        # inexact Newton: the linear solve only as accurate as the step needs
        rtol = max(cg_rtol, min(1e-3, 0.1 * res))
        xP, xV, ns = _kkt_solve(
            loss, w, P, V, live, a, c, -np.asarray(rP), -np.asarray(rV),
            rtol=rtol, maxiter=cg_max_steps,
        )  # fmt: skip
        steps += ns
        # the step keeps P > 0 on live coordinates; backtracking on the residual
        xP_np, P_np = np.asarray(xP), np.asarray(P)
        neg = live & (xP_np < 0)
        step = min(1.0, float(np.min(0.5 * P_np[neg] / -xP_np[neg], initial=np.inf)))
        for _ in range(6):
            P_t, V_t = P + step * xP, _drop_weak(V + step * xV, drop)
            rP_t, rV_t, r_t = residual(w, P_t, V_t, lv, alpha, offset, eta, fl, c)
            if float(r_t) < res or res < 1e-6:
                break
            step *= 0.5
        if not float(r_t) < res:  # no decrease: at the noise level, or stuck
            break
        P, V, rP, rV, res = P_t, V_t, rP_t, rV_t, float(r_t)
        hist.append(res)
    if not (np.isfinite(res) and res <= max(10 * tol, 1e-8)):
        raise SimulationError(
            f"stationary SDP: Newton on the KKT system did not converge (residual {res:.2g} "
            f"after {it} iterations, k = {V.shape[1]}; residuals "
            + ", ".join(f"{x:.1g}" for x in hist)
            + ")",
            hint="the set of binding directions changed; solve the SDP again from here",
        )
    return KKTPoint(np.asarray(P), np.asarray(V), live, res, it, steps)


@in_float64
def kkt_predict(loss, w_bar, dw, form: PrecondForm, kkt: KKTPoint, *, floor=None, rtol=1e-6):
    """The KKT point at ``w̄ + dw`` to first order: ``z + J⁻¹(−∂_w ∇_z Φ · dw)`` (one
    linear solve; a Newton start with residual ``O(|dw|²)``). Returns ``(P, V)``."""
    residual, *_ = _kkt_fns(loss)
    w = jnp.asarray(w_bar)
    floor = a_floor(loss, w, form, kkt.live) if floor is None else floor
    alpha, offset, eta, fl = _kkt_args(form, floor)
    c = float(form.threshold)
    P, V, lv = jnp.asarray(kkt.P), jnp.asarray(kkt.V), jnp.asarray(kkt.live)
    _, (dP, dV) = jax.jvp(
        lambda x: residual(x, P, V, lv, alpha, offset, eta, fl, c)[:2], (w,), (jnp.asarray(dw),)
    )
    a = _kkt_fns(loss)[4](w, alpha, offset, eta, fl)
    xP, xV, _ = _kkt_solve(loss, w, P, V, kkt.live, a, c, -dP, -dV, rtol=rtol, maxiter=2000)
    P_new = np.asarray(P + xP)
    ok = ~kkt.live | (P_new > 0.5 * np.asarray(P))
    return np.where(ok, P_new, np.asarray(P)), np.asarray(V + xV)


def _reset_free(P, V, a, c, live, free: float = 0.5):
    """Stationarity solved per coordinate where the constraint does not pin ``P``.

    ``∇_P Φ = 0`` reads ``P_i = √(a_i / (1 − c|v_i|²))``. Where ``c|v_i|² ≤ free`` (the
    gradient, not the curvature, sets ``P_i``) that is the answer given ``V``; elsewhere
    ``P_i ≥ √a_i`` still holds. Newton alone converges only linearly (×1.5 per step) when
    ``∇L_i`` has grown a lot since the previous point (``1 − a/P²`` is steep below its root).
    """
    s = 1.0 - c * np.sum(np.asarray(V) ** 2, axis=1)  # (n,)
    out = np.array(P, dtype=float)
    free_i = live & (s >= free)
    out[free_i] = np.sqrt(a[free_i] / s[free_i])
    pinned = live & ~free_i
    out[pinned] = np.maximum(out[pinned], np.sqrt(a[pinned]))
    return out


def _drop_weak(V, drop: float):
    """Remove dual directions whose singular value is below ``drop·σ_max``."""
    if V.shape[1] == 0:
        return V
    Vn = np.asarray(V)
    U, sv, Wt = np.linalg.svd(Vn, full_matrices=False)
    keep = sv > drop * max(sv.max(), 1e-300)
    if keep.all():
        return V
    return jnp.asarray(U[:, keep] * sv[keep])


@in_float64
def verify_kkt(loss, w_bar, kkt: KKTPoint, threshold: float, *, init=None, tol=1e-10):
    """Top ``k + 1`` eigenvalues of ``P^{-1/2} H P^{-1/2}`` at the KKT point: the ``k``
    binding ones sit at ``c`` and the next one is below it iff no direction is missing.
    Returns ``(eigenvalues (k+1,), eigenvectors (n, k+1))``."""
    w = jnp.asarray(w_bar)
    n = int(w.shape[0])
    p = np.where(kkt.live & (kkt.P > 0), 1.0 / np.where(kkt.P > 0, kkt.P, 1.0), 0.0)
    mv = eigen.sym_eff_hessian_matvec(loss, w, jnp.asarray(p))
    kk = min(kkt.k + 1, n)
    st = eigen.top_eigenpairs(mv, n, kk, init=init, tol=tol)
    return np.asarray(st.vals), np.asarray(st.vecs)


@in_float64
def trace_gradient(loss, w_bar, form: PrecondForm, kkt: KKTPoint, *, floor=None, cg_rtol=1e-10):
    """``∇_w tr P*(w̄)`` by implicit differentiation of the KKT system (adjoint, one CG
    solve and one reverse-mode gradient). Returns ``(gradient (n,), CG steps)``."""
    _, _, trace_grad, *_ = _kkt_fns(loss)
    w = jnp.asarray(w_bar)
    floor = a_floor(loss, w, form, kkt.live) if floor is None else floor
    alpha, offset, eta, fl = _kkt_args(form, floor)
    c = float(form.threshold)
    P, V, lv = jnp.asarray(kkt.P), jnp.asarray(kkt.V), jnp.asarray(kkt.live)
    a = _kkt_fns(loss)[4](w, alpha, offset, eta, fl)
    e = np.where(kkt.live, 1.0, 0.0)
    lamP, lamV, ns = _kkt_solve(
        loss, w, P, V, kkt.live, a, c, e, np.zeros(kkt.V.shape), rtol=cg_rtol, maxiter=4000
    )
    gr = trace_grad(w, P, V, lv, jnp.asarray(lamP), jnp.asarray(lamV), alpha, offset, eta, fl)
    return np.asarray(gr), int(ns)


@in_float64
def curvature_penalty(loss, w_bar, form: PrecondForm, kkt: KKTPoint) -> np.ndarray:
    """The implicit curvature penalty at the stationary point, ``½∇⟨H, Σ*⟩`` with
    ``Σ* = η² Z/(γc) = η² V Vᵀ/(γc)``."""
    _, _, _, curvature_grad, *_ = _kkt_fns(loss)
    if kkt.k == 0:
        return np.zeros(kkt.P.shape[0])
    g = curvature_grad(jnp.asarray(w_bar), jnp.asarray(kkt.V))
    return 0.5 * form.lr**2 / (form.gamma * form.threshold) * np.asarray(g)


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
