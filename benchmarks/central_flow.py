"""The central flow's cost per unit of time, in gradient-equivalents, against its floor.

    python benchmarks/central_flow.py [--problem digits-mlp] [--problem-opt width=128] \\
        [--optimizer optimizers/gd.opt] [--set lr=0.4] [--restart 300] [--units 40] [--json]
    python benchmarks/central_flow.py --validate 600 --set lr=0.5 \\
        --problem-opt keep_constant=true [--restart-at T|auto] [--pin 0]

**The unit.** A *gradient-equivalent* (g.e.) is the time of one jitted gradient
``∇L(w)`` of the same problem at the same point (``--reps`` jitted calls
back to back, per call), measured in the same run. Every time below is
divided by it, so the numbers compare across machines. The clock is the
process's CPU time on a CPU device (robust when other jobs share the cores)
and wall time otherwise (``--clock``). Everything is measured in
``--rounds`` interleaved rounds: the unit costs keep the median round, the
flows and the discrete step the fastest (the flow's units are rerun from one
snapshot each round).

**What is measured** (after a warm-up that compiles everything):

* the central flow from the discrete iterate at ``--restart`` for ``--units``
  units of time: seconds and g.e. per unit; the counters of
  :class:`~flowgen.runtime.central.CentralFlow` per unit: substeps, gradients,
  Hessian-vector products (HVPs), third-derivative contractions, LOBPCG
  iterations beyond the warm Rayleigh–Ritz step, SDCP solves; the number of
  critical directions ``k`` (min, mean, max over the units);
* the split, from a second run of the same units with every stage a separate
  jitted call (``CentralConfig(profile=True)``): eigensolver (gradient,
  linearisation, eigen refresh), third derivatives, rates (constraint,
  closed-form SDCP, the Euler step), SDCP (cvxpy, k ≥ 2) and the rest
  (Python, dispatch, records);
* the standalone unit costs: one HVP ``c_hvp`` (forward-over-reverse, one
  jitted call) and one contraction ``c_contr`` (``∇(uᵀH(w)u)``, one pair of
  :func:`~flowgen.runtime.derivatives.third_contractions`), in g.e.;
* one discrete step (jit + ``lax.scan``), in g.e.

**The floor** (g.e. per unit of time). What one evaluation of the central
flow needs at least, with ``k`` the mean critical count:

    floor = 1 + k·c_hvp + k(k+1)/2 · c_contr

one gradient; the ``k`` HVPs ``H u_i`` at the new point (the least a warm
eigen refresh can do: they give the Rayleigh quotients, the residuals and
``H U``); the ``k(k+1)/2`` contractions. One evaluation per unit of time is
the least a flow can use. ``work`` prices the counts actually spent, ``work
= analyses + hvps·c_hvp + contractions·c_contr`` (per unit; one gradient per
analysis); ``measured − work`` is overhead (dispatch, small linear algebra,
the SDCP, Python).

``--validate STEPS`` times a whole ``flowgen validate`` instead: by default
in this process through the public API (``flowgen.load(f).validate(...)``,
compilation included); with ``--pin CPU`` as a fresh ``python -m flowgen.cli
validate`` pinned to one core with ``taskset`` (start-up included), twice:
with an empty compilation cache (``$FLOWGEN_COMPILE_CACHE`` in a fresh
temporary directory: a fresh install's first run) and again with the cache
the first run left (every later run), checking that both write the same summary.

The device JAX ran on is printed; nothing here assumes a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flowgen  # noqa: E402
from flowgen.cli import parse_sets  # noqa: E402
from flowgen.precision import float64  # noqa: E402
from flowgen.problems import get_problem, parse_problem_options  # noqa: E402
from flowgen.runtime import derivatives  # noqa: E402
from flowgen.runtime.central import CentralConfig, CentralFlow  # noqa: E402
from flowgen.runtime.eigen import hvp  # noqa: E402
from flowgen.runtime.processes import DiscreteProcess  # noqa: E402

CLOCK = time.perf_counter  # set in main: process CPU time on a CPU (robust to other load)


def call_time(fn, *args, reps: int = 100) -> float:
    """Time per call of ``fn(*args)``: ``reps`` calls dispatched back to back, then blocked
    (less noisy than timing single calls of a fraction of a millisecond)."""
    jax.block_until_ready(fn(*args))
    tic = CLOCK()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (CLOCK() - tic) / reps


def device_info() -> dict:
    devs = jax.devices()
    return {
        "platform": devs[0].platform,
        "kind": devs[0].device_kind,
        "count": len(devs),
        "devices": [str(d) for d in devs],
    }


def unit_costs(loss, w, reps: int) -> dict:
    """Times of one jitted gradient, HVP and third-derivative contraction at ``w``."""
    u = jax.random.normal(jax.random.PRNGKey(1), w.shape, w.dtype)
    u = u / jnp.linalg.norm(u)
    grad = jax.jit(jax.grad(loss))
    hv = jax.jit(lambda w, u: hvp(loss, w, u))
    contr = jax.jit(lambda w, U: derivatives.third_contractions(loss, w, U))
    return {
        "gradient": call_time(grad, w, reps=reps),
        "hvp": call_time(hv, w, u, reps=reps),
        "contraction": call_time(contr, w, u[:, None], reps=reps),
    }


def timed_units(cf: CentralFlow, snap: dict, units: int):
    """(time per unit, chunk) of ``units`` units from the snapshot, counters reset."""
    cf.restore(snap)
    for key in cf.timings:
        cf.timings[key] = 0.0
    for key in cf.counters:
        cf.counters[key] = 0
    tic = CLOCK()
    ch = cf.advance(units)
    jax.block_until_ready(cf.w)
    return (CLOCK() - tic) / units, ch


def measure(args) -> dict:
    prob_opts = parse_problem_options(args.problem_opt or [], args.problem)
    hyper = parse_sets(args.set)
    with float64():
        prob = get_problem(args.problem, **prob_opts)
        opt = flowgen.load(args.optimizer).optimizer(**hyper)
        disc = DiscreteProcess(opt, prob, prob.w0)
        if args.restart:
            disc.advance(args.restart)
        w, s, start = disc.w, disc.state, args.restart
        d2 = DiscreteProcess(opt, prob, w, s, start)
        d2.advance(args.units)  # compile
        base = dict(substeps=args.substeps, eig_tol=args.eig_tol) | central_options(args.central)
        cfg = CentralConfig(**{k: v for k, v in base.items() if v is not None})
        cf = CentralFlow(opt, prob, w, s, start, cfg)
        tic = time.perf_counter()
        cf.advance(args.warmup)  # compiles
        compile_s = time.perf_counter() - tic
        snap = cf.snapshot()
        pf = CentralFlow(opt, prob, w, s, start, CentralConfig(**{**cfg.__dict__, "profile": True}))
        pf.advance(1)  # compiles the stages
        pu = max(1, min(args.units, args.profile_units))
        rounds: dict = {}
        for _ in range(args.rounds):  # interleaved rounds; the minimum of each quantity
            costs = unit_costs(prob.loss, cf.w, args.reps)
            d2.w, d2.state, d2.t = w, s, start
            tic = CLOCK()
            d2.advance(args.units)
            jax.block_until_ready(d2.w)
            costs["discrete"] = (CLOCK() - tic) / args.units
            costs["central"], ch = timed_units(cf, snap, args.units)
            costs["profiled"], _ = timed_units(pf, snap, pu)
            for key, v in costs.items():
                rounds.setdefault(key, []).append(v)
            if args.verbose:
                print({key: round(1e3 * v, 4) for key, v in costs.items()}, file=sys.stderr)
    # the unit costs: median over rounds; the flow, the profiled flow, the discrete step:
    # the fastest round (a round can only be slowed down by other load)
    best = {key: float(np.median(v)) for key, v in rounds.items()}
    for key in ("central", "profiled", "discrete"):
        best[key] = float(np.min(rounds[key]))
    tg = best["gradient"]
    c_hvp, c_contr = best["hvp"] / tg, best["contraction"] / tg
    ks = np.asarray(ch.series["n_crit"])
    k = float(ks.mean())
    per = {name: v / args.units for name, v in cf.counters.items() if name != "units"}
    measured = best["central"] / tg
    work = per["analyses"] + per["hvps"] * c_hvp + per["contractions"] * c_contr
    floor = 1.0 + k * c_hvp + k * (k + 1) / 2 * c_contr
    split = {name: v / pu / tg for name, v in pf.timings.items() if name != "fused"}
    split["python"] = best["profiled"] / tg - sum(split.values())
    return {
        "device": device_info(),
        "clock": "process CPU time" if CLOCK is time.process_time else "wall",
        "problem": args.problem,
        "problem_options": {
            key: (list(v) if isinstance(v, tuple) else v) for key, v in prob_opts.items()
        },
        "n": prob.n,
        "optimizer": opt.name,
        "hyper": opt.hyper,
        "restart": start,
        "units": args.units,
        "config": {"substeps": cfg.substeps, "eig_tol": cfg.eig_tol}
        | {k: getattr(cfg, k) for k in central_options(args.central)},
        "gradient_ms": 1e3 * tg,
        "hvp_ge": c_hvp,
        "contraction_ge": c_contr,
        "k": {"min": int(ks.min()), "mean": k, "max": int(ks.max())},
        "per_unit": {"seconds": best["central"], "grad_eq": measured, **per},
        "floor_grad_eq": {"minimal": floor, "work_at_counts": work},
        "over_floor": measured / floor,
        "overhead_grad_eq": measured - work,
        "split_grad_eq": split,
        "profiled_grad_eq": best["profiled"] / tg,
        "discrete_step_grad_eq": best["discrete"] / tg,
        "central_unit_in_discrete_steps": best["central"] / best["discrete"],
        "compile_and_warmup_s": compile_s,
        "sharpness_last": float(ch.series["sharpness"][-1]),
    }


def show(r: dict) -> None:
    d = r["device"]
    opts = " ".join(f"{k}={v}" for k, v in r["problem_options"].items())
    print(f"device: {d['platform']} ({d['kind']}) × {d['count']}")
    print(
        f"{r['optimizer']} {r['hyper']} on {r['problem']} {opts} (n = {r['n']}), "
        f"{r['units']} units from step {r['restart']}, substeps {r['config']['substeps']}"
    )
    k = r["k"]
    print(
        f"one gradient {r['gradient_ms']:.3f} ms = 1 g.e.; one HVP {r['hvp_ge']:.2f} g.e.; "
        f"one contraction {r['contraction_ge']:.2f} g.e.; critical directions k = "
        f"{k['min']}–{k['max']} (mean {k['mean']:.2f})"
    )
    pu = r["per_unit"]
    print(
        f"central flow per unit of time: {pu['grad_eq']:.1f} g.e. ({1e3 * pu['seconds']:.1f} ms, "
        f"{r['central_unit_in_discrete_steps']:.1f} discrete steps)"
    )
    print(
        f"  spent per unit: {pu['substeps']:.2f} substeps, {pu['analyses']:.2f} gradients, "
        f"{pu['hvps']:.1f} HVPs ({pu['eig_iterations']:.2f} LOBPCG iterations), "
        f"{pu['contractions']:.2f} contractions, {pu['sdcp_solves']:.2f} SDCP solves, "
        f"{pu['redone']:.2f} analyses redone (shapes changed)"
    )
    fl = r["floor_grad_eq"]
    print(
        f"  floor {fl['minimal']:.1f} g.e. (1 + k·HVP + k(k+1)/2·contraction); work at the "
        f"counts spent {fl['work_at_counts']:.1f}; measured / floor = {r['over_floor']:.2f}"
    )
    print(f"  split (profiled run, {r['profiled_grad_eq']:.1f} g.e. per unit):")
    for name, v in r["split_grad_eq"].items():
        print(f"    {name:<20}{v:>8.1f} g.e. {100 * v / r['profiled_grad_eq']:>5.0f} %")
    print(f"one discrete step {r['discrete_step_grad_eq']:.2f} g.e.")


def central_options(items: list[str] | None) -> dict:
    """``--central KEY=VALUE``: any :class:`CentralConfig` field, typed by its default."""
    fields = {f.name: f for f in dataclasses.fields(CentralConfig)}
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or key not in fields or key == "profile":
            names = ", ".join(k for k in fields if k != "profile")
            raise SystemExit(f"--central {item!r}: expected KEY=VALUE with KEY one of {names}")
        kind = type(fields[key].default)
        out[key] = (val.lower() in ("1", "true", "yes")) if kind is bool else kind(val)
    return out


def time_validate(args) -> dict:
    hyper = parse_sets(args.set)
    restart = args.restart_at
    if restart not in (None, "auto"):
        restart = int(restart)
    out = {"device": device_info(), "steps": args.validate, "restart_at": restart}
    if args.pin is None:
        prob_opts = parse_problem_options(args.problem_opt or [], args.problem)
        tic = time.perf_counter()
        res = flowgen.load(args.optimizer).validate(
            args.problem,
            steps=args.validate,
            restart_at=restart,
            problem_options=prob_opts,
            **({"substeps": args.substeps} if args.substeps else {}),
            **hyper,
        )
        out.update(wall_s=time.perf_counter() - tic, summary=res.summary, timings=res.timings)
        out["mode"] = "api (in process, compilation included)"
        return out
    tmp = tempfile.mkdtemp(prefix="flowgen-bench-")
    cmd = [sys.executable, "-m", "flowgen.cli", "validate", str(args.optimizer)]
    cmd += ["--problem", args.problem, "--steps", str(args.validate), "--out", tmp]
    for item in args.problem_opt or []:
        cmd += ["--problem-opt", item]
    for item in args.set or []:
        cmd += ["--set", item]
    if restart is not None:
        cmd += ["--restart-at", str(restart)]
    if args.substeps:
        cmd += ["--substeps", str(args.substeps)]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.pin), *cmd]
    cache = Path(tmp) / "xla"  # a fresh compilation cache: the first run is a fresh install's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env["FLOWGEN_COMPILE_CACHE"] = str(cache)
    out["mode"] = f"cli pinned to cpu {args.pin} (start-up included)"
    out["command"] = cmd
    for run in ("cold", "warm"):  # empty compilation cache, then the one the first run left
        tic = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - tic
        if proc.returncode not in (0, 1):  # 1: the verdict is fail
            out["error"] = proc.stderr[-2000:]
            break
        rep = json.loads((Path(tmp) / "report.json").read_text())
        out[f"wall_{run}_s"] = wall
        if run == "cold":
            out.update(wall_s=wall, summary=rep["summary"], timings=rep.get("timings"))
        else:
            out["warm_timings"] = rep.get("timings")
            out["same_summary_warm"] = rep["summary"] == out["summary"]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default="digits-mlp")
    ap.add_argument("--problem-opt", action="append", metavar="KEY=VALUE")
    ap.add_argument("--optimizer", default=str(ROOT / "optimizers" / "gd.opt"))
    ap.add_argument("--set", action="append", metavar="NAME=VALUE")
    ap.add_argument("--restart", type=int, default=300, help="discrete steps before the flow")
    ap.add_argument("--units", type=int, default=40, help="units of flow time measured")
    ap.add_argument("--warmup", type=int, default=3, help="units run first (compilation)")
    ap.add_argument("--profile-units", type=int, default=10, help="units of the profiled run")
    ap.add_argument("--reps", type=int, default=200, help="repetitions of the unit costs")
    ap.add_argument("--substeps", type=int, default=None, help="CentralConfig.substeps")
    ap.add_argument("--eig-tol", type=float, default=None, help="CentralConfig.eig_tol")
    ap.add_argument(
        "--central", action="append", metavar="KEY=VALUE", help="any CentralConfig field"
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (minimum kept)")
    ap.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="auto: process CPU time on a CPU device (robust to other load), else wall",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--verbose", action="store_true", help="each round's times (ms) on stderr")
    ap.add_argument("--validate", type=int, metavar="STEPS", help="time a whole validate")
    ap.add_argument("--restart-at", default=None, help="validate: T or auto")
    ap.add_argument("--pin", type=int, default=None, metavar="CPU", help="validate: CLI on CPU")
    args = ap.parse_args(argv)
    global CLOCK
    cpu = jax.devices()[0].platform == "cpu"
    CLOCK = time.process_time if args.clock == "cpu" or (args.clock == "auto" and cpu) else CLOCK
    if args.set is None:
        args.set = ["lr=0.4"] if Path(args.optimizer).stem == "gd" else []
    if args.validate:
        r = time_validate(args)
        if args.json:
            print(json.dumps(r, default=str))
        else:
            sm = r.get("summary") or {}
            print(f"device: {r['device']['platform']} ({r['device']['kind']})")
            wall = r.get("wall_s", float("nan"))
            print(f"flowgen validate, {args.validate} steps, {r['mode']}: {wall:.1f} s")
            if "wall_warm_s" in r:
                print(
                    f"  again with the compilation cache the first run left: "
                    f"{r['wall_warm_s']:.1f} s (same summary: {r['same_summary_warm']})"
                )
            if "error" in r:
                print(r["error"])
            else:
                print(
                    f"  verdict {sm.get('verdict')}, central {sm.get('central_distance_rel'):.4f}, "
                    f"loss error {sm.get('loss_pred_rel_err'):.4f}"
                )
        return 0
    r = measure(args)
    if args.json:
        print(json.dumps(r))
    else:
        show(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
