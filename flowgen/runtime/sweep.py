"""``flowgen sweep``: every combination of optimizer files and hyperparameter values, side by side.

A sweep is files × values: ``--set lr=1e-4,2e-4,5e-4 --set beta2=0.99`` sweeps ``lr``
over three values at ``beta2 = 0.99`` (several multi-valued names: their Cartesian
product). For each run it measures, on the discrete optimizer, every step ``t``:

* ``loss``: ``L(w_t)``;
* ``hmean``: the harmonic mean of the effective step sizes ``n / Σᵢ 1/pᵢ`` of the
  preconditioner that produced step ``t`` (``p = precond(w_t, state_t, t)``: the state
  after the step, the counter of the step);

and every ``eig_every`` steps (and at ``N``):

* ``sharpness``: the raw sharpness ``λ_max(H(w_t))`` (the talk's ``S(w)``);
* ``effective_sharpness``: ``λ_max(P⁻¹H(w_t))`` with that same ``P⁻¹ = diag(p)``.

``final`` holds these at ``N`` and ``mean_loss``, the mean of ``L`` over the last
``2⌈1/(1 − β)⌉`` steps, ``β`` the largest hyperparameter named ``beta…`` in ``(0, 1)``
(the slowest EMA: the loss oscillates and drifts on that time scale), or the last 20
steps when there is none.

**Batching.** The discrete runs of one file are advanced together with ``jax.vmap``
over the hyperparameters (the generated module reads them from its ``hyper``
argument, so they can be traced) when the generated modules of all values are the
same code (the derivation may specialise on a value: then they are not) and tracing
succeeds; otherwise one after the other. ``sweep.json`` says which, and why.

**Flows** (``flows`` ⊃ ``central`` or ``stationary``): each run is also an
:class:`~flowgen.runtime.loop.Experiment` with the central flow from ``flow_start``
(default ``"auto"``: shortly after the discrete run reaches the edge of stability,
else from step 1) and the stationary flows (exact and simplified) from the central
flow's ``w̄`` at the same step; a flow that fails is recorded as ``{"error": ...}``;
``flows`` in ``sweep.json`` holds their distances to the discrete run at ``N``,
relative to the distance the discrete run travelled since the flow's start.

**Resume.** Every batch (or run) checkpoints after each chunk in
``OUT/checkpoints/<name>/`` (:class:`~flowgen.runtime.checkpoint.CheckpointStore`);
a finished run writes ``OUT/runs/<name>.json`` (and its final iterate,
``OUT/runs/<name>.npz``) and is not redone; ``resume=True``
continues the one in progress from its checkpoint, and the result equals an
uninterrupted sweep's.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import FlowgenError, SimulationError, UsageError
from flowgen.precision import in_float64
from flowgen.problems import Problem
from flowgen.runtime import eigen
from flowgen.runtime.checkpoint import CheckpointStore
from flowgen.runtime.loop import Experiment, FlowLane, Interrupted, Progress, no_progress
from flowgen.runtime.optimizer import Optimizer
from flowgen.runtime.processes import DiscreteProcess
from flowgen.runtime.series import json_values

__all__ = [
    "FLOWS",
    "SweepConfig",
    "SweepResult",
    "combinations",
    "mean_loss_window",
    "parse_sweep_sets",
    "sweep",
]

FLOWS = ("discrete", "central", "stationary")
SERIES = ("loss", "sharpness", "effective_sharpness", "hmean")


@dataclass(frozen=True)
class SweepConfig:
    steps: int = 1000
    flows: tuple[str, ...] = ("discrete",)
    eig_every: int = 10  # raw and effective sharpness every K steps (and at N)
    chunk: int = 50  # steps per chunk (progress and checkpoint granularity)
    batch: str = "auto"  # auto (vmap where possible) | vmap | sequential
    substeps: int = 4  # central flow: Euler substeps per step
    refine_tol: float | None = None  # its step control (None: CentralConfig's default)
    stationary_substeps: int = 2
    eig_tol: float = 1e-7
    flow_start: int | str | None = "auto"  # the flows' start: a step, auto (EoS), None (1)


@dataclass
class SweepResult:
    problem: str
    config: SweepConfig
    sets: dict  # name -> list of values (one value: fixed)
    runs: list[dict]
    batching: list[dict]
    timings: dict = field(default_factory=dict)
    w_final: dict = field(default_factory=dict)  # run name -> (n,) discrete iterate at N

    def to_json(self) -> dict:
        return {
            "problem": self.problem,
            "config": asdict(self.config),
            "set": self.sets,
            "swept": [k for k, v in self.sets.items() if len(v) > 1],
            "batching": self.batching,
            "timings": self.timings,
            "runs": self.runs,
        }


# ------------------------------------------------------------------ the sweep's grid


def parse_sweep_sets(items: list[str] | None) -> dict[str, list[float]]:
    """``["lr=1e-4,2e-4", "beta2=0.99"]`` → ``{"lr": [1e-4, 2e-4], "beta2": [0.99]}``.

    Raises :class:`UsageError` on a missing ``=``, an empty or non-numeric value, a
    non-finite value, a value listed twice, or a name given twice."""
    out: dict[str, list[float]] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(
                f"--set expects NAME=V1,V2,..., got `{item}`", hint="e.g. --set lr=1e-4,3e-4,1e-3"
            )
        name, vals = item.split("=", 1)
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"--set `{item}`: `{name}` is not a hyperparameter name")
        if name in out:
            raise UsageError(
                f"--set {name} is given twice", hint=f"list all values once: --set {name}=V1,V2"
            )
        values = []
        for j, v in enumerate(vals.split(",")):
            v = v.strip()
            if not v:
                raise UsageError(
                    f"--set {name}: value {j + 1} of `{vals}` is empty",
                    hint="separate values with single commas, e.g. --set lr=1e-4,3e-4",
                )
            try:
                x = float(v)
            except ValueError:
                raise UsageError(
                    f"--set {name}: `{v}` is not a number", hint="e.g. --set lr=1e-4,3e-4"
                ) from None
            if not math.isfinite(x):
                raise UsageError(f"--set {name}: `{v}` is not a finite number")
            if x in values:
                raise UsageError(f"--set {name}: the value {v} is listed twice")
            values.append(x)
        out[name] = values
    return out


def combinations(sets: dict[str, list[float]]) -> list[dict[str, float]]:
    """Every combination of the values (the Cartesian product, in the order given)."""
    names = list(sets)
    return [dict(zip(names, vals, strict=True)) for vals in itertools.product(*sets.values())]


def mean_loss_window(hyper: dict[str, float]) -> int:
    """``2⌈1/(1 − β)⌉`` for the largest ``beta…`` hyperparameter in (0, 1), else 20."""
    betas = [v for k, v in hyper.items() if k.lower().startswith("beta") and 0 < v < 1]
    return 2 * math.ceil(1.0 / (1.0 - max(betas)) - 1e-9) if betas else 20


def run_name(index: int, file: str, swept: dict[str, float]) -> str:
    stem = Path(file).stem
    vals = "-".join(f"{k}{v:g}" for k, v in swept.items())
    return f"{index:03d}-{stem}" + (f"-{vals}" if vals else "")


def _strip_hyper(source: str) -> str:
    """The generated module without the lines that carry the hyperparameters' values."""
    return "\n".join(
        ln for ln in source.splitlines() if not ln.startswith(("HYPER = ", "THRESHOLD = "))
    )


# ------------------------------------------------------------ the discrete runs, batched


class _Meter:
    """Raw and effective sharpness of one run, warm-started (state kept for resume)."""

    def __init__(self, problem: Problem, tol: float):
        self.problem, self.tol = problem, tol
        self.prev = {"raw": None, "eff": None}  # (n, 1) warm starts

    def __call__(self, w, p) -> tuple[float, float]:
        n = self.problem.n
        out = []
        for key, pp in (("raw", jnp.ones(n)), ("eff", p)):
            mv = eigen.sym_eff_hessian_matvec(self.problem.loss, w, pp)
            init = self.prev[key]
            est = eigen.top_eigenpairs(
                mv, n, 1, init=None if init is None else jnp.asarray(init), tol=self.tol
            )
            self.prev[key] = np.asarray(est.vecs)
            out.append(float(est.vals[0]))
        return out[0], out[1]

    def snapshot(self, prefix: str) -> dict:
        return {f"{prefix}{k}": v for k, v in self.prev.items() if v is not None}

    def restore(self, arrays: dict, prefix: str) -> None:
        for k in self.prev:
            self.prev[k] = arrays.get(f"{prefix}{k}")


class VmappedDiscrete:
    """The discrete optimizer for ``B`` hyperparameter settings at once (``jax.vmap``).

    ``hypers`` is ``{name: (B,)}``; the state is the module's state with a leading
    ``B`` axis. ``advance(K)`` returns ``(W (K, B, n), states, losses (K, B),
    p (K, B, n))``, ``p`` the effective step of each step (module docstring)."""

    def __init__(self, module, problem: Problem, hypers: dict[str, np.ndarray], t0: int = 0):
        self.module, self.problem = module, problem
        self.hypers = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in hypers.items()}
        B = int(next(iter(self.hypers.values())).shape[0])
        w0 = jnp.asarray(problem.w0)
        self.w = jnp.broadcast_to(w0, (B, w0.shape[0]))
        self.state = jax.vmap(lambda h: module.init_state(w0, h))(self.hypers)
        self.t = t0
        vg = jax.value_and_grad(problem.loss)

        def one(w, s, t, h, K):
            def body(carry, _):
                w, s, t = carry
                _, g = vg(w)
                w2, s2 = module.step(w, s, g, t + 1.0, h)
                p = module.precond(w2, s2, t + 1.0, h)
                p = jnp.ones_like(w2) if p is None else jnp.broadcast_to(p, w2.shape)
                return (w2, s2, t + 1.0), (w2, s2, problem.loss(w2), p)

            (w, s, _), (ws, ss, Ls, ps) = jax.lax.scan(body, (w, s, t), None, length=K)
            return w, s, ws, ss, Ls, ps

        @partial(jax.jit, static_argnums=3)
        def run(w, s, t, K):
            return jax.vmap(lambda w, s, h: one(w, s, t, h, K))(w, s, self.hypers)

        self._run = run

    def advance(self, K: int):
        w, s, ws, ss, Ls, ps = self._run(self.w, self.state, float(self.t), K)
        self.w, self.state, self.t = w, s, self.t + K
        # (B, K, ...) -> (K, B, ...)
        return (
            jnp.swapaxes(ws, 0, 1),
            jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), ss),
            np.asarray(Ls).T,
            jnp.swapaxes(ps, 0, 1),
        )

    def snapshot(self) -> dict:
        out = {"w": np.asarray(self.w), "t": np.asarray(self.t)}
        out.update({f"state/{k}": np.asarray(v) for k, v in self.state.items()})
        return out

    def restore(self, snap: dict) -> None:
        self.w = jnp.asarray(snap["w"])
        self.t = int(snap["t"])
        self.state = {k[6:]: jnp.asarray(v) for k, v in snap.items() if k.startswith("state/")}


class SequentialDiscrete:
    """One run with the loop's :class:`~flowgen.runtime.processes.DiscreteProcess`,
    in :class:`VmappedDiscrete`'s terms (``B = 1``)."""

    def __init__(self, opt: Optimizer, problem: Problem):
        self.opt = opt
        self.proc = DiscreteProcess(opt, problem, problem.w0)
        self._p = jax.jit(
            jax.vmap(lambda w, s, t: jnp.broadcast_to(opt.effective_step(w, s, t), w.shape))
        )

    @property
    def t(self):
        return self.proc.t

    @property
    def w(self):
        return self.proc.w

    def advance(self, K: int):
        t0 = self.proc.t
        ch = self.proc.advance(K)
        steps = jnp.asarray(t0 + 1.0 + np.arange(K))
        p = self._p(ch.w, ch.states, steps)
        return (
            ch.w[:, None],
            jax.tree_util.tree_map(lambda a: a[:, None], ch.states),
            np.asarray(ch.loss)[:, None],
            p[:, None],
        )

    def snapshot(self) -> dict:
        return self.proc.snapshot()

    def restore(self, snap: dict) -> None:
        self.proc.restore(snap)


def _run_group(
    proc,
    problem: Problem,
    opts: list[Optimizer],
    config: SweepConfig,
    store: CheckpointStore | None,
    resume: bool,
    progress: Progress,
    should_stop,
    label: str,
) -> list[dict[str, np.ndarray]]:
    """Advance ``proc`` (batched or one run) to ``N``, recording the series of every run;
    checkpointed after every chunk."""
    N, B = int(config.steps), len(opts)
    meters = [_Meter(problem, config.eig_tol) for _ in range(B)]
    series = [{k: np.full(N + 1, np.nan) for k in SERIES} for _ in range(B)]
    t = 0
    if resume and store is not None and store.exists():
        state, arrays = store.load()
        t = int(state["t"])
        proc.restore({k[5:]: v for k, v in arrays.items() if k.startswith("proc/")})
        for b in range(B):
            for k in SERIES:
                series[b][k] = np.array(arrays[f"series/{b}/{k}"])
            meters[b].restore(arrays, f"meter/{b}/")
    else:
        L0 = float(problem.loss(problem.w0))
        for b, opt in enumerate(opts):
            series[b]["loss"][0] = L0
            w0 = jnp.asarray(problem.w0)
            p0 = opt.effective_step(w0, opt.init(w0), 1.0)
            raw, eff = meters[b](w0, jnp.broadcast_to(p0, w0.shape))
            series[b]["sharpness"][0], series[b]["effective_sharpness"][0] = raw, eff
    while t < N:
        K = min(config.chunk, N - t)
        W, _, Ls, P = proc.advance(K)
        steps = t + 1 + np.arange(K)
        for b in range(B):
            series[b]["loss"][steps] = Ls[:, b]
            Pb = P[:, b]
            series[b]["hmean"][steps] = np.asarray(Pb.shape[1] / jnp.sum(1.0 / Pb, axis=1))
            for j, s in enumerate(steps):
                if s % config.eig_every == 0 or s == N:
                    raw, eff = meters[b](W[j, b], Pb[j])
                    series[b]["sharpness"][s], series[b]["effective_sharpness"][s] = raw, eff
        for b in range(B):
            if not np.all(np.isfinite(series[b]["loss"][steps])):
                bad = int(steps[~np.isfinite(series[b]["loss"][steps])][0])
                raise SimulationError(
                    f"sweep: {opts[b].name} at {_fmt_hyper(opts[b].hyper)}: the loss is NaN or "
                    f"infinite at step {bad}",
                    hint="drop that value, or lower the learning rate",
                )
        t += K
        if store is not None:
            arrays = {f"proc/{k}": v for k, v in proc.snapshot().items()}
            for b in range(B):
                arrays.update({f"series/{b}/{k}": v for k, v in series[b].items()})
                arrays.update(meters[b].snapshot(f"meter/{b}/"))
            store.save({"t": t}, arrays)
        progress(label, t, N)
        if should_stop():
            raise Interrupted(t, store.directory if store else None)
    W = np.asarray(proc.w).reshape(B, -1)  # (B, n) the iterates at N
    for b in range(B):
        series[b]["_w"] = W[b]
    return series


def _fmt_hyper(h: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in h.items())


# --------------------------------------------------------------------------- a run's record


def final_values(series: dict[str, np.ndarray], hyper: dict[str, float]) -> dict:
    """``final`` of a run (module docstring)."""
    N = len(series["loss"]) - 1
    win = mean_loss_window(hyper)
    lo = max(N - win + 1, 0)
    return {
        "loss": float(series["loss"][N]),
        "mean_loss": float(np.mean(series["loss"][lo : N + 1])),
        "mean_loss_window": int(N + 1 - lo),
        "sharpness": float(series["sharpness"][N]),
        "effective_sharpness": float(series["effective_sharpness"][N]),
        "harmonic_mean_step": float(series["hmean"][N]),
    }


def _flows_of(
    opt: Optimizer,
    problem: Problem,
    config: SweepConfig,
    store: CheckpointStore | None,
    resume: bool,
    progress: Progress,
    should_stop,
    label: str,
) -> tuple[dict, dict]:
    """The central (and stationary) flows of one run: their distances at ``N`` and series."""
    from flowgen.runtime.central import CentralConfig, CentralFlow
    from flowgen.runtime.explain import ExplainConfig, _stationary_lanes

    N = int(config.steps)
    ccfg = CentralConfig.given(substeps=config.substeps, refine_tol=config.refine_tol)
    lanes = [
        FlowLane(
            "central",
            lambda w, s, t: CentralFlow(opt, problem, w, s, t, ccfg),
            rename={"loss_pred": "loss_pred", "n_crit": "n_crit"},
        )
    ]
    skipped = {}
    if "stationary" in config.flows:
        ecfg = ExplainConfig(steps=N, stationary_substeps=config.stationary_substeps)
        stat, skipped = _stationary_lanes(opt, problem, ecfg, 0, N)
        lanes.extend(stat)
    exp = Experiment(
        opt,
        problem,
        steps=N,
        flows=tuple(lanes),
        start=config.flow_start,
        chunk=config.chunk,
        eig_every=config.eig_every,
        store=store,
        resume=resume and store is not None and store.exists(),
        progress=lambda ph, d, n: progress(f"{label} ({ph})", d, n),
        should_stop=should_stop,
    ).run()
    S = exp.series
    out, series = {}, {}
    for lane in lanes:
        name = lane.name
        tk = (
            f"distance_travelled_{name}"
            if f"distance_travelled_{name}" in S
            else "distance_travelled"
        )
        trav = float(S[tk][N])
        d = float(S[f"distance_{name}"][N])
        out[name] = {
            "start": int(exp.lane_starts.get(name, exp.flow_start)),
            "distance_to_discrete": d,
            "distance_travelled": trav,
            "distance_to_discrete_rel": d / trav if trav > 0 else float("nan"),
            "loss": float(S[f"loss_{name}"][N]),
        }
        series[f"loss_{name}"] = S[f"loss_{name}"]
        series[f"distance_{name}"] = S[f"distance_{name}"]
    for form, why in skipped.items():
        out[f"stationary_{form}"] = {"skipped": why}
    return out, series


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------------- sweep


def _check_config(config: SweepConfig) -> None:
    bad = [f for f in config.flows if f not in FLOWS]
    if bad:
        raise UsageError(f"--flows: `{bad[0]}` is not one of {', '.join(FLOWS)}")
    if config.batch not in ("auto", "vmap", "sequential"):
        raise UsageError(f"batch is auto, vmap or sequential, not `{config.batch}`")
    for name in ("steps", "chunk", "eig_every", "substeps", "stationary_substeps"):
        v = getattr(config, name)
        if int(v) < 1:
            raise UsageError(f"sweep: {name} must be a positive integer, got {v}")


@in_float64
def sweep(
    files: list,
    problem: Problem,
    sets: dict[str, list[float]],
    config: SweepConfig = SweepConfig(),
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    should_stop=None,
) -> SweepResult:
    """Every file × every combination of ``sets`` (module docstring).

    ``files`` are paths or :class:`~flowgen.api.OptFile`; ``sets`` maps a hyperparameter
    to its values (one value: fixed for every run). With ``out``, checkpoints and
    finished runs are kept there and ``resume=True`` continues."""
    from flowgen.api import OptFile, load

    _check_config(config)
    prog = progress or no_progress
    stop = should_stop or (lambda: False)
    outdir = Path(out) if out is not None else None
    if resume and outdir is None:
        raise UsageError("--resume needs --out: the directory of the interrupted sweep")
    if not files:
        raise UsageError("sweep: give at least one .opt file")
    tic = time.perf_counter()
    if outdir is not None:
        _check_identity(outdir, files, problem, sets, config, resume)
    combos = combinations(sets)
    runs, batching, w_final = [], [], {}
    index = 0
    for f in files:
        of = f if isinstance(f, OptFile) else load(f)
        fname = str(f.program.path or f.name) if isinstance(f, OptFile) else str(f)
        opts = []
        for h in combos:
            try:
                opts.append(of.optimizer(**h))
            except FlowgenError as err:
                raise UsageError(f"sweep: {fname} at {_fmt_hyper(h)}: {err.message}") from None
        names = [run_name(index + j, fname, _swept(h, sets)) for j, h in enumerate(combos)]
        index += len(combos)
        done = {}
        if outdir is not None:
            for nm in names:
                path = outdir / "runs" / f"{nm}.json"
                if path.exists() and resume:
                    done[nm] = json.loads(path.read_text())
        todo = [j for j, nm in enumerate(names) if nm not in done]
        mode, why = _batch_mode(opts, config, len(todo))
        batching.append({"file": fname, "mode": mode, "reason": why, "runs": len(combos)})
        results: dict[int, dict] = {}
        if todo and mode == "vmap":
            # the whole group is one batch (one checkpoint, whatever is already done)
            hyp = {k: np.array([o.hyper[k] for o in opts]) for k in opts[0].hyper}
            store = _group_store(outdir, f"batch-{names[0]}", opts, problem, config)
            try:
                proc = VmappedDiscrete(opts[0].module, problem, hyp)
                ser = _run_group(
                    proc, problem, opts, config, store, resume, prog, stop,
                    f"{Path(fname).stem} (vmap × {len(opts)})",
                )  # fmt: skip
            except (
                jax.errors.ConcretizationTypeError,
                jax.errors.TracerBoolConversionError,
                jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError,
            ) as err:
                if config.batch == "vmap":
                    raise UsageError(
                        f"sweep: {fname}'s module cannot be traced over its hyperparameters "
                        f"({type(err).__name__})",
                        hint="use batch=sequential",
                    ) from None
                mode, why = "sequential", f"tracing failed: {type(err).__name__}"
                batching[-1].update(mode=mode, reason=why)
            else:
                results = dict(enumerate(ser))
        for j in todo:
            if j in results:
                continue
            store = _group_store(outdir, f"run-{names[j]}", [opts[j]], problem, config)
            results[j] = _run_group(
                SequentialDiscrete(opts[j], problem), problem, [opts[j]], config, store,
                resume, prog, stop, names[j],
            )[0]  # fmt: skip
        for j, h in enumerate(combos):
            nm = names[j]
            if nm in done:
                runs.append(done[nm])
                npz = outdir / "runs" / f"{nm}.npz"
                if npz.exists():
                    with np.load(npz) as z:
                        w_final[nm] = z["w_final"]
                continue
            w_fin = results[j].pop("_w")
            w_final[nm] = w_fin
            rec = _record(fname, opts[j], h, sets, results[j], mode)
            rec["name"] = nm
            if any(fl in config.flows for fl in ("central", "stationary")):
                store = _group_store(outdir, f"flows-{nm}", [opts[j]], problem, config)
                try:
                    fl, fser = _flows_of(opts[j], problem, config, store, resume, prog, stop, nm)
                except SimulationError as err:  # the run's flows failed; the sweep goes on
                    fl, fser = {"error": err.message}, {}
                rec["flows"] = fl
                rec["series"].update({k: json_values(v) for k, v in fser.items()})
            rec = _jsonable(rec)
            if outdir is not None:
                (outdir / "runs").mkdir(parents=True, exist_ok=True)
                np.savez(outdir / "runs" / f"{nm}.npz", w_final=w_fin)
                path = outdir / "runs" / f"{nm}.json"
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(rec))
                tmp.replace(path)
            runs.append(rec)
    return SweepResult(
        problem=problem.name,
        config=config,
        sets={k: list(v) for k, v in sets.items()},
        runs=runs,
        batching=batching,
        timings={"total_s": time.perf_counter() - tic},
        w_final=w_final,
    )


def _check_identity(outdir: Path, files, problem: Problem, sets, config, resume: bool) -> None:
    """``OUT/sweep-identity.json``: what the sweep is; a resume must match it."""
    info = getattr(problem, "info", {}) or {}
    ident = json.loads(
        json.dumps(
            {
                "files": [str(getattr(f, "name", f)) for f in files],
                "problem": {"name": problem.name, "options": info.get("options", {})},
                "set": sets,
                "config": asdict(config),
            },
            default=str,
        )
    )
    path = outdir / "sweep-identity.json"
    if resume and path.exists():
        old = json.loads(path.read_text())
        if old != ident:
            diff = [k for k in ident if old.get(k) != ident[k]]
            raise UsageError(
                f"--resume: the sweep in {outdir} is a different run (its {', '.join(diff)} "
                "differ)",
                hint="resume with the same files, values, problem and options, or use another "
                "--out",
            )
    outdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ident, indent=1))


def _swept(h: dict, sets: dict) -> dict:
    return {k: v for k, v in h.items() if len(sets[k]) > 1}


def _record(fname, opt: Optimizer, h, sets, series, mode) -> dict:
    return {
        "file": fname,
        "optimizer": opt.name,
        "hyper": {k: float(v) for k, v in opt.hyper.items()},
        "swept": _swept(h, sets),
        "threshold": opt.threshold,
        "batched": mode == "vmap",
        "final": final_values(series, opt.hyper),
        "flows": {},
        "series": {k: json_values(v) for k, v in series.items()},
    }


def _batch_mode(opts: list[Optimizer], config: SweepConfig, todo: int) -> tuple[str, str]:
    """``("vmap" | "sequential", why)`` for the runs of one file."""
    if config.batch == "sequential":
        return "sequential", "asked for (batch=sequential)"
    if todo <= 1:
        return "sequential", "one run"
    srcs = {_strip_hyper(o.source) for o in opts}
    if len(srcs) > 1:
        if config.batch == "vmap":
            raise UsageError(
                "sweep: the generated modules differ across the values (the derivation "
                "specialises on them), so the runs cannot be batched",
                hint="use batch=sequential",
            )
        return "sequential", "the generated modules differ across the values"
    return "vmap", "one generated module; jax.vmap over its hyper argument"


def _group_store(outdir, key, opts, problem, config) -> CheckpointStore | None:
    if outdir is None or key is None:
        return None
    info = getattr(problem, "info", {}) or {}
    identity = {
        "command": "sweep",
        "optimizers": [o.name for o in opts],
        "sha256": sorted({o.spec.sha256 for o in opts}),
        "hyper": [{k: float(v) for k, v in o.hyper.items()} for o in opts],
        "problem": {
            "name": problem.name,
            "spec": info.get("spec", problem.name),
            "options": info.get("options", {}),
            "n_params": int(problem.n),
        },
        "config": asdict(config),
    }
    return CheckpointStore(Path(outdir) / "checkpoints" / key, identity)
