"""``flowgen run``: the discrete optimizer and its stable flow, side by side.

One :class:`~flowgen.runtime.loop.Experiment` with a single flow lane, the
stable flow (``Σ = 0``), started after the first discrete step when the
optimizer has state (``default_start``). Recorded per step (``run.json``):
loss, gradient norm, effective sharpness ``λ_max(P⁻¹H)`` (every ``eig_every``
steps; NaN elsewhere), the harmonic mean of the discrete effective step sizes,
and the distance between the two processes (``distance``, also
``distance_stable``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from flowgen.problems import Problem
from flowgen.runtime.checkpoint import CheckpointStore
from flowgen.runtime.loop import Experiment, FlowLane, Progress, default_start
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.processes import StableFlow
from flowgen.runtime.series import json_values

__all__ = ["RunConfig", "RunResult", "default_start", "run_stable"]


@dataclass(frozen=True)
class RunConfig:
    steps: int = 1000  # discrete steps (= units of flow time)
    chunk: int = 50  # steps per lockstep chunk (progress and checkpoint granularity)
    eig_every: int = 5  # effective sharpness every K steps
    start_step: int | None = None  # the stable flow starts from the discrete iterate here
    rtol: float = 1e-6  # stable flow: relative tolerance of the step-size controller
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
    devices: list[str] = field(default_factory=list)  # the devices the run used

    def to_json(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "problem": self.problem,
            "threshold": self.threshold,
            "config": asdict(self.config),
            "timings": self.timings,
            "info": self.info,
            "series": {k: json_values(v) for k, v in self.series.items()},
        }


def run_stable(
    opt: Optimizer,
    problem: Problem,
    config: RunConfig = RunConfig(),
    progress: Progress | None = None,
    *,
    store: CheckpointStore | None = None,
    resume: bool = False,
    should_stop=None,
) -> RunResult:
    """The discrete optimizer and its stable flow in lockstep from ``start_step``."""

    def stable(w, s, t):
        return StableFlow(opt, problem, w, s, t, rtol=config.rtol, atol=config.atol)

    exp = Experiment(
        opt,
        problem,
        steps=config.steps,
        # no derived flow (the derivation refused the file): the discrete run alone
        flows=(FlowLane("stable", stable, measure_sharpness=True),) if opt.spec.has_flow else (),
        start=config.start_step,
        chunk=config.chunk,
        eig_every=config.eig_every,
        store=store,
        resume=resume,
        progress=progress,
        should_stop=should_stop,
    ).run()
    series = dict(exp.series.arrays())
    for key in ("loss_stable", "grad_norm_stable", "sharpness_discrete", "sharpness_stable"):
        series.setdefault(key, np.full(config.steps + 1, np.nan))
    series["distance"] = exp.series["distance_stable"]
    series.setdefault("distance_travelled", np.full(config.steps + 1, np.nan))
    stable_proc = exp.procs.get("stable")
    t = exp.timings
    return RunResult(
        optimizer=opt.name,
        problem=problem.name,
        threshold=opt.threshold,
        config=config,
        series=series,
        timings={
            "discrete_s": t.get("discrete_s", 0.0),
            "stable_s": t.get("stable_s", 0.0),
            "sharpness_s": t.get("sharpness_s", 0.0),
            "stable_solver_steps": getattr(stable_proc, "n_steps", 0),
        },
        w_final={
            "discrete": np.asarray(exp.discrete.w),
            **({"stable": np.asarray(stable_proc.w)} if stable_proc is not None else {}),
        },
        info={
            "start_step": exp.flow_start,
            "n_params": int(problem.n),
            "stable_solver": getattr(stable_proc, "solver_name", None),
            "no_flow_reason": opt.spec.flow_reason,
        },
        devices=exp.placement.describe(),
    )
