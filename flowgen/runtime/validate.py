"""``flowgen validate``: the central flow against the discrete optimizer
(``docs/mathematics.md`` §5).

The discrete optimizer, the central flow and the stable flow run in lockstep
(:class:`~flowgen.runtime.loop.Experiment`, checkpointed every chunk). The
discrete effective sharpness, measured every ``eig_every`` steps, fixes the edge
of stability (``eos_start``: first step with sharpness ≥ 0.95·c) and, with
``restart_at="auto"``, the restart point (``eos_start + 100``). The two flows
start from the discrete iterate and state there (or from the common start) and
are compared with it step by step.

Summary (``report.json``):

* ``eos_start``: the first step at which the discrete effective sharpness
  reaches ``0.95·c`` from below (an adaptive optimizer's warm-up, when its
  preconditioner state is still near 0, does not count);
* ``*_distance_rel = ‖w_disc − w_flow‖ / ‖w_disc − w_start‖`` at the last step;
* ``loss_pred_rel_err``: mean over steps after ``max(eos_start, restart_at)``
  of |21-step centred window of the discrete loss − predicted loss| / window;
* ``sharpness_rel_err``: median |windowed discrete sharpness − c| / c there;
* verdict ``pass`` iff central ≤ 0.10, stable ≥ 3 × central and loss ≤ 0.10;
  ``no-eos`` when the discrete run never reached the edge;
* ``expansion_error_median``/``_max`` (with ``check_expansion``): the relative
  error of the central flow's second-order time average of the gradient, measured
  on the discrete run's own iterates once the flows run
  (:mod:`flowgen.runtime.expansion`); ``None`` when not checked. Well above
  :data:`EXPANSION_LIMIT` the flow, a second-order theory, cannot follow the run;
  ``expansion_holds`` says whether the median is within it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from flowgen.errors import UsageError
from flowgen.problems import Problem
from flowgen.runtime.central import CentralConfig, CentralFlow
from flowgen.runtime.checkpoint import CheckpointStore
from flowgen.runtime.expansion import ExpansionChecker
from flowgen.runtime.loop import Experiment, FlowLane, Progress, first_crossing
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.processes import StableFlow
from flowgen.runtime.series import json_values

__all__ = [
    "ValidateConfig",
    "ValidationResult",
    "centred_window",
    "first_crossing",
    "interp_nan",
    "summarise",
    "validate",
]

PASS_CENTRAL = 0.10  # central_distance_rel at most this
PASS_RATIO = 3.0  # stable_distance_rel at least this multiple of central
PASS_LOSS = 0.10  # loss_pred_rel_err at most this
#: Iterates per window of the expansion check (whole periods of a period-two
#: oscillation; fewer when the chunk is shorter).
EXPANSION_WINDOW = 20
#: A median expansion error above this: the second-order average is not the run's.
EXPANSION_LIMIT = 0.10


@dataclass(frozen=True)
class ValidateConfig:
    steps: int = 1000  # discrete steps (units of flow time)
    restart_at: int | str | None = None  # None: common start; an int T; or "auto"
    chunk: int = 25  # steps per chunk (progress granularity)
    eig_every: int = 1  # sharpness of the discrete run and the stable flow every K steps
    window: int = 21  # centred window for the discrete loss and sharpness
    eos_frac: float = 0.95  # edge of stability: sharpness >= eos_frac * c
    auto_delay: int = 100  # restart "auto": this many steps after eos_start
    central: CentralConfig = field(default_factory=CentralConfig)
    stable_rtol: float = 1e-6  # the stable flow's step-size control (RMS of err/(atol+rtol|y|))
    stable_atol: float = 1e-9
    # once the flows run, check the flow's second-order average of the gradient against
    # the discrete run's own iterates at the end of every chunk (20 gradients and 20
    # third derivatives per chunk: 7-11 gradient-equivalents per step; no effect on the flows)
    check_expansion: bool = False


@dataclass
class ValidationResult:
    optimizer: str
    problem: str
    threshold: float
    config: ValidateConfig
    eos_start: int | None
    restart_at: int | None
    start: int
    summary: dict
    series: dict[str, np.ndarray]
    sigma: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # the devices the run used

    def to_json(self) -> dict:
        cfg = asdict(self.config)
        return {
            "config": cfg,
            "optimizer": self.optimizer,
            "problem": self.problem,
            "threshold": self.threshold,
            "eos_start": self.eos_start,
            "restart_at": self.restart_at,
            "flow_start": self.start,
            "summary": self.summary,
            "timings": self.timings,
            "series": {k: json_values(v) for k, v in self.series.items()},
        }


def centred_window(x: np.ndarray, width: int) -> np.ndarray:
    """Mean over a centred window (NaN where the window is incomplete or has NaN)."""
    h = width // 2
    out = np.full_like(x, np.nan, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(np.nan_to_num(x, nan=0.0))])
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(x))])
    for i in range(h, len(x) - h):
        if bad[i + h + 1] - bad[i - h] == 0:
            out[i] = (c[i + h + 1] - c[i - h]) / width
    return out


def interp_nan(x: np.ndarray) -> np.ndarray:
    """Fill NaN gaps (sharpness measured every K steps) by linear interpolation."""
    idx = np.arange(len(x))
    ok = np.isfinite(x)
    if ok.sum() < 2:
        return x
    y = x.copy()
    y[~ok] = np.interp(idx[~ok], idx[ok], x[ok], left=np.nan, right=np.nan)
    return y


def validate(
    opt: Optimizer,
    problem: Problem,
    config: ValidateConfig = ValidateConfig(),
    progress: Progress | None = None,
    *,
    store: CheckpointStore | None = None,
    resume: bool = False,
    should_stop=None,
) -> ValidationResult:
    """The discrete optimizer, its central flow and its stable flow, in lockstep
    (:class:`~flowgen.runtime.loop.Experiment`), then the summary."""
    c = opt.threshold
    if c is None:
        raise UsageError(f"{opt.name} has no stability threshold, so nothing to validate against")
    flows = (
        FlowLane(
            "central",
            lambda w, s, t: CentralFlow(opt, problem, w, s, t, config.central),
            rename={
                "loss_pred": "loss_pred",
                "grad_norm_pred": "grad_norm_pred",
                "n_crit": "n_crit",
                "X_trace": "X_trace",
                "sigma_pred": "sigma_pred",
            },
        ),
        FlowLane(
            "stable",
            lambda w, s, t: StableFlow(
                opt, problem, w, s, t, rtol=config.stable_rtol, atol=config.stable_atol
            ),
            measure_sharpness=True,
        ),
    )
    exp = Experiment(
        opt,
        problem,
        after_chunk=_expansion_recorder(problem, config) if config.check_expansion else None,
        steps=config.steps,
        flows=flows,
        start=config.restart_at,
        chunk=config.chunk,
        eig_every=config.eig_every,
        eos_frac=config.eos_frac,
        eos_delay=config.auto_delay,
        store=store,
        resume=resume,
        progress=progress,
        should_stop=should_stop,
    ).run()
    N, start = config.steps, exp.flow_start
    series = dict(exp.series.arrays())
    series["loss_discrete_window"] = centred_window(series["loss_discrete"], config.window)
    for key in (
        "loss_central", "loss_pred", "loss_stable", "sharpness_central", "sharpness_stable",
        "distance_central", "distance_stable", "n_crit", "grad_norm_pred", "grad_norm_stable",
        "sigma_pred", "sigma_meas", "X_trace", "distance_travelled", "expansion_error",
        "oscillation_rms",
    ):  # fmt: skip
        series.setdefault(key, np.full(N + 1, np.nan))
    summary = summarise(series, c, N, start, exp.eos_start, exp.restart_at, config)
    t = exp.timings
    central = exp.procs.get("central")
    timings = {
        "discrete_s": t.get("discrete_s", 0.0),
        "discrete_sharpness_s": t.get("sharpness_s", 0.0),
        "central_s": t.get("central_s", 0.0),
        "stable_s": t.get("stable_s", 0.0),
        "central_split": dict(central.timings) if central is not None else {},
        # the central flow's work (analyses, HVPs, contractions, refinements, ...) and the
        # Euler substeps per step it ended with (more than configured after a refinement)
        "central_counters": dict(central.counters) if central is not None else {},
        "central_substeps": int(central.S) if central is not None else None,
        "central_per_step_s": t.get("central_s", 0.0) / max(N - start, 1),
        "expansion_s": t.get("expansion_s", 0.0),
        "total_s": float(sum(t.values())),  # every process and measurement, resumes included
    }
    return ValidationResult(
        optimizer=opt.name,
        problem=problem.name,
        threshold=float(c),
        config=config,
        eos_start=exp.eos_start,
        restart_at=exp.restart_at,
        start=start,
        summary=summary,
        series=series,
        timings=timings,
        devices=exp.placement.describe(),
    )


def _expansion_recorder(problem: Problem, config: ValidateConfig):
    """``after_chunk`` for :class:`Experiment`: at the end of every chunk once the flows
    run, the relative error of the second-order average over the chunk's last
    ``EXPANSION_WINDOW`` discrete iterates (series ``expansion_error``, with the
    oscillation's size in ``oscillation_rms``)."""
    width = min(EXPANSION_WINDOW, config.chunk - config.chunk % 2)
    checker = ExpansionChecker(problem.loss) if width >= 2 else None

    def record(exp: Experiment, rows) -> None:
        d = rows["discrete"]
        if checker is None or not exp.procs or len(d.steps) < width:
            return
        tic = time.perf_counter()
        check = checker(np.asarray(d.w)[-width:])
        step = int(d.steps[-1])
        exp.series.put("expansion_error", step, check.relative)
        exp.series.put("oscillation_rms", step, check.rms)
        exp.timings["expansion_s"] = exp.timings.get("expansion_s", 0.0) + (
            time.perf_counter() - tic
        )

    return record


def summarise(series, c, N, start, eos_start, restart, config) -> dict:
    trav = series["distance_travelled"][N]
    cd = float(series["distance_central"][N] / trav) if trav > 0 else float("nan")
    sd = float(series["distance_stable"][N] / trav) if trav > 0 else float("nan")
    from_step = max(eos_start if eos_start is not None else N + 1, restart or 0, start)
    sel = np.arange(N + 1) >= from_step
    win = series["loss_discrete_window"]
    ok = sel & np.isfinite(win) & np.isfinite(series["loss_pred"])
    loss_err = (
        float(np.mean(np.abs(win[ok] - series["loss_pred"][ok]) / win[ok]))
        if ok.any()
        else float("nan")
    )
    sw = centred_window(interp_nan(series["sharpness_discrete"]), config.window)
    ok2 = sel & np.isfinite(sw)
    sharp_err = float(np.median(np.abs(sw[ok2] - c) / c)) if ok2.any() else float("nan")
    st_max = (
        float(np.nanmax(series["sharpness_stable"]))
        if np.isfinite(series["sharpness_stable"]).any()
        else float("nan")
    )
    exp_err = series["expansion_error"] if "expansion_error" in series else np.full(N + 1, np.nan)
    exp_err = exp_err[np.isfinite(exp_err)]
    if eos_start is None:
        verdict = "no-eos"
    elif cd <= PASS_CENTRAL and sd >= PASS_RATIO * cd and loss_err <= PASS_LOSS:
        verdict = "pass"
    else:
        verdict = "fail"
    return {
        "central_distance_rel": cd,
        "stable_distance_rel": sd,
        "loss_pred_rel_err": loss_err,
        "sharpness_rel_err": sharp_err,
        "stable_sharpness_max": st_max,
        "steps_compared": int(ok.sum()),
        "expansion_error_median": float(np.median(exp_err)) if exp_err.size else None,
        "expansion_error_max": float(np.max(exp_err)) if exp_err.size else None,
        "expansion_holds": bool(np.median(exp_err) <= EXPANSION_LIMIT) if exp_err.size else None,
        "verdict": verdict,
        "criteria": {
            "central_distance_rel_max": PASS_CENTRAL,
            "stable_over_central_min": PASS_RATIO,
            "loss_pred_rel_err_max": PASS_LOSS,
        },
    }
