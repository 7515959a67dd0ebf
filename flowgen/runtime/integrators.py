"""ODE integrators for the stable flow: explicit Tsit5 and a Rosenbrock–Krylov method.

The stable flow is an ODE ``y' = f(τ, y)`` on a flat vector ``y = (w, states)``
with time ``τ`` in steps. Under gradient descent it is gradient flow,
``f = −lr·∇L``, whose Jacobian ``J = −lr·H`` has the spectrum of the Hessian.
When the flow sharpens far past the optimizer's threshold, ``lr·λ_max(H)`` grows
to hundreds while the trajectory itself moves slowly: the ODE is *stiff*. An
explicit method is then limited by stability, not accuracy (Tsit5 needs
``h·ρ(J) ≲ 3.5``, i.e. hundreds of gradients per unit of time), so this module
has two steppers that share one state and one step-size controller:

* **explicit** — Tsit5 (Tsitouras 2011; diffrax's tableau): order 5 with an
  embedded order-4 error estimate, first-same-as-last, six gradients per step;
* **implicit** — RA34PW2 (Rang & Angermann 2005), a four-stage Rosenbrock–W
  method of order 3 with an embedded order-2 solution, L-stable and stiffly
  accurate: stiff components are damped, not integrated. In the transformed
  variables of Hairer & Wanner (*Solving ODEs II*, §IV.7) each stage solves::

      (I − hγJ) u_i = hγ · [ f(τ + α_i h, y + Σ_{j<i} a_ij u_j) + Σ_{j<i} (c_ij/h) u_j
                             + γ_i h ∂f/∂τ ],
      y_{n+1} = y + Σ_j m_j u_j,      error estimate  Σ_j (m_j − m̂_j) u_j,

  with ``J = ∂f/∂y`` at the start of the step. ``J`` is never formed: the step
  linearises ``f`` once (``jax.linearize``) and each Krylov iteration costs one
  Jacobian–vector product (for GD a Hessian–vector product). The four stage
  systems share one matrix, so they share one Krylov space: GMRES for stage
  ``i`` starts from the least-squares solution over the directions ``P`` already
  explored (``A P = C`` with ``C`` orthonormal, so ``x₀ = Pᵀ(Cb)`` costs no
  product) and only adds what the new right-hand side needs.

Stiffness is detected from the trajectory alone: every ``probe_every`` steps one
power-iteration product (warm-started) estimates ``ρ = |λ_max(J)|``. The
explicit stepper hands over when its accepted steps sit at the stability limit
(``h·ρ ≥ stiff_ratio``) and are short (``h ≤ stiff_dt``); the implicit one hands
back when ``h·ρ < nonstiff_ratio``, i.e. when the explicit method would be stable
at the implicit step size.

Steps never stop at sampling times or chunk ends: samples at integer times come
from the cubic Hermite interpolant on the last step (``y`` and ``f`` at both ends,
error ``O(h⁴)``), and a chunk ends with the integrator wherever its last step
landed. Advancing ``K`` units in one call or in several, or through
:meth:`StiffIntegrator.snapshot` / :meth:`~StiffIntegrator.restore`, takes the
same steps and gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from flowgen.runtime import caches, devices

__all__ = [
    "EXPLICIT",
    "IMPLICIT",
    "IntegratorConfig",
    "OdeState",
    "RA34PW2",
    "RosenbrockTableau",
    "StiffIntegrator",
    "gmres",
]

EXPLICIT, IMPLICIT = 0, 1
MODE_NAMES = ("explicit", "implicit")

# loop exit status
_DONE, _SWITCH, _FAIL_STEPS, _FAIL_DT, _FAIL_NAN = 0, 1, 2, 3, 4
_STATUS_TEXT = {
    _FAIL_STEPS: "the ODE solver took more than max_steps steps",
    _FAIL_DT: "the step size collapsed",
    _FAIL_NAN: "the flow became NaN or infinite",
}
# counters (int64 vector)
COUNTERS = (
    "steps_explicit",
    "steps_implicit",
    "rejected",
    "f_evals",
    "jvps",
    "linearisations",
)


# --------------------------------------------------------------------------- #
# Tableaus
# --------------------------------------------------------------------------- #


class RosenbrockTableau(NamedTuple):
    """A Rosenbrock method in Hairer–Wanner's transformed variables ``u = Γk``."""

    name: str
    gamma: float  # diagonal of Γ
    a: np.ndarray  # (s, s) stage arguments, A Γ⁻¹
    c: np.ndarray  # (s, s) stage couplings, diag(Γ⁻¹) − Γ⁻¹ (strictly lower)
    m: np.ndarray  # (s,) solution weights, bᵀ Γ⁻¹
    m_err: np.ndarray  # (s,) m − m̂ (error estimate weights)
    alpha: np.ndarray  # (s,) stage times, row sums of A
    gamma_sum: np.ndarray  # (s,) row sums of Γ (∂f/∂τ terms)
    error_order: int  # the error estimate is O(h^error_order)

    @classmethod
    def from_standard(cls, name, A, G, b, b_hat, order) -> RosenbrockTableau:
        """From ``k_i = h f(y + Σ A_ij k_j) + h J Σ G_ij k_j``, ``y₁ = y + Σ b_i k_i``."""
        A, G, b, b_hat = (np.asarray(x, dtype=np.float64) for x in (A, G, b, b_hat))
        Gi = np.linalg.inv(G)
        return cls(
            name=name,
            gamma=float(G[0, 0]),
            a=A @ Gi,
            c=np.diag(np.diag(Gi)) - Gi,
            m=b @ Gi,
            m_err=(b - b_hat) @ Gi,
            alpha=A.sum(axis=1),
            gamma_sum=G.sum(axis=1),
            error_order=order,
        )


#: Rang & Angermann (2005), "New Rosenbrock W-methods of order 3 for partial
#: differential algebraic equations of index 1", BIT 45: ROS34PW2. Order 3
#: (embedded 2), L-stable, stiffly accurate, W-method (order kept with an
#: inexact Jacobian). Coefficients as tabulated there (also in PETSc's TSROSW).
RA34PW2 = RosenbrockTableau.from_standard(
    "RA34PW2",
    A=[
        [0, 0, 0, 0],
        [8.7173304301691801e-01, 0, 0, 0],
        [8.4457060015369423e-01, -1.1299064236484185e-01, 0, 0],
        [0, 0, 1.0, 0],
    ],
    G=[
        [4.3586652150845900e-01, 0, 0, 0],
        [-8.7173304301691801e-01, 4.3586652150845900e-01, 0, 0],
        [-9.0338057013044082e-01, 5.4180672388095326e-02, 4.3586652150845900e-01, 0],
        [
            2.4212380706095346e-01,
            -1.2232505839045147e00,
            5.4526025533510214e-01,
            4.3586652150845900e-01,
        ],
    ],
    b=[
        2.4212380706095346e-01,
        -1.2232505839045147e00,
        1.5452602553351020e00,
        4.3586652150845900e-01,
    ],
    b_hat=[
        3.7810903145819369e-01,
        -9.6042292212423178e-02,
        5.0000000000000000e-01,
        2.1793326075422950e-01,
    ],
    order=3,
)

_TSIT5 = diffrax.Tsit5.tableau  # c (6,), a_lower (rows 2..7), b_sol (7,), b_error (7,)


# --------------------------------------------------------------------------- #
# Krylov solve with a shared space
# --------------------------------------------------------------------------- #


def gmres(
    matvec: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    tol: jax.Array,
    m: int,
    P: jax.Array,
    C: jax.Array,
):
    """Minimal-residual solve of ``A x = b`` seeded by a known part of ``A``'s range.

    ``P``, ``C``: ``(q, n)`` with ``A Pᵢ = Cᵢ`` and the rows of ``C`` orthonormal
    (unused rows zero). The seed ``x₀ = Pᵀ(C b)`` minimises ``‖b − A x‖`` over
    ``span(P)`` without a product; GMRES (Arnoldi with classical Gram–Schmidt
    twice, Givens rotations) then runs on ``r₀ = b − CᵀCb`` until
    ``‖b − A x‖₂ ≤ tol`` or ``m`` iterations.

    Returns ``x`` (n,), the number of products, whether it converged, and the
    Arnoldi basis ``V`` (m+1, n) with ``Hraw`` (m+1, m), so that
    ``A Vⱼ = Σᵢ Hraw[i, j] Vᵢ`` for the iterations done (for :func:`_extend`).
    """
    n = b.shape[0]
    cb = C @ b  # (q,)
    x0 = cb @ P  # (n,)
    r0 = b - cb @ C  # (n,)
    beta = jnp.linalg.norm(r0)
    V = jnp.zeros((m + 1, n), b.dtype).at[0].set(r0 / jnp.where(beta > 0, beta, 1.0))
    Hraw = jnp.zeros((m + 1, m), b.dtype)  # Hessenberg as built
    R = jnp.zeros((m + 1, m), b.dtype)  # after the Givens rotations
    cs = jnp.zeros(m, b.dtype)
    sn = jnp.zeros(m, b.dtype)
    g = jnp.zeros(m + 1, b.dtype).at[0].set(beta)  # rotated residual vector
    rows = jnp.arange(m + 1)

    def cond(c):
        j, g = c[0], c[6]
        return (j < m) & (jnp.abs(g[j]) > tol)

    def body(c):
        j, V, Hraw, R, cs, sn, g = c
        w = matvec(V[j])
        mask = rows <= j
        h1 = jnp.where(mask, V @ w, 0.0)
        w = w - h1 @ V
        h2 = jnp.where(mask, V @ w, 0.0)
        w = w - h2 @ V
        hn = jnp.linalg.norm(w)
        V = V.at[j + 1].set(w / jnp.where(hn > 0, hn, 1.0))
        h = (h1 + h2).at[j + 1].set(hn)  # (m+1,)
        Hraw = Hraw.at[:, j].set(h)

        def rotate(i, h):
            hi = cs[i] * h[i] + sn[i] * h[i + 1]
            hk = -sn[i] * h[i] + cs[i] * h[i + 1]
            return jnp.where(i < j, h.at[i].set(hi).at[i + 1].set(hk), h)

        h = jax.lax.fori_loop(0, m, rotate, h)
        den = jnp.hypot(h[j], h[j + 1])
        den = jnp.where(den > 0, den, 1.0)
        cj, sj = h[j] / den, h[j + 1] / den
        h = h.at[j].set(cj * h[j] + sj * h[j + 1]).at[j + 1].set(0.0)
        gj = g[j]
        g = g.at[j].set(cj * gj).at[j + 1].set(-sj * gj)
        return j + 1, V, Hraw, R.at[:, j].set(h), cs.at[j].set(cj), sn.at[j].set(sj), g

    j, V, Hraw, R, cs, sn, g = jax.lax.while_loop(
        cond, body, (jnp.asarray(0), V, Hraw, R, cs, sn, g)
    )
    idx = jnp.arange(m)
    used = (idx[:, None] < j) & (idx[None, :] < j)
    Rj = jnp.where(used, R[:m, :m], jnp.eye(m, dtype=b.dtype))
    coef = jax.scipy.linalg.solve_triangular(Rj, jnp.where(idx < j, g[:m], 0.0), lower=False)
    x = x0 + coef @ V[:m]
    return x, j, jnp.abs(g[j]) <= tol, V, Hraw


def _extend(P, C, q, V, Hraw, j):
    """Append the new Arnoldi directions ``Vᵢ`` (i < j) with their images ``A Vᵢ``,
    orthonormalising the images against ``C`` (the same combination applied to the
    directions keeps ``A P = C``). Directions beyond the capacity are dropped."""
    qmax = P.shape[0]

    def one(i, carry):
        P, C, q = carry
        c0 = Hraw[:, i] @ V  # (n,) A V_i
        p, c = V[i], c0
        for _ in range(2):
            coef = C @ c  # (qmax,)
            c = c - coef @ C
            p = p - coef @ P
        nc = jnp.linalg.norm(c)
        ok = (q < qmax) & (nc > 1e-8 * jnp.linalg.norm(c0))
        scale = 1.0 / jnp.where(nc > 0, nc, 1.0)
        pos = jnp.minimum(q, qmax - 1)
        P = P.at[pos].set(jnp.where(ok, p * scale, P[pos]))
        C = C.at[pos].set(jnp.where(ok, c * scale, C[pos]))
        return P, C, q + ok

    return jax.lax.fori_loop(0, jnp.minimum(j, qmax - q), one, (P, C, q))


# --------------------------------------------------------------------------- #
# State and configuration
# --------------------------------------------------------------------------- #


class OdeState(NamedTuple):
    """Everything the integrator needs to continue exactly (all jax arrays)."""

    t: jax.Array  # () time of the last accepted step
    y: jax.Array  # (n,)
    f: jax.Array  # (n,) f(t, y)
    t_prev: jax.Array  # () start of the last accepted step (dense output on [t_prev, t])
    y_prev: jax.Array  # (n,)
    f_prev: jax.Array  # (n,)
    h: jax.Array  # () next step size
    inv_err: jax.Array  # () controller memory: 1 / scaled error of the last accepted step
    probe: jax.Array  # (n,) power-iteration vector (unit norm)
    rho: jax.Array  # () estimate of |λ_max(∂f/∂y)|
    since_probe: jax.Array  # () accepted steps since the last probe
    mode: jax.Array  # () EXPLICIT or IMPLICIT
    counters: jax.Array  # (len(COUNTERS),) int64


@dataclass(frozen=True)
class IntegratorConfig:
    rtol: float = 1e-6  # relative tolerance (both steppers)
    atol: float = 1e-9  # absolute tolerance
    implicit_rtol: float | None = None  # tolerances of the implicit stepper (None: rtol, atol)
    implicit_atol: float | None = None
    dt0: float = 0.05  # first step
    solver: str = "auto"  # "auto" (switch on stiffness), "explicit" or "implicit"
    probe_every: int = 8  # accepted steps between spectral-radius probes
    stiff_ratio: float = 2.0  # explicit → implicit when h·ρ ≥ this ...
    stiff_dt: float = 0.25  # ... and h ≤ this (explicit steps cost ≥ 24 gradients per unit)
    nonstiff_ratio: float = 1.0  # implicit → explicit when h·ρ < this
    samples_per_call: int = 64  # sample buffer of one compiled call (chunks loop over it)
    krylov_dim: int = 30  # GMRES iterations per stage at most
    krylov_keep: int = 40  # directions shared by the stages of one step
    lin_tol: float = 0.02  # GMRES residual ≤ lin_tol·‖atol + rtol·|y|‖₂
    pcoeff: float = 0.3  # PI step-size controller (diffrax's PIDController formula)
    icoeff: float = 0.4
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0

    def tolerances(self, mode: int) -> tuple[float, float]:
        if mode == IMPLICIT:
            rtol = self.rtol if self.implicit_rtol is None else self.implicit_rtol
            atol = self.atol if self.implicit_atol is None else self.implicit_atol
            return rtol, atol
        return self.rtol, self.atol


# --------------------------------------------------------------------------- #
# The integrator
# --------------------------------------------------------------------------- #


class StiffIntegrator:
    """``y' = f(τ, y)`` from ``(τ₀, y₀)``, sampled at ``τ₀ + 1, τ₀ + 2, …``.

    ``field(τ, y) -> (n,)`` must be a pure JAX function of a scalar and a flat vector.
    """

    def __init__(self, field, y0, t0: float, config: IntegratorConfig = IntegratorConfig()):
        if config.solver not in ("auto", "explicit", "implicit"):
            raise ValueError(f"unknown solver {config.solver!r}")
        self.field, self.config = field, config
        y0 = jnp.asarray(y0)
        self.n = int(y0.shape[0])
        self._steppers = _steppers_for(field, y0, float(t0), config)
        fdt = y0.dtype
        t = jnp.asarray(float(t0), fdt)
        f0 = jax.jit(field)(t, y0)
        probe = jax.random.normal(jax.random.PRNGKey(0), y0.shape, fdt)
        mode = IMPLICIT if config.solver == "implicit" else EXPLICIT
        # explicit dtypes everywhere (weak types would retrace the loops on every call)
        self.state = OdeState(
            t=t,
            y=y0,
            f=f0,
            t_prev=t,
            y_prev=y0,
            f_prev=f0,
            h=jnp.asarray(config.dt0, fdt),
            inv_err=jnp.asarray(1.0, fdt),
            probe=probe / jnp.linalg.norm(probe),
            rho=jnp.asarray(0.0, fdt),
            since_probe=jnp.asarray(0, jnp.int64),
            mode=jnp.asarray(mode, jnp.int64),
            counters=jnp.zeros(len(COUNTERS), jnp.int64).at[COUNTERS.index("f_evals")].set(1),
        )
        self.switches: list[tuple[float, str]] = []  # (time, new solver)

    # ------------------------------------------------------------------ public

    @property
    def mode(self) -> int:
        return int(self.state.mode)

    @property
    def solver_name(self) -> str:
        return MODE_NAMES[self.mode]

    @property
    def counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, (int(x) for x in np.asarray(self.state.counters)), strict=True))

    def _buffer(self):
        fdt = self.state.y.dtype
        ys = jnp.zeros((self.config.samples_per_call, self.n), fdt)  # (S, n) samples
        return ys, jnp.asarray(0, jnp.int64)

    def compile(self) -> None:
        """Compile the loops ahead of time (both steppers unless the solver is fixed),
        so that timing :meth:`advance` excludes compilation. The loops do not depend
        on the chunk size."""
        ys, written = self._buffer()
        fdt = self.state.y.dtype
        args = (ys, written, written, jnp.asarray(0.0, fdt), written)
        modes = {"explicit": (EXPLICIT,), "implicit": (IMPLICIT,)}.get(
            self.config.solver, (EXPLICIT, IMPLICIT)
        )
        steppers = self._steppers
        for mode in modes:
            if mode not in steppers.compiled:
                state = self.state._replace(mode=jnp.asarray(mode, jnp.int64))
                steppers.compiled[mode] = steppers.loops[mode].lower(state, *args).compile()

    def advance(self, t_first: float, K: int, max_steps: int) -> jax.Array:
        """Samples at ``t_first, t_first + 1, …, t_first + K − 1`` (all after the start
        of the last step), as a ``(K, n)`` array; at most ``max_steps`` steps."""
        fdt = self.state.y.dtype
        budget = jnp.asarray(int(max_steps), jnp.int64)
        out, done = [], 0
        while done < K:
            k = min(self.config.samples_per_call, K - done)
            ys, written = self._buffer()
            count, t0 = jnp.asarray(k, jnp.int64), jnp.asarray(float(t_first + done), fdt)
            while True:
                mode = self.mode
                loop = self._steppers.compiled.get(mode, self._steppers.loops[mode])
                args = devices.commit(  # one compile, not one per argument placement
                    (self.state, ys, written, count, t0, budget), self.state.y
                )
                self.state, ys, written, status, budget = loop(*args)
                status = int(status)
                if status == _DONE:
                    break
                if status == _SWITCH:
                    new = 1 - mode
                    self.state = self.state._replace(
                        mode=jnp.asarray(new, jnp.int64), since_probe=jnp.asarray(0, jnp.int64)
                    )
                    self.switches.append((float(self.state.t), MODE_NAMES[new]))
                    continue
                raise IntegrationError(_STATUS_TEXT[status], float(self.state.t))
            out.append(ys[:k])
            done += k
        return out[0] if len(out) == 1 else jnp.concatenate(out)

    def snapshot(self) -> dict[str, np.ndarray]:
        snap = {f"ode_{k}": np.asarray(v) for k, v in self.state._asdict().items()}
        if self.switches:
            snap["ode_switch_t"] = np.array([t for t, _ in self.switches])
            snap["ode_switch_mode"] = np.array([MODE_NAMES.index(m) for _, m in self.switches])
        return snap

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        fields = {
            k: jnp.asarray(snap[f"ode_{k}"], getattr(self.state, k).dtype) for k in OdeState._fields
        }
        self.state = OdeState(**fields)
        ts = np.asarray(snap.get("ode_switch_t", np.zeros(0)))
        ms = np.asarray(snap.get("ode_switch_mode", np.zeros(0, int)))
        self.switches = [(float(t), MODE_NAMES[int(m)]) for t, m in zip(ts, ms, strict=True)]


_STEPPERS = caches.OwnedCache()  # (id(field), shape, dtype, config) -> _Steppers


def _steppers_for(field, y0, t0: float, config: IntegratorConfig) -> _Steppers:
    """The compiled steppers of one field, shared by every integrator of that field
    (a flow restored into a fresh object does not compile again)."""
    key = (id(field), y0.shape, str(y0.dtype), config)
    hit = _STEPPERS.get(key, (field,))
    if hit is not None:
        return hit
    steppers = _Steppers(field, int(y0.shape[0]), config, _depends_on_time(field, t0, y0))
    return _STEPPERS.put(key, (field,), steppers)


class _Steppers:
    """The jitted step loops for one field and configuration (no state of their own)."""

    def __init__(self, field, n: int, config: IntegratorConfig, time_dependent: bool):
        self.field, self.n, self.config, self.time_dependent = field, n, config, time_dependent
        self.compiled: dict = {}  # mode -> ahead-of-time compiled loop
        self.loops = {
            EXPLICIT: jax.jit(partial(self._loop, EXPLICIT)),
            IMPLICIT: jax.jit(partial(self._loop, IMPLICIT)),
        }

    def _loop(self, mode: int, state: OdeState, ys, written, count, t_first, budget):
        """Write samples ``t_first + i`` into ``ys[i]`` and take steps of one kind until
        ``count`` samples are written, the stiffness test asks for the other stepper,
        or a failure. ``ys`` has a fixed size, so nothing depends on the chunk size."""
        step = self._explicit_step if mode == EXPLICIT else self._implicit_step

        def cond(c):
            _, _, written, status, _ = c
            return (written < count) & (status == _DONE)

        def body(c):
            state, ys, written, status, budget = c
            ts = t_first + written

            def write(args):
                state, ys, written, status, budget = args
                s = (ts - state.t_prev) / jnp.where(
                    state.t > state.t_prev, state.t - state.t_prev, 1.0
                )
                y = _hermite(
                    s, state.t - state.t_prev, state.y_prev, state.f_prev, state.y, state.f
                )
                return state, ys.at[written].set(y), written + 1, status, budget

            def advance(args):
                state, ys, written, status, budget = args
                state, status = step(state)
                status = jnp.where((budget <= 0) & (status == _DONE), _FAIL_STEPS, status)
                return state, ys, written, status, budget - 1

            return jax.lax.cond(ts <= state.t, write, advance, (state, ys, written, status, budget))

        return jax.lax.while_loop(cond, body, (state, ys, written, jnp.asarray(_DONE), budget))

    def _control(self, state: OdeState, h, y_new, err_vec, ok_solve, order, rtol, atol):
        """PI control as diffrax's PIDController: accept when the RMS of
        ``err / (atol + rtol·max(|y|, |y_new|))`` is below 1."""
        cfg = self.config
        finite = jnp.all(jnp.isfinite(y_new)) & jnp.all(jnp.isfinite(err_vec))
        scale = atol + rtol * jnp.maximum(jnp.abs(state.y), jnp.abs(y_new))
        err = jnp.sqrt(jnp.mean((err_vec / scale) ** 2))
        err = jnp.where(finite & ok_solve, err, jnp.inf)
        accept = err < 1.0
        inv = 1.0 / jnp.maximum(err, 1e-12)
        factor = (
            cfg.safety
            * inv ** ((cfg.pcoeff + cfg.icoeff) / order)
            * state.inv_err ** (-cfg.pcoeff / order)
        )
        factor = jnp.clip(
            factor,
            jnp.where(accept, 1.0, cfg.factormin),
            jnp.where(accept, cfg.factormax, cfg.safety),
        )
        factor = jnp.where(jnp.isfinite(err), factor, cfg.factormin)
        inv_err = jnp.where(
            accept, jnp.where(jnp.isfinite(inv) & (inv > 0), inv, 1.0), state.inv_err
        )
        return accept, h * factor, inv_err, finite

    def _probe(self, state: OdeState, jvp, h_acc, mode, accept):
        """One power-iteration product every ``probe_every`` accepted steps; returns
        the new (probe, rho, since_probe, jvps used, switch?)."""
        cfg = self.config
        due = accept & (state.since_probe + 1 >= cfg.probe_every)

        def do(_):
            Jv = jvp(state.probe)
            rho = jnp.linalg.norm(Jv)
            return jnp.where(rho > 0, Jv / jnp.where(rho > 0, rho, 1.0), state.probe), rho

        probe, rho = jax.lax.cond(due, do, lambda _: (state.probe, state.rho), None)
        if cfg.solver != "auto":
            switch = jnp.asarray(False)
        elif mode == EXPLICIT:
            switch = due & (h_acc * rho >= cfg.stiff_ratio) & (h_acc <= cfg.stiff_dt)
        else:
            switch = due & (h_acc * rho < cfg.nonstiff_ratio)
        return probe, rho, jnp.where(due, 0, state.since_probe + 1), due.astype(jnp.int64), switch

    def _finish(
        self, state, accept, finite, h, h_next, inv_err, y_new, f_new, probe_out, extra, mode
    ):
        """Shared bookkeeping after a step attempt. Fails when the step size collapses,
        saying NaN/inf when the last attempt produced non-finite values."""
        probe, rho, since, n_probe, switch = probe_out
        steps_i = COUNTERS.index("steps_explicit" if mode == EXPLICIT else "steps_implicit")
        counters = (
            state.counters.at[steps_i]
            .add(accept.astype(jnp.int64))
            .at[COUNTERS.index("rejected")]
            .add(1 - accept.astype(jnp.int64))
            .at[COUNTERS.index("jvps")]
            .add(n_probe)
        )
        for name, value in extra.items():
            counters = counters.at[COUNTERS.index(name)].add(value)
        new = OdeState(
            t=state.t + h,
            y=y_new,
            f=f_new,
            t_prev=state.t,
            y_prev=state.y,
            f_prev=state.f,
            h=h_next,
            inv_err=inv_err,
            probe=probe,
            rho=rho,
            since_probe=since,
            mode=state.mode,
            counters=counters,
        )
        rejected = state._replace(h=h_next, counters=counters)
        out = jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new, rejected)
        bad = ~accept & (h_next < 1e-10 * jnp.maximum(1.0, jnp.abs(state.t)))
        status = jnp.where(
            bad,
            jnp.where(finite, _FAIL_DT, _FAIL_NAN),
            jnp.where(accept & switch, _SWITCH, _DONE),
        )
        return out, status

    def _jacobian(self, t, y):
        """``v ↦ J v`` with ``J = ∂f/∂y (t, y)``: ``jax.linearize`` once, then one
        forward-over-reverse product per call (for GD a Hessian–vector product; on
        tests/rnn_recall.py it costs about one gradient, measured, so a forward
        difference of gradients would save nothing and lose exactness)."""
        f = self.field
        return jax.linearize(lambda x: f(t, x), y)[1]

    def _explicit_step(self, state: OdeState):
        tab, f = _TSIT5, self.field
        rtol, atol = self.config.tolerances(EXPLICIT)
        t, y, h = state.t, state.y, state.h
        ks = [state.f]
        for i, row in enumerate(tab.a_lower):
            yi = y + h * sum(float(a) * k for a, k in zip(row, ks, strict=True) if a != 0)
            ks.append(f(t + float(tab.c[i]) * h, yi))
        y_new = y + h * sum(float(b) * k for b, k in zip(tab.b_sol, ks, strict=True) if b != 0)
        err = h * sum(float(b) * k for b, k in zip(tab.b_error, ks, strict=True) if b != 0)
        f_new = ks[-1]  # FSAL: the last stage is f(t + h, y_new)
        accept, h_next, inv_err, finite = self._control(state, h, y_new, err, True, 5, rtol, atol)
        # traced inside the probe's cond branch: no linearisation on the other steps
        jvp = lambda v: jax.jvp(lambda x: f(t + h, x), (y_new,), (v,))[1]  # noqa: E731
        probe_out = self._probe(state, jvp, h, EXPLICIT, accept)
        extra = {"f_evals": len(tab.a_lower)}
        return self._finish(
            state, accept, finite, h, h_next, inv_err, y_new, f_new, probe_out, extra, EXPLICIT
        )

    def _implicit_step(self, state: OdeState):
        tab, f, cfg = RA34PW2, self.field, self.config
        rtol, atol = cfg.tolerances(IMPLICIT)
        t, y, h = state.t, state.y, state.h
        n, s, m, qmax = self.n, len(RA34PW2.m), cfg.krylov_dim, cfg.krylov_keep
        lin = self._jacobian(t, y)
        if self.time_dependent:
            f_t = jax.jvp(lambda tt: f(tt, y), (t,), (jnp.ones_like(t),))[1]
        else:
            f_t = jnp.zeros_like(y)
        hg = tab.gamma * h

        def A(v):
            return v - hg * lin(v)

        tol = cfg.lin_tol * jnp.linalg.norm(atol + rtol * jnp.abs(y))
        a, c = jnp.asarray(tab.a), jnp.asarray(tab.c)
        alpha, gsum = jnp.asarray(tab.alpha), jnp.asarray(tab.gamma_sum)

        def stage(i, carry):
            U, P, C, q, n_mv, n_f, ok = carry
            yi = y + a[i] @ U
            fi = jax.lax.cond(i == 0, lambda: state.f, lambda: f(t + alpha[i] * h, yi))
            rhs = hg * (fi + (c[i] / h) @ U + gsum[i] * h * f_t)
            u, j, conv, V, Hraw = gmres(A, rhs, tol, m, P, C)
            P, C, q = _extend(P, C, q, V, Hraw, j)
            return U.at[i].set(u), P, C, q, n_mv + j, n_f + (i > 0), ok & conv

        zeros = jnp.zeros((qmax, n), y.dtype)  # (qmax, n) shared directions P and images C
        zero = jnp.asarray(0)
        init = (jnp.zeros((s, n), y.dtype), zeros, zeros, zero, zero, zero, jnp.asarray(True))
        U, _, _, _, n_mv, n_f, ok = jax.lax.fori_loop(0, s, stage, init)
        y_new = y + jnp.asarray(tab.m) @ U
        err = jnp.asarray(tab.m_err) @ U
        accept, h_next, inv_err, finite = self._control(
            state, h, y_new, err, ok, tab.error_order, rtol, atol
        )
        f_new = jax.lax.cond(accept, lambda: f(t + h, y_new), lambda: state.f)
        probe_out = self._probe(state, lin, h, IMPLICIT, accept)
        extra = {
            "f_evals": n_f + accept.astype(jnp.int64),
            "jvps": n_mv + (1 if self.time_dependent else 0),
            "linearisations": 1,
        }
        return self._finish(
            state, accept, finite, h, h_next, inv_err, y_new, f_new, probe_out, extra, IMPLICIT
        )


class IntegrationError(Exception):
    """The integrator could not continue (message and the time it stopped at)."""

    def __init__(self, message: str, t: float):
        super().__init__(message)
        self.message, self.t = message, t


def _hermite(s, h, y0, f0, y1, f1):
    """Cubic Hermite interpolant on a step of length ``h`` at fraction ``s ∈ [0, 1]``."""
    s2, s3 = s * s, s * s * s
    return (
        (2 * s3 - 3 * s2 + 1) * y0
        + (s3 - 2 * s2 + s) * h * f0
        + (3 * s2 - 2 * s3) * y1
        + (s3 - s2) * h * f1
    )


def _depends_on_time(field, t0: float, y0) -> bool:
    """Whether ``field`` reads its time argument at all (from its jaxpr)."""
    jaxpr = jax.make_jaxpr(field)(jnp.asarray(t0), y0).jaxpr
    tvar = jaxpr.invars[0]
    return any(tvar in eqn.invars for eqn in jaxpr.eqns) or tvar in jaxpr.outvars
