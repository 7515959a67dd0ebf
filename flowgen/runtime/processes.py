"""The discrete optimizer and the stable flow as processes advanced in chunks.

* :class:`DiscreteProcess` — the exact discrete update, jit-compiled, advanced
  ``K`` steps at a time with ``lax.scan``;
* :class:`StableFlow` — the flow with ``Σ = 0``: ``dw/dt`` and the state rates
  at ``g = ∇L(w)``, integrated by diffrax (Tsit5, PID step-size control; an
  implicit solver takes over when the flow becomes stiff), sampled at integer
  times. Time ``τ`` runs in steps; the counter read by the rates is ``t = τ + 1``
  (the step being taken).

Both expose ``advance(K) -> Chunk`` with the iterates at the ``K`` new integer
times, so that processes can be compared in lockstep.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import SimulationError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime.optimizer import Optimizer, tree_finite


@dataclass
class Chunk:
    """Values at integer times ``t0+1 .. t0+K``."""

    w: jax.Array  # (K, n)
    loss: np.ndarray  # (K,)
    grad_norm: np.ndarray  # (K,)
    states: dict  # name -> (K, ...) state after each step


def _check_finite(name: str, arrays: dict, t0: int):
    for key, arr in arrays.items():
        a = np.asarray(arr)
        if not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1))
            step = t0 + 1 + int(bad[0, 0]) if bad.size else t0
            raise SimulationError(
                f"{name}: {key} is NaN or infinite at step {step}",
                hint="lower the learning rate, or check the loss for overflow",
            )


class DiscreteProcess:
    """The discrete optimizer."""

    label = "discrete"

    def __init__(self, opt: Optimizer, problem: Problem, w0, state0=None, t0: int = 0):
        self.opt, self.problem = opt, problem
        self.w = jnp.asarray(w0)
        self.state = opt.init(self.w) if state0 is None else state0
        self.t = t0
        vg = jax.value_and_grad(problem.loss)

        def body(carry, _):
            w, s, t = carry
            L, g = vg(w)
            w2, s2 = opt.step(w, s, g, t + 1.0)
            L2 = problem.loss(w2)
            return (w2, s2, t + 1.0), (w2, s2, L2, jnp.linalg.norm(g))

        @partial(jax.jit, static_argnums=3)
        def run(w, s, t, K):
            (w, s, _), (ws, ss, Ls, gn) = jax.lax.scan(body, (w, s, t), None, length=K)
            return w, s, ws, ss, Ls, gn

        self._run = run

    @in_float64
    def advance(self, K: int) -> Chunk:
        w, s, ws, ss, Ls, gn = self._run(self.w, self.state, float(self.t), K)
        _check_finite("discrete optimizer", {"loss": Ls, "parameters": ws}, self.t)
        if not bool(tree_finite(s)):
            raise SimulationError(
                f"discrete optimizer: the state is NaN or infinite by step {self.t + K}"
            )
        self.w, self.state, self.t = w, s, self.t + K
        # gradient norms are of the iterate before each step; shift to the new iterates
        gnorm = np.asarray(gn)
        gnorm = np.append(gnorm[1:], float(jnp.linalg.norm(jax.grad(self.problem.loss)(w))))
        return Chunk(ws, np.asarray(Ls), gnorm, ss)

    def snapshot(self) -> dict[str, np.ndarray]:
        """Everything needed to continue exactly: the iterate, the state, the time."""
        out = {"w": np.asarray(self.w), "t": np.asarray(self.t)}
        out.update({f"state/{k}": np.asarray(v) for k, v in self.state.items()})
        return out

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        self.w = jnp.asarray(snap["w"])
        self.t = int(snap["t"])
        self.state = {k[6:]: jnp.asarray(v) for k, v in snap.items() if k.startswith("state/")}


class StableFlow:
    """The stable flow: the derived rates with ``Σ = 0`` (``Eg = ∇L``, ``Vg = 0``)."""

    label = "stable"

    def __init__(
        self,
        opt: Optimizer,
        problem: Problem,
        w0,
        state0=None,
        t0: int = 0,
        *,
        rtol: float = 1e-6,
        atol: float = 1e-9,
        max_steps: int = 200_000,
    ):
        self.opt, self.problem = opt, problem
        self.w = jnp.asarray(w0)
        self.state = opt.flow_state(opt.init(self.w) if state0 is None else state0)
        self.t = t0
        grad = jax.grad(problem.loss)
        use_drift = opt.spec.has_central

        def field(tau, y, args):
            w, s = y
            g = grad(w)
            if use_drift:
                dw, ds = opt.drift(w, s, *opt.moments(g), tau + 1.0)
            else:
                dw, ds = opt.rates(w, s, g, tau + 1.0)
            return dw, ds

        self.term = diffrax.ODETerm(field)
        self.controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4)
        self.max_steps = max_steps
        self._solvers = {"explicit": diffrax.Tsit5(), "implicit": diffrax.Kvaerno5()}
        self.solver_name = "explicit"
        self.n_steps = 0

        @partial(jax.jit, static_argnames=("K", "solver"))
        def run(w, s, t0, K, solver):
            ts = t0 + jnp.arange(1, K + 1, dtype=jnp.float64)
            sol = diffrax.diffeqsolve(
                self.term,
                self._solvers[solver],
                t0=t0,
                t1=t0 + K,
                dt0=0.05,
                y0=(w, s),
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=self.controller,
                max_steps=self.max_steps,
                throw=False,
            )
            ws, ss = sol.ys
            Ls = jax.vmap(problem.loss)(ws)
            gn = jax.vmap(lambda x: jnp.linalg.norm(grad(x)))(ws)
            return ws, ss, Ls, gn, sol.result, sol.stats["num_steps"]

        self._run = run

    @in_float64
    def advance(self, K: int) -> Chunk:
        for solver in ("explicit", "implicit") if self.solver_name == "explicit" else ("implicit",):
            ws, ss, Ls, gn, result, nsteps = self._run(self.w, self.state, float(self.t), K, solver)
            ok = result == diffrax.RESULTS.successful and bool(jnp.all(jnp.isfinite(Ls)))
            if ok:
                self.solver_name = solver
                break
        else:
            raise SimulationError(
                f"stable flow: the ODE solver failed between t={self.t} and t={self.t + K} "
                f"({result})",
                hint="the flow is stiff or diverging; try fewer steps or a smaller learning rate",
            )
        self.n_steps += int(nsteps)
        _check_finite("stable flow", {"loss": Ls, "parameters": ws}, self.t)
        self.w, self.state, self.t = ws[-1], jax.tree_util.tree_map(lambda a: a[-1], ss), self.t + K
        return Chunk(ws, np.asarray(Ls), np.asarray(gn), ss)


class SharpnessMeter:
    """Effective sharpness ``λ_max(P^{-1/2} H P^{-1/2})``, warm-started per process."""

    def __init__(self, opt: Optimizer, problem: Problem, k: int = 1, tol: float = 1e-6):
        from flowgen.runtime import eigen

        self.opt, self.problem, self.k, self.tol = opt, problem, k, tol
        self._eigen = eigen
        self._prev = None

    @in_float64
    def __call__(self, w, state, t) -> float:
        p = self.opt.effective_step(w, state, float(t))
        mv = self._eigen.sym_eff_hessian_matvec(self.problem.loss, w, p)
        init = None if self._prev is None else self._prev.vecs
        est = self._eigen.top_eigenpairs(mv, w.shape[0], self.k, init=init, tol=self.tol)
        self._prev = est
        return float(est.vals[0])

    def snapshot(self) -> dict[str, np.ndarray]:
        """The warm start (the previous eigenvectors), so a resumed run measures the same."""
        return {} if self._prev is None else {"vecs": np.asarray(self._prev.vecs)}

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        if "vecs" in snap:
            vecs = jnp.asarray(snap["vecs"])
            self._prev = self._eigen.EigState(jnp.zeros(vecs.shape[1]), vecs)
        else:
            self._prev = None
