"""The central flow (``docs/mathematics.md`` §2–3), generic over derived optimizers.

State: the time-averaged iterate ``w̄``, the optimizer state (fast states such
as momentum are ODE states), and ``Σ = U X Uᵀ`` supported on the critical
eigenvectors ``U`` of the effective Hessian ``P⁻¹H``. With
``S = P^{-1/2} H P^{-1/2} = Q Λ Qᵀ`` (top eigenpairs) and ``U = √p ⊙ Q``,
``Uᵀ P U = I`` and ``Uᵀ H U = Λ``.

**The analysis of a point** ``(w̄, state, t)`` (what a substep needs, and
what is recorded there):

1. ``L``, ``g₀ = ∇L(w̄)`` and the linearisation ``v ↦ H v`` (one
   ``jax.linearize`` of the gradient: every Hessian-vector product after it
   is a tangent pass only), ``p`` (generated ``precond``);
2. the top eigenpairs of ``S``: the previous Ritz vectors (``k`` tracked plus
   two guards) refreshed by one block product and a Rayleigh–Ritz step, and
   LOBPCG iterations only while the residual exceeds ``eig_tol``
   (:func:`~flowgen.runtime.eigen.refresh`); the critical set is
   ``λ_i ≥ c(1 − margin)``;
3. ``H U = (S Q) / √p`` from the refresh's images (no extra product) and
   ``G_ij = ∇(u_iᵀ H u_j)`` (third derivative contracted twice, the
   ``k(k+1)/2`` pairs in one ``vmap``);
4. the stability constraint at the end of the next substep projected on
   ``U``, ``F(X) = c·Qᵀ diag(p/p') Q − Λ − [G_ij·(w' − w)]`` — through every
   path by which X reaches it (directly via ``Eg``, via the preconditioner's
   state and via momentum) — linearised: ``A₀ = F(0)``, ``B = ∂F/∂X``
   (forward mode on the generated drift);
5. the SDCP ``0 ⪯ X ⟂ A₀ + B[X] ⪰ 0``, inside the same jitted call: for
   k ≤ 1 in closed form (``X = max(0, −a/b)``), for k ≥ 2 when its solution
   is 0 or full rank (:func:`~flowgen.runtime.sdcp.solve_sdcp_jax`); only a
   rank-deficient face goes to cvxpy in Python
   (:func:`~flowgen.runtime.sdcp.solve_sdcp`);
6. the moments, affine in X: ``Eg = g₀ + ½ Σ X_ij G_ij``,
   ``Vg = diag(HU X (HU)ᵀ)``.

**One Euler substep** of size ``dt`` moves with the analysis of its start:
the generated ``drift`` for the states first (``s' = s + dt·ṡ``), then ``w``
reads the new states (``w' = w + dt·ẇ``). One jitted call does the step and
the analysis of the new point (steps 1–6; 1–4 then the SDCP in Python on a
rank-deficient face): that analysis is cached, it is both what the record at an
integer time shows and what the next substep uses. A change of the critical
count ``k`` (a static shape) or of the number of tracked eigenvalues redoes
the analysis of that point with the new shapes (rare).

**Time.** At integer time ``t`` the flow holds the averaged iterate after
``t`` discrete steps (one unit of time = one step); the rates read the
counter ``t + 1`` (the step being taken). ``advance(K)`` moves to ``t + K``
and returns the values at ``t+1, …, t+K``. A unit is split into
``substeps`` Euler substeps.

Coordinates the covariance cannot reach (``HU`` and ``G`` zero there, e.g.
weights of a constant input feature) have exactly zero derivative in X; their
rows are zeroed before forming ``B``, which keeps ``∂√ν/∂ν = ∞`` times a zero
rate from turning into NaN.

No ``n × n`` array is formed (the eigensolver's dense path aside, for
``n < 4m`` only); ``w̄``, the state, the eigenvectors and ``G`` stay JAX
arrays on the device; only k×k data and scalars go to the host.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import SimulationError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime import caches, derivatives, devices, eigen
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.sdcp import solve_sdcp, solve_sdcp_jax

__all__ = ["CentralConfig", "CentralFlow", "CentralChunk", "SubstepRecord", "Analysis"]

SERIES = (
    "loss",
    "loss_pred",
    "grad_norm",
    "grad_norm_pred",
    "sharpness",
    "n_crit",
    "X_trace",
    "sigma_pred",
)
# flags of an analysis (a bitmask computed in the jitted call; handled in Python)
GROW = 1  # every tracked eigenvalue is above the tracking cut: track more
RESHAPE = 2  # the critical count k does not fit the static shapes (kp)
SDCP = 4  # k ≥ 2 on a rank-deficient face: the SDCP is solved in Python (cvxpy)
SHRINK = 8  # more than track_below tracked eigenvalues below the cut (and the top one): fewer
ERROR = 16  # non-finite w or eigenvalues, eigensolver not converged, or a bad constraint
REFINE = 32  # the substep pushed λ_max past c·(1 + refine_tol): rejected, halve dt
# status codes of the constraint
_OK, _NO_RESTORING, _NOT_FINITE = 0, 1, 2
B_REC = 8  # unit records per jitted call (static buffer size)
# G is carried to the next substep only while the critical basis turns less than this:
# max |RᵀR − I| with R = Q_oldᵀ Q_new (0 when span(Q) did not move)
_CARRY_TURN = 0.05


def _turned(Q_old, Q_new):
    """Whether the critical subspace turned too much to carry G over (a traced bool)."""
    R = Q_old.T @ Q_new
    return jnp.max(jnp.abs(R.T @ R - jnp.eye(R.shape[0], dtype=R.dtype))) > _CARRY_TURN


@dataclass(frozen=True)
class CentralConfig:
    substeps: int = 2  # Euler substeps per unit time (one step)
    # Step control of the Euler substeps. On the central flow λ_max(P⁻¹H) stays ≤ c;
    # a substep after which it exceeds max(c, its value before)·(1 + refine_tol) has
    # overshot the stability manifold (the flow then chatters: X drops to 0, the
    # sharpness jumps; seen on Mamba under GD at 2 substeps, gone at 4). Such a
    # substep is rejected and the substeps per unit are doubled for the rest of the
    # run, up to max_substeps. refine_tol = 0 turns the control off.
    refine_tol: float = 0.02
    max_substeps: int = 16
    # ... and halved again (down to substeps) after this many units of time without a
    # rejection: a refinement answers a stretch where λ_max rises fast (a burst, a turn
    # of the critical subspace), not the whole run. 0: never coarsen
    coarsen_after: int = 50
    margin: float = 0.02  # critical set: eigenvalues >= c (1 - margin)
    # track every eigenvalue above this fraction of c (0.95: on digits-mlp under GD at
    # k = 1 the block is 2 columns wide instead of ~3, 5.5 HVPs per unit instead of 8.6,
    # with the README's validations unchanged within 0.001 of central distance)
    track_frac: float = 0.95
    # third-derivative contractions G are computed afresh at every this-many substeps
    # (and whenever k changes or the critical subspace turns); in between G is carried
    # over, rotated onto the new eigenvectors: G_ab ← Σ R_ia R_jb G_ij, R = Q_oldᵀ Q_new.
    # 1: fresh at every substep
    third_every: int = 2
    k_max: int = 12  # at most this many tracked eigenvalues
    eig_tol: float = 3e-4  # residual tolerance of the critical eigenpairs, relative to lambda_max
    freeze_w: bool = False  # relax the states and Sigma with w-bar frozen (stationary analysis)
    moment_form: str = (
        "consistent"  # "talk": state rates read Eg = grad L (drops grad L * grad<H,S>)
    )
    eig_max_iter: int = 1000  # LOBPCG iterations at most per refresh
    extrapolate: bool = True  # warm start: previous Ritz vectors + their last change
    track_tol: float = 1e-2  # residual tolerance of the tracked eigenvalues below the level
    guard: int = 0  # eigen block columns beyond the tracked ones (warm, need not converge)
    track_below: int = 1  # tracked eigenvalues kept below track_frac * c (at least 1 + this)
    profile: bool = False  # run the stages as separate jitted calls and time each (benchmarks)

    @classmethod
    def given(cls, **options) -> CentralConfig:
        """The defaults with the options a caller gave (``None``: not given), as the
        command line and the Python API pass ``substeps`` and ``refine_tol``."""
        return cls(**{name: v for name, v in options.items() if v is not None})


class Analysis(NamedTuple):
    """Everything the central flow knows at one point (JAX arrays).

    ``kp`` is the static size of the k-dependent arrays: the critical count k
    when k ≥ 2, and 1 for k ∈ {0, 1} (zeros when k = 0)."""

    L: jax.Array  # () loss L(w̄)
    g0: jax.Array  # (n,) ∇L(w̄)
    p: jax.Array  # (n,) effective step P⁻¹
    vals: jax.Array  # (m,) Ritz values of S = P^-1/2 H P^-1/2, descending (tracked + guards)
    vecs: jax.Array  # (n, m) Ritz vectors
    dvecs: jax.Array  # (n, m) their change over the last substep (signs aligned)
    iterations: jax.Array  # () LOBPCG iterations of this refresh
    matvecs: jax.Array  # () Hessian-vector products of this refresh
    residual: jax.Array  # () relative eigen residual
    converged: jax.Array  # () bool
    G: jax.Array  # (kp, kp, n) ∇(u_iᵀ H u_j)
    HU: jax.Array  # (n, kp) H U
    A0: jax.Array  # (kp, kp) linearised constraint at X = 0
    B: jax.Array  # (kp², kp²) its derivative in vec(X)
    X: jax.Array  # (kp, kp) the SDCP solution (zeros until solved in Python if flagged SDCP)
    Eg: jax.Array  # (n,) E[g] with this X
    Vg: jax.Array  # (n,) Var[g] with this X
    status: jax.Array  # () 0 ok, 1 no restoring curvature (k = 1), 2 non-finite constraint
    n_crit: jax.Array  # () the critical count k
    rec: jax.Array  # (len(SERIES),) the recorded scalars at this point
    q1: jax.Array  # (n,) top critical eigenvector (zeros when k = 0)
    flags: jax.Array  # () bitmask: GROW | RESHAPE | SDCP | SHRINK | ERROR

    @property
    def k(self) -> int:
        """The critical count (host)."""
        return int(self.n_crit)

    @property
    def kp(self) -> int:
        return int(self.X.shape[0])


@dataclass
class SubstepRecord:
    X: np.ndarray  # (k, k) on the critical set
    evals: np.ndarray  # tracked eigenvalues of P^-1 H
    n_crit: int


@dataclass
class CentralChunk:
    """Values at the integer times ``t+1 .. t+K`` (``steps``)."""

    steps: np.ndarray  # (K,) the integer times
    w: jax.Array  # (K, n) w̄ at those times
    states: dict  # name -> (K, ...) optimizer state at those times
    series: dict[str, np.ndarray]  # (K,) each: the names in SERIES
    q1: np.ndarray  # (K, n) top critical eigenvector of P^-1/2 H P^-1/2 (zeros if k = 0)
    p: np.ndarray  # (K, n) effective step
    X: list = field(default_factory=list)  # K matrices (k_j, k_j)

    # read-only aliases of the series (older callers)
    @property
    def loss(self) -> np.ndarray:
        return self.series["loss"]

    @property
    def loss_pred(self) -> np.ndarray:
        return self.series["loss_pred"]

    @property
    def grad_norm(self) -> np.ndarray:
        return self.series["grad_norm"]

    @property
    def grad_norm_pred(self) -> np.ndarray:
        return self.series["grad_norm_pred"]

    @property
    def sharpness(self) -> np.ndarray:
        return self.series["sharpness"]

    @property
    def n_crit(self) -> np.ndarray:
        return self.series["n_crit"]


# --------------------------------------------------------------------------- #
# The jitted kernels of one (optimizer, loss, configuration)
# --------------------------------------------------------------------------- #


def _strong(tree):
    """No weak types (a Python scalar's): an analysis restored from numpy must hit the
    same compiled loop as one computed by it."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(jnp.asarray(x).dtype), tree)


class _Kernels:
    """Pure functions and their jitted forms, shared by every CentralFlow on the same
    optimizer, loss and configuration (``explain`` and ``relax`` create several)."""

    def __init__(self, opt: Optimizer, loss, cfg: CentralConfig, n: int):
        c = float(opt.threshold)
        talk = cfg.moment_form == "talk"
        freeze_w = cfg.freeze_w
        level = c * (1.0 - cfg.margin)  # critical: λ ≥ level
        cut = c * cfg.track_frac  # tracked: every λ > cut, plus at most two below
        k_max = min(int(cfg.k_max), n)
        vg = jax.value_and_grad(loss)

        def moments(g0, G, HU, X):  # (n,), (k,k,n), (n,k), (k,k) -> (n,), (n,)
            Eg, Vg = opt.moments(g0, G, HU, X)  # the generated module's MOMENTS table
            return Eg, Vg

        def drift_step(w, s, t, dt, Eg, Vg, g0):
            _, ds = opt.drift(w, s, g0 if talk else Eg, Vg, t)
            s_new = jax.tree_util.tree_map(lambda a, b: a + dt * b, s, ds)
            if freeze_w:
                return w, s_new
            dw, _ = opt.drift(w, s_new, Eg, Vg, t)
            return w + dt * dw, s_new

        def precond(w, s, t):
            return jnp.broadcast_to(opt.effective_step(w, s, t), w.shape)

        def coord_maps(X, w, s, t, dt, g0, G, HU, p):
            Eg, Vg = moments(g0, G, HU, X)
            w_new, s_new = drift_step(w, s, t, dt, Eg, Vg, g0)
            p_new = precond(w_new, s_new, t if freeze_w else t + dt)
            return w_new - w, p / p_new

        def eigen_stage(w, s, t, V, D, k_track):
            """L, g₀, p and the refreshed Ritz pairs of S, warm-started from the previous
            Ritz vectors ``V`` extrapolated by their last change ``D`` (columns that moved
            little; a crossing makes a column jump and is not extrapolated).

            The block product is one vmapped forward-over-reverse HVP per column
            (measured faster on CPU than tangents of one ``jax.linearize``, whose
            stored residuals fuse worse). The first block product also gives
            ``L`` and ``g₀``: they are the primal of the same pass (measured
            0.2–0.5 gradients cheaper per analysis than a separate gradient)."""
            p = precond(w, s, t)
            sp = jnp.sqrt(p)[:, None]  # (n, 1)

            def first(Z):  # S Z and (L, g₀) from one forward-over-reverse pass
                def one(z):
                    (L, g), (_, hz) = jax.jvp(vg, (w,), (sp[:, 0] * z,))
                    return L, g, hz

                L, g, HZ = jax.vmap(one, in_axes=1, out_axes=(None, None, 1))(Z)
                return sp * HZ, (L, g)

            def block(Z):  # (n, b) -> (n, b): S Z (the primal is dead code, dropped by XLA)
                return first(Z)[0]

            V0 = V
            if cfg.extrapolate:
                smooth = jnp.linalg.norm(D, axis=0) < 0.2  # (m,)
                V0 = V + jnp.where(smooth, D, 0.0)
            r = eigen.refresh(
                block,
                V0,
                k_track,
                tol=cfg.eig_tol,
                max_iter=cfg.eig_max_iter,
                loose=max(cfg.eig_tol, cfg.track_tol),
                level=level,
                first=first,
            )
            L, g0 = r.aux
            r = r._replace(aux=None)
            sgn = jnp.where(jnp.sum(V * r.vecs, axis=0) < 0, -1.0, 1.0)  # (m,) align signs
            r = r._replace(vecs=r.vecs * sgn, images=r.images * sgn)
            return L, g0, p, r, r.vecs - V

        def third_stage(w, U, k=None):
            """G (k, k, n); with ``k`` given (one padded column), zeros when k = 0."""
            if k is None:
                return derivatives.third_contractions(loss, w, U)
            return jax.lax.cond(
                k > 0,
                lambda: derivatives.third_contractions(loss, w, U),
                lambda: jnp.zeros((1, 1, w.shape[0]), w.dtype),
            )

        def constraint_stage(w, s, t, dt, g0, G, HU, p, Q, lam):
            """A₀, B and, for one column, X in closed form; the moments with that X."""
            k = Q.shape[1]
            Z = jnp.zeros((k, k))
            args = (w, s, t, dt, g0, G, HU, p)
            dw0, r0 = coord_maps(Z, *args)
            Jw, Jr = jax.jacfwd(lambda X: coord_maps(X, *args))(Z)  # (n, k, k) each
            reach = (jnp.any(HU != 0, axis=1) | jnp.any(G != 0, axis=(0, 1)))[:, None, None]
            Jw = jnp.where(reach, Jw, 0.0)
            Jr = jnp.where(reach, Jr, 0.0)
            A0 = c * (Q.T * r0) @ Q - jnp.diag(lam) - jnp.einsum("abn,n->ab", G, dw0)
            B = c * jnp.einsum("na,nb,ncd->abcd", Q, Q, Jr) - jnp.einsum("abn,ncd->abcd", G, Jw)
            A0, B = 0.5 * (A0 + A0.T), B.reshape(k * k, k * k)
            finite = jnp.all(jnp.isfinite(A0)) & jnp.all(jnp.isfinite(B))
            status = jnp.where(finite, _OK, _NOT_FINITE)
            if k == 1:  # the SDCP in closed form (sdcp.solve_sdcp's k = 1 branch)
                a, b = A0[0, 0], B[0, 0]
                x = jnp.where(a >= 0.0, 0.0, -a / jnp.where(b > 0.0, b, 1.0))
                status = jnp.where((a < 0.0) & ~(b > 0.0) & finite, _NO_RESTORING, status)
                X = jnp.where(finite & (status == _OK), x, 0.0).reshape(1, 1)
                solved = jnp.asarray(True)
            else:  # X = 0 or a full-rank face in JAX; other faces by cvxpy in Python
                X, solved = solve_sdcp_jax(A0, B)
                solved = solved & finite
                X = jnp.where(solved, X, 0.0)
            return A0, B, X, status, solved

        def records(L, g0, vals, k, X, Eg, Vg):  # the SERIES at a point
            kp = X.shape[0]
            loss_pred = L + 0.5 * jnp.sum(vals[:kp] * jnp.diag(X))
            return jnp.stack(
                [
                    L,
                    loss_pred,
                    jnp.linalg.norm(g0),
                    jnp.sqrt(jnp.sum(Eg**2) + jnp.sum(Vg)),
                    vals[0],
                    k.astype(L.dtype),
                    jnp.trace(X),
                    jnp.where(k > 0, X[0, 0], jnp.nan),
                ]
            )

        def analyse(w, s, t, dt, V, D, k_track, kp, call, prev=None, fresh=True, cond=None):
            """The analysis of a point; ``call(name, fn, *args)`` runs one stage.

            ``prev = (G, Q, k)`` of the previous analysis: unless ``fresh`` (or the
            critical count changed, or the critical subspace turned), ``G`` is carried
            over, rotated onto the new basis (``CentralConfig.third_every``).
            ``cond(pred, fresh_fn, carry_fn)`` chooses (``lax.cond`` when traced)."""
            L, g0, p, r, dvecs = call("eigensolver", eigen_stage, w, s, t, V, D, k_track)
            m = r.vals.shape[0]
            tracked = jnp.arange(m) < k_track
            k = jnp.sum(tracked & (r.vals >= level))
            sp = jnp.sqrt(p)[:, None]
            Q, lam = r.vecs[:, :kp], r.vals[:kp]  # (n, kp), (kp,)
            U = sp * Q
            HU = r.images[:, :kp] / sp  # S Q = √p ⊙ H U
            if kp == 1:
                on = k > 0
                HU = jnp.where(on, HU, 0.0)
                third = lambda: call("third_derivatives", third_stage, w, U, k)  # noqa: E731
            else:
                third = lambda: call("third_derivatives", third_stage, w, U)  # noqa: E731
            if prev is None:
                G = third()  # (kp, kp, n)
            else:
                G_prev, Q_prev, k_prev = prev
                R = Q_prev.T @ Q  # (kp, kp): the old critical basis in the new one
                G = (cond or jax.lax.cond)(
                    fresh | (k != k_prev) | _turned(Q_prev, Q),
                    third,
                    lambda: jnp.einsum("ia,jb,ijn->abn", R, R, G_prev),
                )
            A0, B, X, status, solved = call(
                "rates", constraint_stage, w, s, t, dt, g0, G, HU, p, Q, lam
            )
            if kp == 1:
                X = jnp.where(on, X, 0.0)
                status = jnp.where(on, status, _OK)
            Eg, Vg = moments(g0, G, HU, X)
            # what Python must handle before this analysis can be used
            last = jnp.max(jnp.where(tracked, jnp.arange(m), 0))
            above = jnp.sum(tracked & (r.vals > cut))
            bad = (status != _OK) | ~r.converged | ~jnp.all(jnp.isfinite(r.vals))
            flags = (
                jnp.where((r.vals[last] > cut) & (k_track < k_max), GROW, 0)
                | jnp.where((k > 1) if kp == 1 else (k != kp), RESHAPE, 0)
                | jnp.where(solved, 0, SDCP)
                | jnp.where(k_track - jnp.maximum(above, 1) > cfg.track_below, SHRINK, 0)
                | jnp.where(bad, ERROR, 0)
            )
            i64 = lambda x: jnp.asarray(x).astype(jnp.int64)  # noqa: E731
            return _strong(Analysis(
                L, g0, p, r.vals, r.vecs, dvecs, i64(r.iterations), i64(r.matvecs), r.residual,
                jnp.asarray(r.converged).astype(bool), G, HU, A0, B, X, Eg, Vg, i64(status),
                i64(k), records(L, g0, r.vals, k, X, Eg, Vg),
                jnp.where(k > 0, r.vecs[:, 0], 0.0), i64(flags),
            ))  # fmt: skip

        def inline(name, fn, *args):
            return fn(*args)

        def t_rate(unit, sub, S, t0):
            """The counter the rates read at a point: the step being taken."""
            if freeze_w:
                return t0 + 1.0  # a frozen point: the counter stays
            return unit + sub / S + 1.0

        threshold = c

        def loop(w, s, a, k_track, unit, sub, n_iter, first, S, t0, refine):
            """Up to ``n_iter`` iterations of: one Euler substep with the analysis ``a``
            of the current point (not in the first iteration when ``first``), then the
            analysis of the new point. Stops at an analysis with flags, or when
            ``B_REC`` unit records are written. With ``refine``, a substep that pushes
            λ_max past ``max(c, λ_max before)·(1 + refine_tol)`` is rejected: the carry
            keeps the point it started from, its analysis flagged REFINE. Returns the
            carry."""
            dt = 1.0 / S
            kp = a.X.shape[0]
            bufs = (
                jnp.zeros((B_REC,) + w.shape, w.dtype),  # w at the integer times
                jax.tree_util.tree_map(lambda x: jnp.zeros((B_REC,) + x.shape, x.dtype), s),
                jnp.zeros((B_REC, len(SERIES)), w.dtype),  # the series
                jnp.zeros((B_REC,) + w.shape, w.dtype),  # q1
                jnp.zeros((B_REC,) + w.shape, w.dtype),  # p
                jnp.zeros((B_REC, kp, kp), w.dtype),  # X
                jnp.zeros((B_REC,), jnp.int64),  # the integer time
            )
            counts = jnp.zeros(5, jnp.int64)  # analyses, HVPs, iterations, contractions, substeps
            refine_on = jnp.asarray(refine) & (cfg.refine_tol > 0) & (not freeze_w)

            def cond(c):
                i, _, _, a, _, _, n_rec, _, _, _ = c
                return (i < n_iter) & (a.flags == 0) & (n_rec < B_REC)

            def body(c):
                i, w, s, a, unit, sub, n_rec, bufs, counts, _ = c
                move = ~(first & (i == 0))
                t = t_rate(unit, sub, S, t0)
                wrap = sub + 1 == S
                unit1 = jnp.where(move & wrap, unit + 1, unit)
                sub1 = jnp.where(move, jnp.where(wrap, 0, sub + 1), sub)
                w1, s1 = drift_step(w, s, t, dt, a.Eg, a.Vg, a.g0)
                w1 = jnp.where(move, w1, w)
                s1 = jax.tree_util.tree_map(lambda x, y: jnp.where(move, x, y), s1, s)
                t1 = t_rate(unit1, sub1, S, t0)
                fresh = ~move | (sub1 % cfg.third_every == 0)
                prev = (a.G, a.vecs[:, :kp], a.n_crit)
                a1 = analyse(w1, s1, t1, dt, a.vecs, a.dvecs, k_track, kp, inline, prev, fresh)
                fresh = fresh | (a1.n_crit != a.n_crit) | _turned(a.vecs[:, :kp], a1.vecs[:, :kp])
                a1 = a1._replace(flags=a1.flags | jnp.where(jnp.all(jnp.isfinite(w1)), 0, ERROR))
                kk = a1.n_crit
                work = jnp.stack(  # of this analysis, whether kept or not
                    [1, a1.matvecs, a1.iterations, jnp.where(fresh, kk * (kk + 1) // 2, 0)]
                ).astype(jnp.int64)
                # step control: an overshoot past the stability manifold is rejected
                top = jnp.maximum(a.vals[0], threshold) * (1.0 + cfg.refine_tol)
                ok = (a1.flags & ERROR) == 0
                reject = move & refine_on & ok & (a1.vals[0] > top)
                keep = lambda new, old: jax.tree_util.tree_map(  # noqa: E731
                    lambda x, y: jnp.where(reject, y, x), new, old
                )
                w1, s1, unit1, sub1 = keep((w1, s1, unit1, sub1), (w, s, unit, sub))
                a1 = keep(a1, a._replace(flags=jnp.asarray(REFINE, a.flags.dtype)))
                move = move & ~reject
                boundary = move & (sub1 == 0)
                write = boundary & (a1.flags == 0)
                put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, n_rec, 0)  # noqa: E731
                bufs = (
                    put(bufs[0], w1),
                    jax.tree_util.tree_map(put, bufs[1], s1),
                    put(bufs[2], a1.rec),
                    put(bufs[3], a1.q1),
                    put(bufs[4], a1.p),
                    put(bufs[5], a1.X),
                    put(bufs[6], unit1),
                )
                counts = counts + jnp.concatenate([work, move.astype(jnp.int64)[None]])
                pending = boundary & (a1.flags != 0)
                return i + 1, w1, s1, a1, unit1, sub1, n_rec + write, bufs, counts, pending

            carry = (jnp.asarray(0), w, s, a, unit, sub, jnp.asarray(0), bufs, counts, False)
            return jax.lax.while_loop(cond, body, carry)

        def complete(a, X):
            """The analysis with the SDCP's X (k ≥ 2): moments and records."""
            Eg, Vg = moments(a.g0, a.G, a.HU, X)
            rec = records(a.L, a.g0, a.vals, a.n_crit, X, Eg, Vg)
            return _strong(a._replace(X=X, Eg=Eg, Vg=Vg, rec=rec))

        def step_only(w, s, t, dt, Eg, Vg, g0):
            w1, s1 = drift_step(w, s, t, dt, Eg, Vg, g0)
            return w1, s1, jnp.all(jnp.isfinite(w1))

        self.level, self.cut, self.k_max = level, cut, k_max
        self.analyse = analyse
        self.t_rate = t_rate
        self.loop = jax.jit(loop)
        self.complete = jax.jit(complete)
        self.step_only = jax.jit(step_only)
        self.stages = {
            "eigensolver": jax.jit(eigen_stage),
            "third_derivatives": jax.jit(third_stage),
            "rates": jax.jit(constraint_stage),
        }


_KERNELS = caches.OwnedCache()  # (id(opt), id(loss), cfg, n) -> _Kernels


def _kernels(opt: Optimizer, loss, cfg: CentralConfig, n: int) -> _Kernels:
    key = (id(opt), id(loss), cfg, n)
    hit = _KERNELS.get(key, (opt, loss))
    if hit is not None:
        return hit
    return _KERNELS.put(key, (opt, loss), _Kernels(opt, loss, cfg, n))


# --------------------------------------------------------------------------- #
# The process
# --------------------------------------------------------------------------- #


class CentralFlow:
    """The central flow of a derived optimizer on a problem.

    ``advance(K)`` returns the values at the next ``K`` integer times;
    ``observe()`` the value now; ``substep()`` one Euler substep (the stationary
    analysis relaxes with it); ``snapshot()``/``restore()`` continue exactly.
    ``timings`` (seconds) and ``counters`` (work done) accumulate.
    """

    label = "central"

    def __init__(
        self,
        opt: Optimizer,
        problem: Problem,
        w0,
        state0=None,
        t0: int = 0,
        config: CentralConfig = CentralConfig(),
    ):
        if not opt.spec.has_central:
            raise SimulationError(f"{opt.name} has no central flow: {opt.spec.central_reason}")
        if tuple(opt.moment_names) != ("Eg", "Vg"):
            raise SimulationError(
                f"{opt.name}: the central flow reads the moments (Eg, Vg), but the derivation "
                f"asks for {', '.join(opt.moment_names)}"
            )
        if not opt.has_precond or opt.threshold is None:
            raise SimulationError(
                f"{opt.name}: the update does not factor as -p*(linear form), so there is no "
                "effective Hessian P^-1 H and no threshold for a central flow"
            )
        if config.moment_form not in ("consistent", "talk"):
            raise ValueError(
                f"moment_form must be 'consistent' or 'talk', got {config.moment_form!r}"
            )
        if int(config.substeps) < 1:
            raise ValueError(f"substeps must be a positive integer, got {config.substeps!r}")
        if not float(config.refine_tol) >= 0.0 or int(config.max_substeps) < 1:
            raise ValueError(
                f"refine_tol must be >= 0 (0: off) and max_substeps positive, got "
                f"{config.refine_tol!r}, {config.max_substeps!r}"
            )
        if int(config.coarsen_after) < 0:
            raise ValueError(f"coarsen_after must be >= 0 (0: never), got {config.coarsen_after!r}")
        if int(config.third_every) < 1:
            raise ValueError(f"third_every must be a positive integer, got {config.third_every!r}")
        self.opt, self.problem, self.cfg = opt, problem, config
        self.c = float(opt.threshold)
        self.w = jnp.asarray(w0)
        self.state = opt.flow_state(opt.init(self.w) if state0 is None else state0)
        self.n = int(self.w.shape[0])
        self.t0 = float(t0)
        self._unit, self._sub = int(t0), 0  # time = unit + sub / S
        self.S = int(config.substeps)
        self._kern = _kernels(opt, problem.loss, config, self.n)
        self._key = np.zeros(2, np.uint32)  # seeds the random columns of a widened block
        # eigenvalues tracked (wanted converged; the block has + guard columns): from the
        # start one below the critical one, as the SHRINK rule keeps it at the edge, so a
        # flow restarted at the edge compiles its loop for one shape, not three
        self._k_track = min(1 + int(config.track_below), self._kern.k_max)
        self._V = None  # (n, k_track + GUARD) warm Ritz vectors before the first analysis
        self._a: Analysis | None = None  # the analysis of the current point (cached)
        self.timings = {
            "eigensolver": 0.0,  # profiled runs only (CentralConfig.profile)
            "third_derivatives": 0.0,  # profiled runs only
            "sdcp": 0.0,  # cvxpy, k ≥ 2
            "rates": 0.0,  # profiled runs only: constraint, closed-form SDCP, the step
            "fused": 0.0,  # the jitted substep loops (all of the above but cvxpy)
        }
        self.counters = {
            "units": 0,  # units of time advanced
            "substeps": 0,  # Euler substeps
            "analyses": 0,  # analyses of a point (one gradient each)
            "redone": 0,  # analyses repeated with new shapes (k or the tracked set changed)
            "hvps": 0,  # Hessian-vector products (eigen refresh)
            "eig_iterations": 0,  # LOBPCG iterations beyond the warm Rayleigh–Ritz step
            "contractions": 0,  # third-derivative contractions ∇(u_iᵀ H u_j)
            "sdcp_solves": 0,  # cvxpy solves
            "refinements": 0,  # substeps rejected by the step control (each doubled S)
            "coarsenings": 0,  # S halved after coarsen_after units without a rejection
        }
        self._calm_from = self._unit  # the unit of the last refinement or coarsening

    # ------------------------------------------------------------------ time

    @property
    def t(self) -> float:
        """The current time (units; fractional between substeps)."""
        return self._unit + self._sub / self.S

    @property
    def dt(self) -> float:
        return 1.0 / self.S

    # ------------------------------------------------------- warm eigenvectors

    @property
    def eig(self) -> eigen.EigState | None:
        """The warm Ritz pairs (tracked + guards); assign another flow's to share it."""
        if self._a is not None:
            return eigen.EigState(self._a.vals, self._a.vecs)
        if self._V is None:
            return None
        return eigen.EigState(jnp.zeros(self._V.shape[1]), self._V)

    @eig.setter
    @in_float64
    def eig(self, st: eigen.EigState | None) -> None:
        self._a = None
        if st is None:
            self._V = None
            return
        V = jnp.asarray(st.vecs)
        self._k_track = min(max(1, V.shape[1] - self.cfg.guard), self._kern.k_max)
        self._V = self._pad(V, self._k_track + self.cfg.guard)

    def _pad(self, V, m):
        """``V`` (n, j) with random columns up to ``m`` (the solver orthonormalises)."""
        V = np.asarray(V)  # on the host: eager jnp ops would compile once per shape
        j = V.shape[1]
        if j >= m:
            return jnp.asarray(V[:, :m])
        rng = np.random.default_rng(self._key)
        cols = rng.standard_normal((self.n, m - j)).astype(V.dtype)
        self._key = rng.integers(0, 2**32, size=2, dtype=np.uint32)
        return jnp.asarray(np.concatenate([V, cols], axis=1))

    def _blank(self, V, kp: int) -> Analysis:
        """An analysis-shaped placeholder carrying the warm vectors ``V`` (n, m)."""
        n, m = V.shape
        dt = V.dtype

        def zeros(shape, dtype=dt):  # made on the host: no compilation per shape
            return jnp.asarray(np.zeros(shape, dtype))

        z, zero = zeros(n), zeros(())
        return Analysis(
            zero, z, z, zeros(m, dt), V, zeros(V.shape), zeros((), jnp.int64),
            zeros((), jnp.int64),
            zero, jnp.asarray(np.bool_(True)), zeros((kp, kp, n), dt), zeros((n, kp), dt),
            zeros((kp, kp), dt), zeros((kp * kp, kp * kp), dt), zeros((kp, kp), dt),
            z, z, zeros((), jnp.int64), zeros((), jnp.int64),
            zeros(len(SERIES), dt), z, zeros((), jnp.int64),
        )  # fmt: skip

    # ------------------------------------------------------------- the loop

    def _loop(self, a: Analysis, n_iter: int, first: bool, recs: list | None):
        """Run the jitted loop from the current point; record completed units into
        ``recs``; leave the (possibly flagged) analysis of the new point in ``self._a``."""
        tic = time.perf_counter()
        w, s, a = devices.commit((self.w, self.state, a), self.w)  # one compile per shape
        out = self._kern.loop(
            w, s, a, self._k_track, self._unit, self._sub, n_iter, first, self.S, self.t0,
            2 * self.S <= self.cfg.max_substeps,  # the step control may still refine
        )  # fmt: skip
        i, w, s, a1, unit, sub, n_rec, bufs, counts, pending = out
        i, unit, sub, n_rec, counts, pending = jax.device_get(
            (i, unit, sub, n_rec, counts, pending)
        )
        self.timings["fused"] += time.perf_counter() - tic
        self.w, self.state, self._a = w, s, a1
        self._unit, self._sub = int(unit), int(sub)
        for name, v in zip(
            ("analyses", "hvps", "eig_iterations", "contractions", "substeps"), counts, strict=True
        ):
            self.counters[name] += int(v)
        if recs is not None and n_rec:  # sliced on the host: no compilation per count
            recs.append(jax.tree_util.tree_map(lambda b: b[: int(n_rec)], jax.device_get(bufs)))
        return bool(pending)

    def _call_profiled(self, name, fn, *args):
        tic = time.perf_counter()
        out = jax.block_until_ready(self._kern.stages[name](*args))
        self.timings[name] += time.perf_counter() - tic
        return out

    def _reanalyse(self, V, kp: int) -> None:
        """The analysis of the current point again, with warm vectors ``V`` and shape ``kp``."""
        self.counters["redone"] += 1
        if self.cfg.profile:
            self._a = self._profiled_analysis(
                self.w, self.state, self._unit, self._sub, V, np.zeros(V.shape, V.dtype), kp
            )
        else:
            self._loop(self._blank(V, kp), 1, True, None)

    def _profiled_analysis(self, w, s, unit, sub, V, D, kp, prev=None) -> Analysis:
        """The analysis by separately jitted, timed stages; ``prev``: the analysis the
        substep started from (G may be carried over from it, as in the fused loop)."""
        t = self._kern.t_rate(unit, sub, self.S, self.t0)
        fresh = prev is None or sub % self.cfg.third_every == 0
        carried = []

        def cond(pred, fresh_fn, carry_fn):
            if bool(pred):
                return fresh_fn()
            carried.append(True)
            return carry_fn()

        a = self._kern.analyse(
            w, s, t, self.dt, V, D, self._k_track, kp, self._call_profiled,
            None if prev is None else (prev.G, prev.vecs[:, :kp], prev.n_crit), fresh, cond,
        )  # fmt: skip
        self.counters["analyses"] += 1
        self.counters["hvps"] += int(a.matvecs)
        self.counters["eig_iterations"] += int(a.iterations)
        self.counters["contractions"] += 0 if carried else a.k * (a.k + 1) // 2
        return a

    def _settle(self) -> None:
        """Handle the flags of ``self._a``: grow the tracked set or fix the shapes (the
        analysis of the same point again), raise errors, solve the SDCP (k ≥ 2), shrink the
        tracked set for the next refresh. Leaves an analysis without flags."""
        where = self.t
        while True:
            a = self._a
            flags, vals, k, it, rel, conv, status = jax.device_get(
                (a.flags, a.vals, a.n_crit, a.iterations, a.residual, a.converged, a.status)
            )
            flags, k, kt = int(flags), int(k), self._k_track
            tracked = np.asarray(vals)[:kt]
            if flags & ERROR:
                self._raise(tracked, int(it), float(rel), bool(conv), int(status), k, where)
            if flags & GROW:  # every tracked eigenvalue is above the cut: track more
                # one more while few are tracked (the next shape is the one the SHRINK
                # rule keeps, so no shape is compiled only to be left), then by half
                self._k_track = min(self._kern.k_max, kt + max(1, kt // 2))
                self._reanalyse(self._pad(a.vecs, self._k_track + self.cfg.guard), a.kp)
                continue
            if flags & RESHAPE:  # the critical count changed the static shapes
                self._reanalyse(a.vecs, max(k, 1))
                continue
            if flags & REFINE:  # the substep overshot: the same point, with half the dt
                self.S, self._sub = 2 * self.S, 2 * self._sub
                self.counters["refinements"] += 1
                self._calm_from = self._unit
                self._reanalyse(a.vecs, a.kp)
                continue
            break
        if tracked[-1] > self._kern.cut and kt >= self._kern.k_max and kt < self.n:
            warnings.warn(
                f"central flow: all k_max={self._kern.k_max} tracked eigenvalues exceed "
                f"{self.cfg.track_frac}·threshold={self._kern.cut:.4g}; eigenvalues above it "
                "may be missed",
                RuntimeWarning,
                stacklevel=3,
            )
        if flags & SDCP:
            tic = time.perf_counter()
            try:
                res = solve_sdcp(np.asarray(a.A0), np.asarray(a.B))
            except SimulationError as err:
                raise SimulationError(
                    f"central flow at t={where:.3f}: {err.message}", hint=err.hint
                ) from None
            self.timings["sdcp"] += time.perf_counter() - tic
            self.counters["sdcp_solves"] += int(res.iterations > 0)
            a = self._kern.complete(a, jnp.asarray(res.X, dtype=a.X.dtype))
        if flags & SHRINK:  # keep track_below tracked eigenvalues below the cut
            above = int(np.sum(tracked > self._kern.cut))
            self._k_track = max(1, above) + self.cfg.track_below
            m = self._k_track + self.cfg.guard
            cut = lambda x: jnp.asarray(np.asarray(x)[..., :m])  # noqa: E731  (host: no compile)
            a = a._replace(vals=cut(a.vals), vecs=cut(a.vecs), dvecs=cut(a.dvecs))
        self._a = a._replace(flags=jnp.asarray(np.int64(0)))

    def _raise(self, tracked, it, rel, conv, status, k, where):
        if not np.all(np.isfinite(np.asarray(self.w))):
            raise SimulationError(f"central flow: w is NaN or infinite at t={where:.3f}")
        if not np.all(np.isfinite(tracked)):
            raise SimulationError(
                f"central flow at t={where:.3f}: NaN/inf in the eigenvalues of the effective "
                "Hessian (the Hessian-vector product returned non-finite values)",
                hint="check the loss and the parameters for overflow",
            )
        if not conv:
            raise SimulationError(
                f"central flow at t={where:.3f}: the eigensolver did not converge in "
                f"{it} iterations (relative residual {rel:.3g}, k={self._k_track})",
                hint="raise eig_max_iter or loosen eig_tol",
            )
        if status == _NOT_FINITE:
            raise SimulationError(
                "central flow: the linearised stability constraint is not finite at "
                f"t={where:.3f} (k={k} critical directions)",
                hint="a rate or the preconditioner is singular here (e.g. a division by a "
                "vanishing state without eps)",
            )
        A0, B = np.asarray(self._a.A0), np.asarray(self._a.B)
        raise SimulationError(
            f"central flow at t={where:.3f}: no stable covariance: k=1 with "
            f"a={A0[0, 0]:.6g} < 0 but b={B[0, 0]:.6g} <= 0 "
            "(the constraint does not recover as X grows)"
        )

    def _analysis(self) -> Analysis:
        """The (cached) analysis of the current point."""
        if self._a is None:
            if self._V is None:
                self._V = self._pad(
                    np.zeros((self.n, 0), self.w.dtype), self._k_track + self.cfg.guard
                )
            self.counters["redone"] -= 1  # the first analysis is not a repeat
            self._reanalyse(self._V, 1)
            self._settle()
        return self._a

    # ---------------------------------------------------------------- substeps

    def _step(self, recs: list | None, max_units: int | None = None) -> None:
        """Advance by the jitted loop (or one profiled substep) from a settled analysis:
        up to ``max_units`` unit boundaries, or one substep when None."""
        a = self._analysis()
        if max_units is not None and self._coarsens():  # stop where the substeps halve
            max_units = min(
                max_units, max(1, self._calm_from + self.cfg.coarsen_after - self._unit)
            )
        if self.cfg.profile:
            t = self._kern.t_rate(self._unit, self._sub, self.S, self.t0)
            tic = time.perf_counter()
            w1, s1, ok = jax.block_until_ready(
                self._kern.step_only(self.w, self.state, t, self.dt, a.Eg, a.Vg, a.g0)
            )
            self.timings["rates"] += time.perf_counter() - tic
            unit, sub = (self._unit, self._sub + 1)
            if sub == self.S:
                unit, sub = unit + 1, 0
            self._a = self._profiled_analysis(w1, s1, unit, sub, a.vecs, a.dvecs, a.kp, a)
            if not bool(ok):
                self._a = self._a._replace(flags=self._a.flags | ERROR)
            self.w, self.state, self._unit, self._sub = w1, s1, unit, sub
            self.counters["substeps"] += 1
            pending = sub == 0
        else:
            n_iter = 1 if max_units is None else max_units * self.S - self._sub
            pending = self._loop(a, n_iter, False, recs)
        self._settle()
        if pending and recs is not None:  # a unit ended at an analysis that needed Python
            recs.append(self._single_record())
        if self._coarsens() and self._sub == 0:
            if self._unit - self._calm_from >= self.cfg.coarsen_after:
                self._coarsen()

    def _coarsens(self) -> bool:
        return int(self.cfg.coarsen_after) > 0 and self.S > int(self.cfg.substeps)

    def _coarsen(self) -> None:
        """Halve the substeps per unit (at the unit boundary ``coarsen_after`` units after
        the last refinement or coarsening, whatever the chunks: not below the configured
        number); the point is analysed again with the new dt."""
        self.S //= 2
        self._calm_from = self._unit
        self.counters["coarsenings"] += 1
        self._reanalyse(self._a.vecs, self._a.kp)
        self._settle()

    def _single_record(self):
        a = self._a
        one = lambda x: np.asarray(x)[None]  # noqa: E731
        return (
            one(self.w),
            jax.tree_util.tree_map(one, self.state),
            one(a.rec),
            one(a.q1),
            one(a.p),
            one(a.X),
            np.asarray([self._unit], np.int64),
        )

    @in_float64
    def point(self) -> tuple[float, SubstepRecord, dict]:
        """The analysis of the current point, without stepping: ``(L, record, info)``
        as :meth:`substep` returns them (``info``: ``loss, g0, p, sharpness, Eg,
        Vg, Q, lam, X``). Cached: asking twice costs nothing."""
        a = self._analysis()
        k = a.k
        vals = np.asarray(a.vals)
        X = np.asarray(a.X)[:k, :k]
        info = {
            "loss": float(a.L),
            "g0": a.g0,
            "p": a.p,
            "sharpness": float(vals[0]),
            "Eg": a.Eg,
            "Vg": a.Vg,
            "Q": a.vecs[:, :k],
            "lam": vals[:k],
            "X": X,
        }
        return info["loss"], SubstepRecord(X, vals[: self._k_track], k), info

    @in_float64
    def substep(self) -> tuple[float, SubstepRecord, dict]:
        """One Euler substep with the analysis of the current point.

        Returns ``(L, record, info)`` of the point the substep started from (see
        :meth:`point`)."""
        while True:  # a substep rejected by the step control is taken again, shorter
            t = self.t
            out = self.point()
            self._step(None)
            if self.t != t:
                return out

    # ----------------------------------------------------------------- records

    def _chunk(self, recs: list) -> CentralChunk:
        """One chunk from record pieces ``(w, states, series, q1, p, X, steps)``; X has the
        static size of its piece (kp), trimmed here to each record's k."""
        cat = lambda *b: np.concatenate(b) if len(b) > 1 else np.asarray(b[0])  # noqa: E731
        W = cat(*[r[0] for r in recs])
        states = jax.tree_util.tree_map(cat, *[r[1] for r in recs])
        series, q1, p, steps = (cat(*[r[j] for r in recs]) for j in (2, 3, 4, 6))
        series, steps, Xs = jax.device_get((series, steps, [r[5] for r in recs]))
        ks = series[:, SERIES.index("n_crit")].astype(int)
        X = [np.asarray(x) for piece in Xs for x in piece]
        return CentralChunk(
            steps=np.asarray(steps, dtype=np.int64),
            w=W,
            states=states,
            series={name: np.asarray(series[:, j]) for j, name in enumerate(SERIES)},
            q1=np.asarray(q1),
            p=np.asarray(p),
            X=[x[:k, :k] for x, k in zip(X, ks, strict=True)],
        )

    @in_float64
    def observe(self) -> CentralChunk:
        """The record at the current (integer) time, as a chunk of length 1."""
        if self._sub != 0:
            raise SimulationError(
                f"central flow: observe() between substeps (t={self.t:.3f}); records are at "
                "integer times"
            )
        self._analysis()
        return self._chunk([self._single_record()])

    @in_float64
    def advance(self, K: int) -> CentralChunk:
        """Advance ``K`` units of time from the integer time ``t``; the chunk holds the
        values at ``t+1, …, t+K`` (each from the analysis the next substep reuses)."""
        if self._sub != 0:
            raise SimulationError(
                f"central flow: advance() between substeps (t={self.t:.3f}); finish the unit "
                "with substep() first"
            )
        target = self._unit + int(K)
        recs: list = []
        while self._unit < target:
            self._step(recs, min(target - self._unit, B_REC))
        self.counters["units"] += int(K)
        return self._chunk(recs)

    # --------------------------------------------------------------- snapshots

    def snapshot(self) -> dict[str, np.ndarray]:
        """Everything needed to continue exactly, as a flat dict of numpy arrays (``.npz``):
        ``w``, ``state.*``, the time, the eigen warm start and tracked count, the PRNG key,
        the cached analysis of the current point (``analysis.*``), timings and counters."""
        out = {
            "w": np.asarray(self.w),
            "time": np.array([self._unit, self._sub, self.S], dtype=np.int64),
            "t0": np.asarray(self.t0, dtype=np.float64),
            "k_track": np.asarray(self._k_track, dtype=np.int64),
            "calm_from": np.asarray(self._calm_from, dtype=np.int64),
            "key": np.asarray(self._key),
        }
        for name, v in self.state.items():
            out[f"state.{name}"] = np.asarray(v)
        if self._V is not None:
            out["eig.vecs"] = np.asarray(self._V)
        if self._a is not None:
            for name, v in self._a._asdict().items():
                out[f"analysis.{name}"] = np.asarray(v)
        for name, v in self.timings.items():
            out[f"timings.{name}"] = np.asarray(v, dtype=np.float64)
        for name, v in self.counters.items():
            out[f"counters.{name}"] = np.asarray(v, dtype=np.int64)
        return out

    @in_float64
    def restore(self, snap: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`snapshot` (same optimizer, problem and configuration)."""
        unit, sub, S = (int(x) for x in np.asarray(snap["time"]))
        S0, refined = self.cfg.substeps, S
        while refined > S0 and refined % 2 == 0:
            refined //= 2
        if refined != S0 or S > max(S0, self.cfg.max_substeps):
            raise SimulationError(
                f"central flow: the snapshot was taken with {S} substeps per unit, this flow "
                f"starts with {S0} (and refines to at most {self.cfg.max_substeps})"
            )
        self.S = S
        if np.asarray(snap["w"]).shape != (self.n,):
            raise SimulationError(
                f"central flow: the snapshot has {np.asarray(snap['w']).shape[0]} parameters, "
                f"this problem {self.n}"
            )
        self.w = jnp.asarray(snap["w"])
        self.state = {
            name[len("state.") :]: jnp.asarray(v)
            for name, v in snap.items()
            if name.startswith("state.")
        }
        self._unit, self._sub = unit, sub
        self.t0 = float(snap["t0"])
        self._k_track = int(snap["k_track"])
        self._calm_from = int(snap["calm_from"]) if "calm_from" in snap else unit
        self._key = np.asarray(snap["key"], dtype=np.uint32)
        self._V = jnp.asarray(snap["eig.vecs"]) if "eig.vecs" in snap else None
        self._a = None
        if "analysis.L" in snap:
            self._a = Analysis(
                **{name: jnp.asarray(snap[f"analysis.{name}"]) for name in Analysis._fields}
            )
        for name in self.timings:
            if f"timings.{name}" in snap:
                self.timings[name] = float(snap[f"timings.{name}"])
        for name in self.counters:
            if f"counters.{name}" in snap:
                self.counters[name] = int(snap[f"counters.{name}"])
