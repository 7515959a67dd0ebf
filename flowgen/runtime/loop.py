"""The one process loop: the discrete optimizer and its flows, in lockstep, recorded and resumable.

Every command that simulates (``run``, ``validate``, ``explain``, ``sweep``) is
the same experiment: the discrete optimizer runs from step 0; one or more flows
(stable, central, stationary, …) start from the discrete iterate and state at a
step ``S`` and run alongside it to step ``N``. :class:`Experiment` does that once,
for every command:

* **one time convention** — a process at time ``t`` holds its value after ``t``
  steps (one unit of flow time = one step); the step counter its update reads is
  ``t + 1``; a chunk of ``K`` steps yields the values at ``t+1 … t+K``;
* **one recorder** — :class:`~flowgen.runtime.series.Series` on ``0 … N``;
* **one progress type** — ``progress(phase, done, total)``;
* **one checkpoint** — after every chunk, atomically
  (:class:`~flowgen.runtime.checkpoint.CheckpointStore`); ``resume=True``
  continues from the last complete chunk, and the result equals an
  uninterrupted run's;
* **one way to stop** — ``should_stop()`` is polled after each checkpoint
  (the CLI sets it on SIGINT) and raises :class:`Interrupted`.

The start ``S`` is a step, or ``"auto"``: ``eos_delay`` steps after the discrete
effective sharpness first reaches ``eos_frac·c`` from below (``eos_start``).
When ``"auto"`` finds no edge of stability by step ``N``, the flows are run from
the common start instead (a second pass, recorded as ``restart_at = None``).

Series recorded (names are part of the output interface):

* ``loss_discrete``, ``grad_norm_discrete``, ``sharpness_discrete`` (every
  ``eig_every`` steps), ``hmean_discrete`` (harmonic mean of the effective step
  sizes, ``n / Σ 1/p_i``);
* per flow ``F``: what its chunks report, renamed by the lane (``loss_F``,
  ``grad_norm_F``, …), ``sharpness_F`` (measured here unless the flow reports
  it), ``distance_F = ‖w_disc − w_F‖``;
* ``distance_travelled = ‖w_disc − w_disc(S)‖`` from ``S`` on.

A lane may start from another lane instead of the discrete run
(``FlowLane(source="central")``, e.g. the stationary flows, which start from the
central flow's ``w̄``) and at its own step (``FlowLane(start=T)``, default: when
its source starts). It then also records ``distance_travelled_<name>`` (the
discrete run's distance from its own start) and, for every lane named in
``compare``, ``distance_<name>_<other> = ‖w_name − w_other‖``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import FlowgenError, UsageError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime.checkpoint import CheckpointStore
from flowgen.runtime.devices import Placement
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter
from flowgen.runtime.series import Series

__all__ = [
    "Experiment",
    "FlowLane",
    "Interrupted",
    "Progress",
    "Rows",
    "first_crossing",
    "default_start",
    "no_progress",
]

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: one call per chunk (``phase`` names what runs)."""


def no_progress(phase: str, done: int, total: int) -> None:
    return None


class Interrupted(FlowgenError):
    """The run was asked to stop (SIGINT); its checkpoint is complete and resumable."""

    kind = "interrupted"
    exit_code = 130

    def __init__(self, step: int, directory=None):
        where = f" in {directory}" if directory else ""
        super().__init__(
            f"stopped at step {step}; the checkpoint{where} is complete",
            hint="rerun the same command with --resume to continue",
        )
        self.step = step


class Process(Protocol):
    """What the loop needs of a process (discrete optimizer or flow)."""

    t: int | float
    w: jax.Array
    state: dict

    def advance(self, K: int) -> Any: ...
    def snapshot(self) -> dict[str, np.ndarray]: ...
    def restore(self, snap: dict[str, np.ndarray]) -> None: ...


@dataclass
class Rows:
    """One chunk of a process, in the loop's terms: values at ``steps``."""

    steps: np.ndarray  # (K,) integer times
    w: jax.Array  # (K, n)
    states: dict  # name -> (K, ...)
    series: dict[str, np.ndarray]  # name -> (K,) scalars the process reports
    extra: dict = field(default_factory=dict)  # per-row arrays (e.g. central: q1, p)


def rows_of(chunk, t0: int) -> Rows:
    """Normalise a process chunk (the loop's adapter to each process's chunk type)."""
    if hasattr(chunk, "steps") and hasattr(chunk, "series"):
        extra = {k: getattr(chunk, k) for k in ("q1", "p", "X") if hasattr(chunk, k)}
        return Rows(np.asarray(chunk.steps, int), chunk.w, chunk.states, chunk.series, extra)
    K = int(np.asarray(chunk.loss).shape[0])
    if hasattr(chunk, "loss_pred"):  # CentralChunk: records at t0 .. t0+K-1
        steps = t0 + np.arange(K)
        series = {
            "loss": chunk.loss,
            "loss_pred": chunk.loss_pred,
            "grad_norm": chunk.grad_norm,
            "grad_norm_pred": chunk.grad_norm_pred,
            "sharpness": chunk.sharpness,
            "n_crit": chunk.n_crit,
            "X_trace": np.array([float(np.trace(x)) if x.size else 0.0 for x in chunk.X]),
            "sigma_pred": np.array([float(x[0, 0]) if x.size else np.nan for x in chunk.X]),
        }
        q1 = np.stack(
            [q[:, 0] if q.shape[1] else np.zeros(q.shape[0]) for q in chunk.Q_crit]
        )  # (K, n)
        extra = {"q1": q1, "p": np.stack(chunk.p), "X": chunk.X}
        return Rows(steps, chunk.w, chunk.states, series, extra)
    steps = t0 + 1 + np.arange(K)
    return Rows(steps, chunk.w, chunk.states, {"loss": chunk.loss, "grad_norm": chunk.grad_norm})


def _dist(a, b) -> float:
    """‖a − b‖ on the host (an eager jnp op would compile)."""
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


def first_crossing(sharp: np.ndarray, level: float, warm_up: bool = True) -> int | None:
    """First step at which the sharpness reaches ``level`` from below.

    Adaptive optimizers start with a preconditioner state near 0 (``v = 0``),
    so their effective sharpness is huge for the first steps; that warm-up is
    not the edge of stability, which is reached by progressive sharpening
    (``warm_up=True``). An optimizer without state has no warm-up
    (``warm_up=False``): if it starts at or above ``level`` and no later
    measurement falls below it (e.g. GD on a wide network with
    ``λ_max(H(w₀))·η > 2``, which catapults and sharpens straight back to the
    edge) the edge starts at step 0. If a measurement falls below, the start
    was a catapult that left the edge, and the edge is where the sharpness
    comes back (the 2,372-parameter Mamba under GD: 2.41 at step 0, 1.45 at step
    10, back at the level at step 240). The answer can therefore move from 0
    to a later step as measurements arrive, never the other way."""
    below = np.isfinite(sharp) & (sharp < level)
    if not warm_up and len(sharp) and np.isfinite(sharp[0]) and sharp[0] >= level:
        if not below.any():
            return 0
    if not below.any():
        return None
    first_below = int(np.argmax(below))
    above = np.nonzero((np.arange(len(sharp)) > first_below) & (sharp >= level))[0]
    return int(above[0]) if len(above) else None


def default_start(opt: Optimizer) -> int:
    """Flows start after the first discrete step when the optimizer has state:
    states initialised at zero make the first step's rate singular (e.g. p = lr/eps)."""
    return 1 if opt.state_names else 0


FlowFactory = Callable[[jax.Array, dict, int], Process]


@dataclass(frozen=True)
class FlowLane:
    """A flow in the experiment.

    Attributes:
      name: the lane's name; series are suffixed with it (``loss_<name>``).
      make: ``make(w, state, t)`` builds the process at its start.
      rename: chunk series key → recorded series name (default ``<key>_<name>``).
      measure_sharpness: measure ``λ_max(P⁻¹H)`` here every ``eig_every`` steps
        (False when the process reports ``sharpness`` itself).
      label: phase label for progress and timings.
      source: the process it starts from: ``"discrete"`` or another lane's name.
      start: the step it starts at (None: when its source starts, or at the flows' start).
      compare: lanes whose distance to this one is recorded (``distance_<name>_<other>``).
    """

    name: str
    make: FlowFactory
    rename: dict = field(default_factory=dict)
    measure_sharpness: bool = False
    label: str = ""
    source: str = "discrete"
    start: int | None = None
    compare: tuple[str, ...] = ()


def _tree_rows(tree, j):
    return jax.tree_util.tree_map(lambda a: a[j], tree)


def _flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    return {prefix + k: np.asarray(v) for k, v in tree.items()}


def _unflatten(prefix: str, arrays: dict) -> dict:
    return {k[len(prefix) :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}


def _sub(prefix: str, arrays: dict) -> dict:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _snap(proc) -> dict[str, np.ndarray]:
    """A process's snapshot (interim fallback for processes without ``snapshot``)."""
    if hasattr(proc, "snapshot"):
        return proc.snapshot()
    out = {"w": np.asarray(proc.w), "t": np.asarray(proc.t)}
    out.update({f"state/{k}": np.asarray(v) for k, v in proc.state.items()})
    eig = getattr(proc, "eig", None)
    if eig is not None:
        out["eig/vals"], out["eig/vecs"] = np.asarray(eig.vals), np.asarray(eig.vecs)
    if hasattr(proc, "_key"):
        out["key"] = np.asarray(proc._key)
    return out


def _restore(proc, snap: dict[str, np.ndarray]) -> None:
    if hasattr(proc, "restore"):
        proc.restore(snap)
        return
    from flowgen.runtime.eigen import EigState

    proc.w = jnp.asarray(snap["w"])
    proc.t = type(proc.t)(snap["t"])
    proc.state = {k[6:]: jnp.asarray(v) for k, v in snap.items() if k.startswith("state/")}
    if "eig/vecs" in snap:
        proc.eig = EigState(jnp.asarray(snap["eig/vals"]), jnp.asarray(snap["eig/vecs"]))
    if "key" in snap:
        proc._key = jnp.asarray(snap["key"])


class Experiment:
    """The discrete optimizer from step 0 and flows from step ``start``, in lockstep.

    Args:
      opt, problem: what runs.
      steps: ``N``, the last step.
      flows: the flow lanes (may be empty: a discrete run alone).
      start: ``None`` (the common start, :func:`default_start`), a step, or ``"auto"``.
      chunk: steps per chunk (progress and checkpoint granularity).
      eig_every: discrete (and measured flows') effective sharpness every K steps.
      eos_frac, eos_delay: the edge of stability and the ``"auto"`` restart.
      hmean: record the harmonic mean of the discrete effective step sizes.
      store: a :class:`CheckpointStore` (checkpoint after every chunk) or None.
      resume: continue from ``store``'s checkpoint.
      progress: ``progress(phase, done, total)``.
      should_stop: polled after every checkpoint; True raises :class:`Interrupted`.
      after_chunk: ``after_chunk(experiment, rows_by_lane)`` — extra recording.
    """

    @in_float64
    def __init__(
        self,
        opt: Optimizer,
        problem: Problem,
        *,
        steps: int,
        flows: tuple[FlowLane, ...] = (),
        start: int | str | None = None,
        chunk: int = 25,
        eig_every: int = 1,
        eos_frac: float = 0.95,
        eos_delay: int = 100,
        hmean: bool = True,
        store: CheckpointStore | None = None,
        resume: bool = False,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
        after_chunk: Callable[[Experiment, dict[str, Rows]], None] | None = None,
    ):
        if steps < 1 or chunk < 1 or eig_every < 1:
            raise UsageError("steps, chunk and eig_every must be positive integers")
        self.opt, self.problem = opt, problem
        self.N, self.chunk, self.eig_every = int(steps), int(chunk), int(eig_every)
        self.flows = {lane.name: lane for lane in flows}
        for lane in flows:
            if lane.source != "discrete" and lane.source not in self.flows:
                raise UsageError(f"flow `{lane.name}` starts from `{lane.source}`, not a flow here")
            if lane.start is not None and lane.start >= steps:
                raise UsageError(
                    f"flow `{lane.name}` would start at step {lane.start}, at or after the last "
                    f"step {steps}"
                )
        self.mode = "auto" if start == "auto" else ("common" if start is None else "fixed")
        self.eos_frac, self.eos_delay = float(eos_frac), int(eos_delay)
        self.hmean = hmean and opt.has_precond  # no effective step: no harmonic mean
        self.store, self.resume = store, resume
        self.progress = progress or no_progress
        self.should_stop = should_stop or (lambda: False)
        self.after_chunk = after_chunk
        self.threshold = opt.threshold
        self.warm_up = bool(opt.state_names)  # states from 0: the first steps are a warm-up
        self.timings: dict[str, float] = {}
        self.placement = Placement.for_size(problem.n)
        if self.mode == "fixed":
            self.fixed_start = int(start)
            if self.fixed_start < 0:
                raise UsageError(f"the flows cannot start at a negative step ({start})")
            self._check_start(self.fixed_start)
        self._hm = jax.jit(
            jax.vmap(lambda w, s, t: w.shape[0] / jnp.sum(1.0 / opt.effective_step(w, s, t)))
        )
        self._reset(pass_=1)

    # ------------------------------------------------------------------ setup

    def _check_start(self, start: int) -> None:
        if start >= self.N:
            raise UsageError(
                f"the flows would start at step {start}, at or after the last step {self.N}",
                hint="run more --steps (≥ 400 after the restart is recommended) or restart earlier",
            )

    def _reset(self, pass_: int) -> None:
        self.pass_ = pass_
        self.t = 0
        self.series = Series(self.N)
        self.eos_start: int | None = None
        if pass_ == 2 or self.mode == "common":
            self.start: int | None = default_start(self.opt)
            self.restart_at = None
        elif self.mode == "fixed":
            self.start, self.restart_at = self.fixed_start, self.fixed_start
        else:
            self.start = self.restart_at = None
        self.discrete = DiscreteProcess(
            self.opt, self.problem, self.placement.vector(self.problem.w0)
        )
        self.procs: dict[str, Process] = {}
        self.meters = {"discrete": SharpnessMeter(self.opt, self.problem)}
        for name, lane in self.flows.items():
            if lane.measure_sharpness:
                self.meters[name] = SharpnessMeter(self.opt, self.problem)
        self.w_start = None
        self.s_start = None
        self.lane_starts: dict[str, int] = {}  # lanes started, with their start step
        self.lane_w0: dict[str, tuple] = {}  # lanes started: (w, state) they started from
        self.lane_wdisc: dict[str, jax.Array] = {}  # lanes started: the discrete w there
        L0, gnorm0 = jax.device_get(self.discrete.measure(self.discrete.w))
        self.series.put("loss_discrete", 0, float(L0))
        self.series.put("grad_norm_discrete", 0, float(gnorm0))
        if self.hmean:
            s0 = jax.tree_util.tree_map(lambda a: a[None], self.discrete.state)
            self.series.put(
                "hmean_discrete", 0, float(self._hm(self.problem.w0[None], s0, jnp.ones(1))[0])
            )

    # -------------------------------------------------------------- checkpoint

    def _save(self) -> None:
        if self.store is None:
            return
        state = {
            "t": self.t,
            "pass": self.pass_,
            "start": self.start,
            "restart_at": self.restart_at,
            "eos_start": self.eos_start,
            "lanes": sorted(self.procs),
            "lane_starts": self.lane_starts,
            "timings": self.timings,
        }
        arrays = self.series.snapshot()
        arrays.update(_flatten("discrete/", self.discrete.snapshot()))
        for name, proc in self.procs.items():
            arrays.update(_flatten(f"lane/{name}/", _snap(proc)))
        for name, meter in self.meters.items():
            arrays.update(_flatten(f"meter/{name}/", meter.snapshot()))
        if self.w_start is not None:
            arrays["start/w"] = np.asarray(self.w_start)
            arrays.update(_flatten("start/state/", self.s_start))
        for name, (w0, s0) in self.lane_w0.items():
            arrays[f"lanestart/{name}/w"] = np.asarray(w0)
            arrays[f"lanestart/{name}/wdisc"] = np.asarray(self.lane_wdisc[name])
            arrays.update(_flatten(f"lanestart/{name}/state/", s0))
        self.store.save(state, arrays)

    def _load(self) -> None:
        state, arrays = self.store.load()
        n = self.problem.n
        arrays = {  # parameter-sized arrays back on the run's devices
            k: self.placement.like(v) if v.ndim >= 1 and v.shape[0] == n else v
            for k, v in arrays.items()
            if not k.startswith("series/")
        } | {k: v for k, v in arrays.items() if k.startswith("series/")}
        self._reset(pass_=int(state["pass"]))
        self.t = int(state["t"])
        self.start, self.restart_at = state["start"], state["restart_at"]
        self.eos_start = state["eos_start"]
        self.timings = dict(state.get("timings", {}))
        self.series = Series.restore(self.N, arrays)
        self.discrete.restore(_sub("discrete/", arrays))
        for name, meter in self.meters.items():
            meter.restore(_sub(f"meter/{name}/", arrays))
        if "start/w" in arrays:
            self.w_start = jnp.asarray(arrays["start/w"])
            self.s_start = _unflatten("start/state/", arrays)
        starts = {k: int(v) for k, v in state.get("lane_starts", {}).items()}
        for name in state["lanes"]:
            if name not in self.flows:
                raise UsageError(f"--resume: the checkpoint has a flow `{name}` this run does not")
            if f"lanestart/{name}/w" in arrays:
                w0 = jnp.asarray(arrays[f"lanestart/{name}/w"])
                s0 = _unflatten(f"lanestart/{name}/state/", arrays)
                self.lane_wdisc[name] = jnp.asarray(arrays[f"lanestart/{name}/wdisc"])
            else:  # a checkpoint from before lanes had their own start
                w0, s0 = self.w_start, self.s_start
                self.lane_wdisc[name] = self.w_start
            at = starts.get(name, int(self.start))
            proc = self.flows[name].make(w0, s0, at)
            _restore(proc, _sub(f"lane/{name}/", arrays))
            self.procs[name] = proc
            self.lane_starts[name] = at
            self.lane_w0[name] = (w0, s0)

    # -------------------------------------------------------------------- run

    def _tick(self, key: str, tic: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - tic

    def _lane_start(self, name: str) -> int | None:
        """The step lane ``name`` starts at (None: not known yet)."""
        lane = self.flows[name]
        if lane.start is not None:
            return lane.start
        if lane.source == "discrete":
            return self.start
        return self.lane_starts.get(lane.source)

    def _start_due(self) -> None:
        """Start the flows due at ``self.t``: from the discrete iterate and state (the
        flows' start ``S``), or from their source lane's current values."""
        if self.t >= self.N or self.start is None:
            return
        if self.start == self.t and self.w_start is None:
            self.w_start, self.s_start = self.discrete.w, dict(self.discrete.state)
            self.series.put("distance_travelled", self.t, 0.0)
        started = True
        while started:  # a lane may start from a lane started just now
            started = False
            for name, lane in self.flows.items():
                if name in self.procs or self._lane_start(name) != self.t:
                    continue
                if self.t < self.start:
                    raise UsageError(
                        f"flow `{name}` would start at step {self.t}, before the flows' start "
                        f"{self.start}"
                    )
                if lane.source == "discrete":
                    w0, s0 = self.discrete.w, dict(self.discrete.state)
                elif lane.source in self.procs:
                    src = self.procs[lane.source]
                    w0, s0 = src.w, dict(src.state)
                else:
                    continue
                tic = time.perf_counter()
                self.procs[name] = lane.make(w0, s0, self.t)
                self._tick(f"{name}_s", tic)
                self.lane_starts[name] = self.t
                self.lane_w0[name] = (w0, s0)
                self.lane_wdisc[name] = self.discrete.w
                started = True
                gap = _dist(w0, self.discrete.w)
                loss0 = (
                    self.series["loss_discrete"][self.t]
                    if lane.source == "discrete"
                    else float(self.problem.loss(w0))
                )
                self.series.put(f"distance_{name}", self.t, gap)
                self.series.put(f"loss_{name}", self.t, loss0)
                proc = self.procs[name]
                if hasattr(proc, "observe"):  # the flow's own record at its start
                    tic = time.perf_counter()
                    r = rows_of(proc.observe(), self.t)
                    self._record_lane(name, r, self.discrete.w[None], self.t, {})
                    self._tick(f"{name}_s", tic)
                if self.t != self.start:
                    self.series.put(f"distance_travelled_{name}", self.t, 0.0)
        for name, lane in self.flows.items():  # the lanes a new lane compares with, at its start
            for other in lane.compare:
                if name in self.procs and other in self.procs and self.lane_starts[name] == self.t:
                    d = _dist(self.procs[name].w, self.procs[other].w)
                    self.series.put(f"distance_{name}_{other}", self.t, d)

    def _next_chunk(self) -> int:
        K = min(self.chunk, self.N - self.t)
        if self.start is not None and self.start > self.t:
            K = min(K, self.start - self.t)
        for name in self.flows:  # stop where a lane starts
            at = self._lane_start(name)
            if name not in self.procs and at is not None and at > self.t:
                K = min(K, at - self.t)
        if self.mode == "auto" and self.start is None and self.pass_ == 1:
            K = min(K, max(self.eos_delay, 1))  # never step past a restart found in this chunk
        return K

    @in_float64
    def run(self) -> Experiment:
        """Advance everything to step ``N`` (or resume and finish); returns ``self``."""
        if self.resume and self.store is not None and self.store.exists():
            self._load()
        elif self.resume:
            self.store.load()  # raises the "no checkpoint" error
        while True:
            self._measure_start()
            self._start_due()
            while self.t < self.N:
                self._step(self._next_chunk())
                self._start_due()
                self._save()
                if self.should_stop():
                    raise Interrupted(self.t, self.store.directory if self.store else None)
            if self.mode == "auto" and self.pass_ == 1 and self.start is None and self.flows:
                self._reset(pass_=2)  # no edge of stability: the flows from the common start
                continue
            self._finish()
            return self

    def _measure_start(self) -> None:
        """The discrete sharpness at step 0, for an optimizer without state (with states
        at 0 the preconditioner can be singular there): a run that sharpens past
        ``eos_frac·c`` before its first ``eig_every``-th step still has a measurement
        below the level, and one that starts above it is at the edge from step 0."""
        if self.t != 0 or self.warm_up or np.isfinite(self.series["sharpness_discrete"][0]):
            return
        val = self.meters["discrete"](self.discrete.w, self.discrete.state, 1.0)
        self.series.put("sharpness_discrete", 0, val)

    def _finish(self) -> None:
        """Values at ``N`` of flows whose chunks record at the start of each unit."""
        for name, proc in self.procs.items():
            key = f"distance_{name}"
            if not np.isfinite(self.series[key][self.N]):
                self.series.put(key, self.N, _dist(self.discrete.w, proc.w))
            for other in self.flows[name].compare:
                key = f"distance_{name}_{other}"
                if other in self.procs and not np.isfinite(self.series[key][self.N]):
                    d = _dist(self.procs[other].w, proc.w)
                    self.series.put(key, self.N, d)

    def _step(self, K: int) -> None:
        t0, N = self.t, self.N
        phase = "discrete" if not self.procs else "flows"
        rows: dict[str, Rows] = {}
        w_before = {"discrete": self.discrete.w}
        tic = time.perf_counter()
        rows["discrete"] = rows_of(self.discrete.advance(K), t0)
        self._tick("discrete_s", tic)
        for name, proc in self.procs.items():
            w_before[name] = proc.w
            tic = time.perf_counter()
            rows[name] = rows_of(proc.advance(K), t0)
            self._tick(f"{name}_s", tic)
        self.t = t0 + K
        self._record(rows, w_before, t0)
        if self.after_chunk is not None:
            self.after_chunk(self, rows)
        if self.mode == "auto" and self.pass_ == 1 and not self.procs:
            # until the flows start, the edge may still move (a catapult at step 0)
            c = self.threshold
            eos = first_crossing(
                self.series["sharpness_discrete"][: self.t + 1], self.eos_frac * c, self.warm_up
            )
            self.eos_start = eos
            self.start = self.restart_at = None if eos is None else eos + self.eos_delay
            if eos is not None:
                self._check_start(self.start)
        elif self.eos_start in (None, 0) and self.threshold is not None:
            self.eos_start = first_crossing(
                self.series["sharpness_discrete"][: self.t + 1],
                self.eos_frac * self.threshold,
                self.warm_up,
            )
        done, total = (self.t, N) if phase == "discrete" else (self.t - self.start, N - self.start)
        self.progress(phase, done, total)

    def _record(self, rows: dict[str, Rows], w_before: dict, t0: int) -> None:
        ser, N = self.series, self.N
        d = rows["discrete"]
        ser.put("loss_discrete", d.steps, d.series["loss"])
        ser.put("grad_norm_discrete", d.steps, d.series["grad_norm"])
        if self.hmean:
            ser.put(
                "hmean_discrete",
                d.steps,
                np.asarray(self._hm(d.w, d.states, jnp.asarray(d.steps + 1.0))),
            )
        # the discrete iterate at t0 .. t0+K (a flow's rows may include t0)
        # (host arrays below: eager jnp ops would compile once per chunk shape)
        W = np.concatenate([np.asarray(w_before["discrete"])[None], np.asarray(d.w)])  # (K+1, n)
        # sharpness, every eig_every steps (and at N)
        tic = time.perf_counter()
        for name, meter in self.meters.items():
            r = d if name == "discrete" else rows.get(name)
            if r is None:
                continue
            for j, step in enumerate(r.steps):
                if step % self.eig_every == 0 or step == N:
                    val = meter(r.w[j], _tree_rows(r.states, j), float(step + 1))
                    ser.put(f"sharpness_{name}", step, val)
        self._tick("sharpness_s", tic)
        if self.w_start is not None:
            ser.put(
                "distance_travelled",
                d.steps,
                np.linalg.norm(W[1:] - np.asarray(self.w_start)[None], axis=1),
            )
        for name, at in self.lane_starts.items():
            if at != self.start:
                ser.put(
                    f"distance_travelled_{name}",
                    d.steps,
                    np.linalg.norm(W[1:] - np.asarray(self.lane_wdisc[name])[None], axis=1),
                )
        full = self._full_rows(rows, w_before, t0)
        for name, r in rows.items():
            if name != "discrete":
                self._record_lane(name, r, W, t0, full)

    def _record_lane(self, name: str, r: Rows, W, t0: int, full: dict) -> None:
        """A flow's rows: its series, its distance to the discrete iterate ``W[step - t0]``
        and to the lanes it compares with (``full``), and, for the central flow, Σ
        measured along its top critical direction."""
        ser, lane = self.series, self.flows[name]
        for key, vals in r.series.items():
            ser.put(lane.rename.get(key, f"{key}_{name}"), r.steps, vals)
        Wd = W[r.steps - t0]
        rw = np.asarray(r.w)
        ser.put(f"distance_{name}", r.steps, np.linalg.norm(Wd - rw, axis=1))
        for other in lane.compare:
            if other in full:
                Wo = full[other][r.steps - t0]
                ok = np.all(np.isfinite(Wo), axis=1)
                gap = np.where(ok[:, None], Wo - rw, 0.0)  # NaN rows: lanes not started
                dist = np.where(ok, np.linalg.norm(gap, axis=1), np.nan)
                ser.put(f"distance_{name}_{other}", r.steps[ok], dist[ok])
        if "q1" in r.extra and "sigma_pred" in r.series:
            # Σ measured along the top critical direction: ⟨δ, u₁⟩² in P's metric
            delta = (Wd - rw) / np.sqrt(np.asarray(r.extra["p"]))
            meas = np.sum(delta * np.asarray(r.extra["q1"]), axis=1) ** 2
            meas = np.where(np.isfinite(r.series["sigma_pred"]), meas, np.nan)
            ser.put("sigma_meas", r.steps, meas)

    def _full_rows(self, rows: dict[str, Rows], w_before: dict, t0: int) -> dict:
        """Each process's iterate at ``t0 … t0+K`` as a ``(K+1, n)`` array (NaN rows
        where a lane has no value: before it started)."""
        K = self.t - t0
        out = {}
        for name, r in rows.items():
            if name == "discrete":
                continue
            W = np.full((K + 1, r.w.shape[1]), np.nan)
            if name in w_before:
                W[0] = np.asarray(w_before[name])
            W[r.steps - t0] = np.asarray(r.w)
            W[K] = np.asarray(self.procs[name].w)
            out[name] = W
        return out

    # ------------------------------------------------------------- reporting

    @property
    def flow_start(self) -> int:
        return int(self.start) if self.start is not None else default_start(self.opt)
