"""The central flow (``central-flows.md`` §2–3), generic over derived optimizers.

State: the time-averaged iterate ``w̄``, the optimizer state (fast states such
as momentum are ODE states), and ``Σ = U X Uᵀ`` supported on the critical
eigenvectors ``U`` of the effective Hessian ``P⁻¹H``. With
``S = P^{-1/2} H P^{-1/2} = Q Λ Qᵀ`` (top eigenpairs) and ``U = √p ⊙ Q``,
``Uᵀ P U = I`` and ``Uᵀ H U = Λ``.

One Euler substep of size ``dt``:

1. ``g₀ = ∇L(w̄)``, ``p`` (generated ``precond``), the top eigenpairs of ``S``
   (warm-started), the critical set ``λ_i ≥ c(1 − margin)``;
2. ``HU`` and ``G_ij = ∇(u_iᵀ H u_j)`` (third derivative contracted twice);
3. the moments, affine in X: ``Eg = g₀ + ½ Σ X_ij G_ij``,
   ``Vg = diag(HU X (HU)ᵀ)``;
4. the generated ``drift``: states first (``S' = S + dt·ṡ``), then ``w`` reads
   the new states (``w' = w + dt·ẇ``);
5. the stability constraint at the end of the substep projected on ``U``,
   ``F(X) = c·Qᵀ diag(p/p') Q − Λ − [G_ij·(w' − w)]`` — through every path by
   which X reaches it (directly via ``Eg``, via the preconditioner's state and
   via momentum) — linearised: ``A₀ = F(0)``, ``B = ∂F/∂X`` (forward-mode);
6. the SDCP ``0 ⪯ X ⟂ A₀ + B[X] ⪰ 0`` (closed form for k = 1, cvxpy for k ≥ 2);
7. the step with that X.

Coordinates the covariance cannot reach (``HU`` and ``G`` zero there, e.g.
weights of a constant input feature) have exactly zero derivative in X; their
rows are zeroed before forming ``B``, which keeps ``∂√ν/∂ν = ∞`` times a zero
rate from turning into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import SimulationError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime import derivatives, eigen
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.sdcp import solve_sdcp


@dataclass(frozen=True)
class CentralConfig:
    substeps: int = 4  # Euler substeps per unit time (one step)
    margin: float = 0.02  # critical set: eigenvalues >= c (1 - margin)
    track_frac: float = 0.9  # track every eigenvalue above this fraction of c
    k_max: int = 12  # at most this many tracked eigenvalues
    eig_tol: float = 1e-5  # eigensolver residual tolerance, relative to lambda_max
    freeze_w: bool = False  # relax the states and Sigma with w-bar frozen (stationary analysis)
    moment_form: str = (
        "consistent"  # "talk": state rates read Eg = grad L (drops grad L * grad<H,S>)
    )


@dataclass
class SubstepRecord:
    X: np.ndarray  # (k, k) on the critical set
    evals: np.ndarray  # tracked eigenvalues of P^-1 H
    n_crit: int


@dataclass
class CentralChunk:
    w: jax.Array  # (K, n) w̄ at the integer times t0 .. t0+K-1
    states: dict  # name -> (K, ...)
    loss: np.ndarray  # L(w̄)
    loss_pred: np.ndarray  # L(w̄) + ½⟨H, Σ⟩
    grad_norm_pred: np.ndarray  # sqrt(‖Eg‖² + tr(HΣH))
    grad_norm: np.ndarray  # ‖∇L(w̄)‖
    sharpness: np.ndarray  # λ_max(P⁻¹H)
    n_crit: np.ndarray
    X_eigs: list = field(default_factory=list)  # eigenvalues of X per step
    Q_crit: list = field(default_factory=list)  # (n, k) critical eigvecs at integer times
    p: list = field(default_factory=list)  # (n,) effective step at integer times
    X: list = field(default_factory=list)


class CentralFlow:
    """The central flow of a derived optimizer on a problem."""

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
        if not opt.has_precond or opt.threshold is None:
            raise SimulationError(
                f"{opt.name}: the update does not factor as -p*(linear form), so there is no "
                "effective Hessian P^-1 H and no threshold for a central flow"
            )
        self.opt, self.problem, self.cfg = opt, problem, config
        self.c = float(opt.threshold)
        self.w = jnp.asarray(w0)
        self.state = opt.flow_state(opt.init(self.w) if state0 is None else state0)
        self.t = float(t0)
        self.t0 = float(t0)
        self.n = int(self.w.shape[0])
        self.eig = None
        self.timings = {"eigensolver": 0.0, "third_derivatives": 0.0, "sdcp": 0.0, "rates": 0.0}
        self._key = jax.random.PRNGKey(0)
        loss = problem.loss
        self._vg = jax.jit(jax.value_and_grad(loss))
        dt = 1.0 / config.substeps
        self.dt = dt

        def moments(g0, G, HU, X):
            Eg, Vg = opt.moments(g0, G, HU, X)  # the generated module's MOMENTS table
            return Eg, Vg

        freeze_w = config.freeze_w
        talk = config.moment_form == "talk"
        if config.moment_form not in ("consistent", "talk"):
            raise ValueError(
                f"moment_form must be 'consistent' or 'talk', got {config.moment_form!r}"
            )

        def advance(w, s, t, Eg, Vg, g0):
            _, ds = opt.drift(w, s, g0 if talk else Eg, Vg, t)
            s_new = jax.tree_util.tree_map(lambda a, b: a + dt * b, s, ds)
            if freeze_w:
                return w, s_new
            dw, _ = opt.drift(w, s_new, Eg, Vg, t)
            return w + dt * dw, s_new

        def coord_maps(X, w, s, t, g0, G, HU, p):
            Eg, Vg = moments(g0, G, HU, X)
            w_new, s_new = advance(w, s, t, Eg, Vg, g0)
            p_new = opt.precond(w_new, s_new, t if freeze_w else t + dt)
            return w_new - w, p / p_new

        @jax.jit
        def linearise(w, s, t, g0, G, HU, p, Q, lam):
            k = Q.shape[1]
            Z = jnp.zeros((k, k))
            args = (w, s, t, g0, G, HU, p)
            dw0, r0 = coord_maps(Z, *args)
            Jw, Jr = jax.jacfwd(lambda X: coord_maps(X, *args))(Z)  # (n, k, k) each
            reach = (jnp.any(HU != 0, axis=1) | jnp.any(G != 0, axis=(0, 1)))[:, None, None]
            Jw = jnp.where(reach, Jw, 0.0)
            Jr = jnp.where(reach, Jr, 0.0)
            c = self.c
            A0 = c * (Q.T * r0) @ Q - jnp.diag(lam) - jnp.einsum("abn,n->ab", G, dw0)
            B = c * jnp.einsum("na,nb,ncd->abcd", Q, Q, Jr) - jnp.einsum("abn,ncd->abcd", G, Jw)
            return 0.5 * (A0 + A0.T), B.reshape(k * k, k * k)

        @jax.jit
        def step_with(w, s, t, g0, G, HU, X):
            Eg, Vg = moments(g0, G, HU, X)
            w_new, s_new = advance(w, s, t, Eg, Vg, g0)
            return w_new, s_new, Eg, Vg

        self._moments = jax.jit(moments)
        self._linearise = linearise
        self._step_with = step_with
        self._precond = jax.jit(lambda w, s, t: opt.effective_step(w, s, t))
        self._third = partial(derivatives.third_contractions, loss)
        self._hu = partial(derivatives.hess_times, loss)

    # -------------------------------------------------------------- substeps

    def _eigs(self, w, p):
        import time

        tic = time.perf_counter()
        mv = eigen.sym_eff_hessian_matvec(self.problem.loss, w, p)
        self._key, sub = jax.random.split(self._key)
        self.eig = eigen.track_top(
            mv,
            self.n,
            self.eig,
            threshold=self.c,
            frac=self.cfg.track_frac,
            k_max=self.cfg.k_max,
            tol=self.cfg.eig_tol,
            key=sub,
        )
        self.timings["eigensolver"] += time.perf_counter() - tic
        return np.asarray(self.eig.vals), self.eig.vecs

    @in_float64
    def substep(self) -> tuple[float, SubstepRecord, dict]:
        import time

        w, s, t = self.w, self.state, self.t + 1.0  # counter read by the rates: the step taken
        if self.cfg.freeze_w:
            t = self.t0 + 1.0  # a frozen point: the counter stays
        L, g0 = self._vg(w)
        p = self._precond(w, s, t)
        vals, vecs = self._eigs(w, p)
        crit = vals >= self.c * (1.0 - self.cfg.margin)
        k = int(crit.sum())
        info = {"loss": float(L), "g0": g0, "p": p, "sharpness": float(vals[0])}
        if k == 0:
            tic = time.perf_counter()
            Z = jnp.zeros((1, 1))
            G0 = jnp.zeros((1, 1, self.n))
            HU0 = jnp.zeros((self.n, 1))
            w_new, s_new, Eg, Vg = self._step_with(w, s, t, g0, G0, HU0, Z)
            self.timings["rates"] += time.perf_counter() - tic
            X = np.zeros((0, 0))
            info.update(Eg=Eg, Vg=Vg, Q=vecs[:, :0], lam=vals[:0], X=X)
        else:
            Q = vecs[:, :k]
            lam = jnp.asarray(vals[:k])
            U = jnp.sqrt(p)[:, None] * Q
            tic = time.perf_counter()
            G = self._third(w, U)
            HU = self._hu(w, U)
            jax.block_until_ready(G)
            self.timings["third_derivatives"] += time.perf_counter() - tic
            tic = time.perf_counter()
            A0, B = self._linearise(w, s, t, g0, G, HU, p, Q, lam)
            A0, B = np.asarray(A0), np.asarray(B)
            self.timings["rates"] += time.perf_counter() - tic
            if not (np.all(np.isfinite(A0)) and np.all(np.isfinite(B))):
                raise SimulationError(
                    "central flow: the linearised stability constraint is not finite at "
                    f"t={self.t:.3f}"
                    f" (k={k} critical directions)",
                    hint="a rate or the preconditioner is singular here (e.g. a division by a "
                    "vanishing state without eps)",
                )
            tic = time.perf_counter()
            try:
                res = solve_sdcp(A0, B)
            except SimulationError as err:
                raise SimulationError(
                    f"central flow at t={self.t:.3f}: {err.message}", hint=err.hint
                ) from None
            self.timings["sdcp"] += time.perf_counter() - tic
            X = res.X
            tic = time.perf_counter()
            w_new, s_new, Eg, Vg = self._step_with(w, s, t, g0, G, HU, jnp.asarray(X))
            self.timings["rates"] += time.perf_counter() - tic
            info.update(Eg=Eg, Vg=Vg, Q=Q, lam=np.asarray(lam), X=X)
        if not bool(jnp.all(jnp.isfinite(w_new))):
            raise SimulationError(f"central flow: w is NaN or infinite at t={self.t + self.dt:.3f}")
        self.w, self.state, self.t = w_new, s_new, self.t + self.dt
        return float(L), SubstepRecord(info["X"], vals, k), info

    @in_float64
    def advance(self, K: int) -> CentralChunk:
        """Advance ``K`` units of time; records are at the integer times
        ``t0, …, t0 + K − 1`` (taken at the first substep of each unit)."""
        S = self.cfg.substeps
        rec = {k: [] for k in ("loss", "loss_pred", "gnp", "gn", "sharp", "ncrit")}
        ws, states, Xe, Qc, ps, Xs = [], [], [], [], [], []
        for _ in range(K):
            ws.append(self.w)
            states.append(self.state)
            for j in range(S):
                L, r, info = self.substep()
                if j:
                    continue
                X, lam = r.X, info["lam"]
                k = X.shape[0]
                rec["loss"].append(L)
                rec["loss_pred"].append(L + 0.5 * float(np.sum(lam * np.diag(X))) if k else L)
                Eg, Vg = info["Eg"], info["Vg"]
                rec["gnp"].append(float(jnp.sqrt(jnp.sum(Eg**2) + jnp.sum(Vg))))
                rec["gn"].append(float(jnp.linalg.norm(info["g0"])))
                rec["sharp"].append(info["sharpness"])
                rec["ncrit"].append(k)
                Xe.append(np.linalg.eigvalsh(X) if k else np.zeros(0))
                Qc.append(np.asarray(info["Q"]))
                ps.append(np.asarray(info["p"]))
                Xs.append(np.asarray(X))
        stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)
        return CentralChunk(
            w=jnp.stack(ws),
            states=stacked,
            loss=np.array(rec["loss"]),
            loss_pred=np.array(rec["loss_pred"]),
            grad_norm_pred=np.array(rec["gnp"]),
            grad_norm=np.array(rec["gn"]),
            sharpness=np.array(rec["sharp"]),
            n_crit=np.array(rec["ncrit"]),
            X_eigs=Xe,
            Q_crit=Qc,
            p=ps,
            X=Xs,
        )
