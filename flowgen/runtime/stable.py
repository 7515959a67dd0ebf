"""The stable flow: the optimizer's flow with ``Σ = 0``, stiff-aware.

The stable flow is the ODE of the derived rates at ``Eg = ∇L(w)``, ``Vg = 0``::

    dw/dτ = drift_w(w, s, ∇L(w), 0, τ + 1),    ds/dτ = drift_s(w, s, ∇L(w), 0, τ + 1)

(``opt.rates`` when the optimizer has no central flow), with time ``τ`` in steps
and the counter read by the rates ``t = τ + 1``. For GD it is gradient flow
``dw/dτ = −lr·∇L``; for RMSProp it also carries ``v``, for Adam ``m`` and ``v``.

Gradient flow keeps sharpening where the discrete optimizer stops at its
threshold, and once ``lr·λ_max(H)`` is hundreds of times the threshold the ODE
is stiff: an explicit solver needs hundreds of gradients per unit of time to
stay stable while the trajectory barely moves. :class:`StableFlow` therefore
integrates with :class:`~flowgen.runtime.integrators.StiffIntegrator`: Tsit5
while the flow is not stiff, and a Rosenbrock method (RA34PW2, L-stable, order
3) with matrix-free GMRES on Jacobian–vector products (Hessian–vector products
for GD) once a spectral-radius probe finds the explicit steps stuck at their
stability limit. Which solver ran when, and how many steps, gradients and
products it spent, is in :attr:`StableFlow.stats`.

:class:`DiffraxStableFlow` is the previous implementation (diffrax Tsit5 per
chunk, Kvaerno5 after a failure), kept for benchmarks.
"""

from __future__ import annotations

from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from flowgen.errors import SimulationError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime import caches
from flowgen.runtime.integrators import (
    IntegrationError,
    IntegratorConfig,
    StiffIntegrator,
)
from flowgen.runtime.optimizer import Optimizer

__all__ = ["DiffraxStableFlow", "IMPLICIT_TOL_FACTOR", "StableFlow"]

#: The implicit solver's tolerances default to this multiple of ``rtol``/``atol``:
#: its cost grows like ``tol^(-1/3)`` (order 3), and at 10 × (1e-6, 1e-9) its error
#: on tests/rnn_recall.py (hidden 32, GD lr 0.1, 400 steps, stiff from τ ≈ 120) is
#: 4.4e-5 of the distance travelled (4.4e-4 at 100 ×), for about half the cost of 1 ×.
IMPLICIT_TOL_FACTOR = 10.0


def _field(opt: Optimizer, problem: Problem):
    """``(τ, (w, s)) -> (dw/dτ, ds/dτ)`` at ``g = ∇L(w)``, counter ``τ + 1``."""
    grad = jax.grad(problem.loss)
    use_drift = opt.spec.has_central

    def field(tau, y):
        w, s = y
        g = grad(w)
        if use_drift:
            return opt.drift(w, s, *opt.moments(g), tau + 1.0)
        return opt.rates(w, s, g, tau + 1.0)

    return field


class _FlowFunctions:
    """The flat field and the observation of one (optimizer, problem, state layout)."""

    def __init__(self, opt: Optimizer, problem: Problem, template):
        _, unravel = ravel_pytree(template)
        field = _field(opt, problem)
        vg = jax.value_and_grad(problem.loss)
        self.opt, self.problem = opt, problem  # kept alive: the cache is keyed by id

        def flat_field(tau, y):  # (n_y,) -> (n_y,)
            return ravel_pytree(field(tau, unravel(y)))[0]

        @jax.jit
        def observe(ys):  # (K, n_y) -> ws (K, n), states, losses (K,), grad norms (K,)
            ws, ss = jax.vmap(unravel)(ys)
            Ls, gs = jax.vmap(vg)(ws)
            return ws, ss, Ls, jnp.linalg.norm(gs, axis=1)

        self.field, self.observe = flat_field, observe
        self.observe_compiled: dict = {}  # K -> ahead-of-time compiled observe


_FLOW_FUNCTIONS = caches.OwnedCache()


def _flow_functions(opt: Optimizer, problem: Problem, template) -> _FlowFunctions:
    """One :class:`_FlowFunctions` per (optimizer, problem, layout of (w, state)), so that
    flows of the same problem (e.g. one restored from a snapshot) share compiled code."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    key = (
        id(opt),
        id(problem),
        treedef,
        tuple((jnp.shape(x), str(jnp.result_type(x))) for x in leaves),
    )
    hit = _FLOW_FUNCTIONS.get(key, (opt, problem))
    if hit is not None:
        return hit
    return _FLOW_FUNCTIONS.put(key, (opt, problem), _FlowFunctions(opt, problem, template))


class StableFlow:
    """The stable flow, advanced ``K`` units of time at a time (see the module doc).

    Args:
        opt, problem: the optimizer and the loss.
        w0, state0, t0: the start (``state0=None``: ``opt.init(w0)``); ``t0`` integer.
        rtol, atol: tolerances of the step-size controller (RMS of the error over
            ``atol + rtol·|y|`` below 1), for both solvers unless ``implicit_rtol`` /
            ``implicit_atol`` are given.
        max_steps: steps allowed per :meth:`advance`.
        solver: ``"auto"`` (explicit, implicit when stiff), ``"explicit"`` or ``"implicit"``.
    """

    label = "stable"

    @in_float64
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
        solver: str = "auto",
        implicit_rtol: float | None = None,
        implicit_atol: float | None = None,
    ):
        self.opt, self.problem = opt, problem
        self.w = jnp.asarray(w0)  # (n,) at time t
        self.state = opt.flow_state(opt.init(self.w) if state0 is None else state0)
        self.t = int(t0)
        self.max_steps = int(max_steps)
        y0, _ = ravel_pytree((self.w, self.state))  # (n_y,) = (w, states) flattened
        if solver not in ("auto", "explicit", "implicit"):
            raise SimulationError(
                f"stable flow: unknown solver {solver!r}",
                hint="choose auto, explicit or implicit",
            )
        self.config = IntegratorConfig(
            rtol=rtol,
            atol=atol,
            implicit_rtol=IMPLICIT_TOL_FACTOR * rtol if implicit_rtol is None else implicit_rtol,
            implicit_atol=IMPLICIT_TOL_FACTOR * atol if implicit_atol is None else implicit_atol,
            solver=solver,
        )
        self._fns = _flow_functions(opt, problem, (self.w, self.state))
        self.integrator = StiffIntegrator(self._fns.field, y0, float(self.t), self.config)

    @in_float64
    def compile(self, K: int) -> None:
        """Compile everything :meth:`advance` needs for chunks of ``K`` ahead of time."""
        self.integrator.compile()
        fns = self._fns
        if K not in fns.observe_compiled:
            ys = jnp.zeros((K, self.integrator.n))  # (K, n_y)
            fns.observe_compiled[K] = fns.observe.lower(ys).compile()

    @property
    def solver_name(self) -> str:
        """The solver that will take the next step: ``"explicit"`` or ``"implicit"``."""
        return self.integrator.solver_name

    @property
    def n_steps(self) -> int:
        """Accepted steps so far (both solvers)."""
        c = self.integrator.counters
        return c["steps_explicit"] + c["steps_implicit"]

    @property
    def stats(self) -> dict:
        """Cost and solver record: step counts per solver, rejected steps, field
        evaluations (one gradient each), Jacobian–vector products, linearisations,
        the switches ``[(τ, solver), …]`` and the current solver."""
        out = dict(self.integrator.counters)
        out["switches"] = [[t, m] for t, m in self.integrator.switches]
        out["solver"] = self.solver_name
        out["spectral_radius"] = float(self.integrator.state.rho)
        return out

    @in_float64
    def advance(self, K: int):
        from flowgen.runtime.processes import Chunk, _check_finite

        try:
            ys = self.integrator.advance(self.t + 1.0, K, self.max_steps)
        except IntegrationError as e:
            raise SimulationError(
                f"stable flow: {e.message} between t={self.t} and t={self.t + K} "
                f"(at τ = {e.t:.6g}, {self.solver_name} solver)",
                hint="the flow is diverging or too stiff; try fewer steps or a smaller "
                "learning rate",
            ) from None
        ws, ss, Ls, gn = self._fns.observe_compiled.get(K, self._fns.observe)(ys)
        _check_finite("stable flow", {"loss": Ls, "parameters": ws}, self.t)
        self.w, self.state = ws[-1], jax.tree_util.tree_map(lambda a: a[-1], ss)
        self.t += K
        return Chunk(ws, np.asarray(Ls), np.asarray(gn), ss)

    def snapshot(self) -> dict[str, np.ndarray]:
        """Everything needed to continue exactly, as a flat dict of numpy arrays
        (``np.savez``-able): the sample at ``t`` and the integrator's state (last step,
        step size, controller memory, stiffness probe, solver, counters)."""
        snap = {"t": np.asarray(self.t), "w": np.asarray(self.w)}
        for k, v in self.state.items():
            snap[f"state.{k}"] = np.asarray(v)
        snap.update(self.integrator.snapshot())
        return snap

    @in_float64
    def restore(self, snap: dict[str, np.ndarray]) -> None:
        """Continue from :meth:`snapshot` (of a flow of the same optimizer and problem)."""
        self.t = int(snap["t"])
        self.w = jnp.asarray(snap["w"])
        self.state = {k: jnp.asarray(snap[f"state.{k}"]) for k in self.state}
        self.integrator.restore(snap)


class DiffraxStableFlow:
    """The previous stable flow: diffrax Tsit5 (PID) per chunk, Kvaerno5 after a failure.

    Kept for ``benchmarks/stable_flow.py``: it solves each chunk from scratch (the
    steps stop at chunk ends) and crawls once the flow is stiff.
    """

    label = "stable"

    @in_float64
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
        field = _field(opt, problem)
        self.term = diffrax.ODETerm(lambda tau, y, args: field(tau, y))
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
    def advance(self, K: int):
        from flowgen.runtime.processes import Chunk, _check_finite

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
