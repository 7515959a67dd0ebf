"""``flowgen validate``: the central flow against the discrete optimizer
(``central-flows.md`` §5).

The discrete optimizer runs first (its iterates and states are kept, and its
effective sharpness measured every ``eig_every`` steps), which fixes the edge
of stability (``eos_start``: first step with sharpness ≥ 0.95·c) and, with
``restart_at="auto"``, the restart point (``eos_start + 100``). The central
and the stable flow then start from the discrete iterate and state there (or
from the common start) and are compared with it step by step.

Summary (``report.json``):

* ``eos_start``: the first step at which the discrete effective sharpness
  reaches ``0.95·c`` from below (an adaptive optimizer's warm-up, when its
  preconditioner state is still near 0, does not count);
* ``*_distance_rel = ‖w_disc − w_flow‖ / ‖w_disc − w_start‖`` at the last step;
* ``loss_pred_rel_err``: mean over steps after ``max(eos_start, restart_at)``
  of |21-step centred window of the discrete loss − predicted loss| / window;
* ``sharpness_rel_err``: median |windowed discrete sharpness − c| / c there;
* verdict ``pass`` iff central ≤ 0.10, stable ≥ 3 × central and loss ≤ 0.10;
  ``no-eos`` when the discrete run never reached the edge.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import UsageError
from flowgen.precision import in_float64
from flowgen.runtime.central import CentralConfig, CentralFlow
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.problems import Problem
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter, StableFlow
from flowgen.runtime.run import default_start

PASS_CENTRAL = 0.10  # central_distance_rel at most this
PASS_RATIO = 3.0  # stable_distance_rel at least this multiple of central
PASS_LOSS = 0.10  # loss_pred_rel_err at most this


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

    def to_json(self) -> dict:
        def clean(v):
            return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, float)]

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
            "series": {k: clean(v) for k, v in self.series.items()},
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


def first_crossing(sharp: np.ndarray, level: float) -> int | None:
    """First step at which the sharpness reaches ``level`` from below.

    Adaptive optimizers start with a preconditioner state near 0 (``v = 0``),
    so their effective sharpness is huge for the first steps; that warm-up is
    not the edge of stability, which is reached by progressive sharpening."""
    below = np.isfinite(sharp) & (sharp < level)
    if not below.any():
        return None
    first_below = int(np.argmax(below))
    above = np.nonzero((np.arange(len(sharp)) > first_below) & (sharp >= level))[0]
    return int(above[0]) if len(above) else None


@in_float64
def validate(
    opt: Optimizer,
    problem: Problem,
    config: ValidateConfig = ValidateConfig(),
    progress: Callable[[str, int, int], None] | None = None,
) -> ValidationResult:
    N = config.steps
    c = opt.threshold
    if c is None:
        raise UsageError(f"{opt.name} has no stability threshold, so nothing to validate against")
    prog = progress or (lambda *a: None)
    timings = {}

    # 1. the discrete run, kept whole
    tic = time.perf_counter()
    disc = DiscreteProcess(opt, problem, problem.w0)
    W = np.zeros((N + 1, problem.n))
    W[0] = np.asarray(problem.w0)
    loss_d = np.full(N + 1, np.nan)
    gn_d = np.full(N + 1, np.nan)
    loss_d[0] = float(problem.loss(problem.w0))
    gn_d[0] = float(jnp.linalg.norm(jax.grad(problem.loss)(problem.w0)))
    state_traj = {}
    t = 0
    while t < N:
        K = min(config.chunk, N - t)
        ch = disc.advance(K)
        W[t + 1 : t + K + 1] = np.asarray(ch.w)
        loss_d[t + 1 : t + K + 1] = ch.loss
        gn_d[t + 1 : t + K + 1] = ch.grad_norm
        for name, arr in ch.states.items():
            state_traj.setdefault(name, []).append(np.asarray(arr))
        t += K
        prog("discrete", t, N)
    state_traj = {k: np.concatenate(v) for k, v in state_traj.items()}
    init_state = {k: np.asarray(v) for k, v in opt.init(jnp.asarray(problem.w0)).items()}

    def state_at(step):
        if step == 0:
            return {k: jnp.asarray(v) for k, v in init_state.items()}
        return {k: jnp.asarray(v[step - 1]) for k, v in state_traj.items()}

    timings["discrete_s"] = time.perf_counter() - tic

    tic = time.perf_counter()
    meter = SharpnessMeter(opt, problem)
    sharp_d = np.full(N + 1, np.nan)
    first = max(1, default_start(opt))
    for step in range(first, N + 1):
        if step % config.eig_every == 0 or step == N:
            sharp_d[step] = meter(jnp.asarray(W[step]), state_at(step), float(step))
        if step % config.chunk == 0:
            prog("sharpness", step, N)
    timings["discrete_sharpness_s"] = time.perf_counter() - tic
    eos_start = first_crossing(sharp_d, config.eos_frac * c)

    # 2. where the flows start
    if config.restart_at is None:
        start, restart = default_start(opt), None
    elif config.restart_at == "auto":
        if eos_start is None:
            start, restart = default_start(opt), None
        else:
            restart = eos_start + config.auto_delay
            start = restart
    else:
        restart = int(config.restart_at)
        start = restart
    if start >= N:
        raise UsageError(
            f"the flows would start at step {start}, at or after the last step {N}",
            hint="run more --steps (≥ 400 after the restart is recommended) or restart earlier",
        )

    # 3. the two flows from there, in lockstep
    w0, s0 = jnp.asarray(W[start]), state_at(start)
    central = CentralFlow(opt, problem, w0, s0, start, config.central)
    stable = StableFlow(opt, problem, w0, s0, start)
    smeter = SharpnessMeter(opt, problem)
    nan = lambda: np.full(N + 1, np.nan)  # noqa: E731
    ser = {
        k: nan()
        for k in (
            "loss_central",
            "loss_pred",
            "loss_stable",
            "sharpness_central",
            "sharpness_stable",
            "distance_central",
            "distance_stable",
            "n_crit",
            "grad_norm_pred",
            "grad_norm_stable",
            "sigma_pred",
            "sigma_meas",
            "X_trace",
        )
    }

    def record_central(cc):  # a CentralChunk: values at the integer times cc.steps
        idx_c = cc.steps
        ser["loss_central"][idx_c] = cc.series["loss"]
        ser["loss_pred"][idx_c] = cc.series["loss_pred"]
        ser["sharpness_central"][idx_c] = cc.series["sharpness"]
        ser["n_crit"][idx_c] = cc.series["n_crit"]
        ser["grad_norm_pred"][idx_c] = cc.series["grad_norm_pred"]
        ser["X_trace"][idx_c] = cc.series["X_trace"]
        ser["sigma_pred"][idx_c] = cc.series["sigma_pred"]
        wc = np.asarray(cc.w)
        ser["distance_central"][idx_c] = np.linalg.norm(W[idx_c] - wc, axis=1)
        for j, step in enumerate(idx_c):
            if cc.X[j].shape[0]:
                delta = (W[step] - wc[j]) / np.sqrt(cc.p[j])
                ser["sigma_meas"][step] = float(np.dot(cc.q1[j], delta) ** 2)

    t_c = t_s = 0.0
    tic = time.perf_counter()
    record_central(central.observe())  # the record at the start
    t_c += time.perf_counter() - tic
    t = start
    while t < N:
        K = min(config.chunk, N - t)
        tic = time.perf_counter()
        cc = central.advance(K)  # values at t+1 .. t+K
        t_c += time.perf_counter() - tic
        record_central(cc)
        tic = time.perf_counter()
        sc = stable.advance(K)  # values at t+1 .. t+K
        t_s += time.perf_counter() - tic
        idx_s = np.arange(t + 1, t + K + 1)
        ser["loss_stable"][idx_s] = sc.loss
        ser["grad_norm_stable"][idx_s] = sc.grad_norm
        ws = np.asarray(sc.w)
        ser["distance_stable"][idx_s] = np.linalg.norm(W[idx_s] - ws, axis=1)
        tic = time.perf_counter()
        for j, step in enumerate(idx_s):
            if step % config.eig_every == 0 or step == N:
                st = jax.tree_util.tree_map(lambda a, j=j: a[j], sc.states)
                ser["sharpness_stable"][step] = smeter(sc.w[j], st, float(step))
        t_s += time.perf_counter() - tic
        t += K
        prog("flows", t - start, N - start)
    ser["distance_central"][start] = ser["distance_stable"][start] = 0.0
    timings.update(
        central_s=t_c,
        stable_s=t_s,
        central_split=dict(central.timings),
        central_per_step_s=t_c / max(N - start, 1),
    )

    travelled = np.linalg.norm(W - W[start], axis=1)
    series = {
        "step": np.arange(N + 1, dtype=float),
        "loss_discrete": loss_d,
        "loss_discrete_window": centred_window(loss_d, config.window),
        "grad_norm_discrete": gn_d,
        "sharpness_discrete": sharp_d,
        "distance_travelled": travelled,
        **ser,
    }
    summary = summarise(series, c, N, start, eos_start, restart, config)
    return ValidationResult(
        optimizer=opt.name,
        problem=problem.name,
        threshold=float(c),
        config=config,
        eos_start=eos_start,
        restart_at=restart,
        start=start,
        summary=summary,
        series=series,
        timings=timings,
    )


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
        "verdict": verdict,
        "criteria": {
            "central_distance_rel_max": PASS_CENTRAL,
            "stable_over_central_min": PASS_RATIO,
            "loss_pred_rel_err_max": PASS_LOSS,
        },
    }
