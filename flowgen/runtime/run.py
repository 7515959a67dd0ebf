"""``flowgen run``: the discrete optimizer and its stable flow, side by side.

Both processes start from one point and advance in lockstep, chunk by chunk
(``lax.scan`` for the discrete steps, diffrax for the flow), so a progress
callback can report between chunks. Recorded per step: loss, gradient norm,
effective sharpness ``λ_max(P⁻¹H)`` (every ``eig_every`` steps; NaN elsewhere),
and the distance between the processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter, StableFlow


@dataclass(frozen=True)
class RunConfig:
    steps: int = 1000  # discrete steps (= units of flow time)
    chunk: int = 50  # steps per lockstep chunk (progress granularity)
    eig_every: int = 5  # effective sharpness every K steps
    start_step: int | None = None  # flows start from the discrete iterate here (None: auto)
    rtol: float = 1e-6  # stable flow: relative tolerance of the PID controller
    atol: float = 1e-9  # stable flow: absolute tolerance


@dataclass
class RunResult:
    optimizer: str
    problem: str
    threshold: float | None
    config: RunConfig
    series: dict[str, np.ndarray]
    timings: dict[str, float] = field(default_factory=dict)
    w_final: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "problem": self.problem,
            "threshold": self.threshold,
            "config": asdict(self.config),
            "timings": self.timings,
            "info": self.info,
            "series": {
                k: [None if not np.isfinite(x) else float(x) for x in v]
                for k, v in self.series.items()
            },
        }


def default_start(opt: Optimizer) -> int:
    """Flows start after the first discrete step when the optimizer has state:
    states initialised at zero make the first step's rate singular (e.g. p = lr/eps)."""
    return 1 if opt.state_names else 0


@in_float64
def run_stable(
    opt: Optimizer,
    problem: Problem,
    config: RunConfig = RunConfig(),
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    n_steps = config.steps
    start = default_start(opt) if config.start_step is None else config.start_step
    disc = DiscreteProcess(opt, problem, problem.w0)
    t_disc = t_flow = t_eig = 0.0
    if start:
        disc.advance(start)
    stable = StableFlow(
        opt, problem, disc.w, disc.state, disc.t, rtol=config.rtol, atol=config.atol
    )
    meters = {"discrete": SharpnessMeter(opt, problem), "stable": SharpnessMeter(opt, problem)}
    w_start = disc.w
    T = n_steps + 1
    series = {
        k: np.full(T, np.nan)
        for k in (
            "step",
            "loss_discrete",
            "loss_stable",
            "grad_norm_discrete",
            "grad_norm_stable",
            "sharpness_discrete",
            "sharpness_stable",
            "distance",
            "distance_travelled",
        )
    }
    series["step"] = np.arange(T, dtype=float)
    L0 = float(problem.loss(problem.w0))
    series["loss_discrete"][0] = L0
    t = start
    while t < n_steps:
        K = min(config.chunk, n_steps - t)
        tic = time.perf_counter()
        cd = disc.advance(K)
        jax.block_until_ready(cd.w)
        t_disc += time.perf_counter() - tic
        tic = time.perf_counter()
        cs = stable.advance(K)
        jax.block_until_ready(cs.w)
        t_flow += time.perf_counter() - tic
        idx = np.arange(t + 1, t + K + 1)
        series["loss_discrete"][idx] = cd.loss
        series["loss_stable"][idx] = cs.loss
        series["grad_norm_discrete"][idx] = cd.grad_norm
        series["grad_norm_stable"][idx] = cs.grad_norm
        series["distance"][idx] = np.asarray(jnp.linalg.norm(cd.w - cs.w, axis=1))
        series["distance_travelled"][idx] = np.asarray(jnp.linalg.norm(cd.w - w_start, axis=1))
        tic = time.perf_counter()
        for j, step in enumerate(idx):
            if step % config.eig_every == 0 or step == n_steps:
                for name, chunk in (("discrete", cd), ("stable", cs)):
                    st = jax.tree_util.tree_map(lambda a, j=j: a[j], chunk.states)
                    series[f"sharpness_{name}"][step] = meters[name](chunk.w[j], st, float(step))
        t_eig += time.perf_counter() - tic
        t += K
        if progress:
            progress(t, n_steps)
    if start:
        series["loss_stable"][: start + 1] = np.nan
        series["loss_stable"][start] = series["loss_discrete"][start] if start else np.nan
    return RunResult(
        optimizer=opt.name,
        problem=problem.name,
        threshold=opt.threshold,
        config=config,
        series=series,
        timings={
            "discrete_s": t_disc,
            "stable_s": t_flow,
            "sharpness_s": t_eig,
            "stable_solver_steps": stable.n_steps,
        },
        w_final={"discrete": np.asarray(disc.w), "stable": np.asarray(stable.w)},
        info={
            "start_step": start,
            "n_params": int(problem.w0.shape[0]),
            "stable_solver": stable.solver_name,
        },
    )
