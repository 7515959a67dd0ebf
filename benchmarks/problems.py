"""The built-in problems: cost of a gradient, and where the optimizers reach the edge.

    python benchmarks/problems.py time [NAME ...]
    python benchmarks/problems.py eos NAME [--opt gd|rmsprop|adam] [--set lr=...] [--steps N]
                                          [--problem-opt KEY=VALUE ...] [--every K]
    python benchmarks/problems.py suggested [NAME ...]

``time`` reports, per problem at its defaults, the parameter count and the
best wall time over 30 calls (on a shared machine the least disturbed) of
one jitted gradient, one Hessian-vector product and one
third-derivative contraction ``∇(uᵀH(w)u)``, with one XLA device and
``OMP_NUM_THREADS=1``.

``eos`` runs the discrete optimizer (``optimizers/NAME.opt``) and measures the
effective sharpness every ``K`` steps; it prints the trace and a summary: the
first step at which the sharpness reaches 0.95 × the threshold (``eos_step``,
as ``flowgen validate`` defines ``eos_start``) and its range afterwards.

``suggested`` repeats ``eos`` for every optimizer with the hyperparameters in
the registry (``flowgen.problems.REGISTRY[name].suggested``) and checks them:
the edge is reached within the suggested steps and held (sharpness within
[0.8, 1.25] × threshold over the last half of the steps after the edge), with
no NaN.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowgen  # noqa: E402
from flowgen.precision import float64  # noqa: E402
from flowgen.problems import REGISTRY, get_problem, parse_problem_options  # noqa: E402
from flowgen.runtime.derivatives import third_contractions  # noqa: E402
from flowgen.runtime.eigen import hvp  # noqa: E402
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter  # noqa: E402

OPTIMIZERS = ("gd", "rmsprop", "adam")


def _best_time(fn, *args, repeat: int = 30) -> float:
    """Best wall time of one call over ``repeat`` (on a shared machine the minimum is the
    estimate least disturbed by other processes, as ``timeit`` recommends)."""
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - tic)
    return min(times)


def cmd_time(names: list[str]) -> None:
    print(f"{'problem':12s} {'params':>8s} {'grad ms':>8s} {'hvp ms':>8s} {'∇³ ms':>8s}")
    for name in names or [n for n, e in REGISTRY.items() if e.alias_of is None]:
        p = get_problem(name)
        w = p.w0
        u = jax.random.normal(jax.random.key(0), w.shape, dtype=jnp.float64)
        grad = jax.jit(jax.grad(p.loss))
        hv = jax.jit(lambda w, u, p=p: hvp(p.loss, w, u))
        third = jax.jit(lambda w, U, p=p: third_contractions(p.loss, w, U))
        tg = _best_time(grad, w)
        th = _best_time(hv, w, u)
        t3 = _best_time(third, w, u[:, None], repeat=10)
        print(f"{name:12s} {p.n:8d} {1e3 * tg:8.2f} {1e3 * th:8.2f} {1e3 * t3:8.2f}", flush=True)


def eos_run(
    name: str,
    opt_name: str,
    sets: dict[str, float],
    steps: int,
    every: int = 10,
    problem_options: dict | None = None,
    quiet: bool = False,
) -> dict:
    """Discrete run with the effective sharpness every ``every`` steps; a summary dict."""
    opt = flowgen.load(ROOT / "optimizers" / f"{opt_name}.opt").optimizer(**sets)
    prob = get_problem(name, **(problem_options or {}))
    c = opt.threshold
    proc = DiscreteProcess(opt, prob, prob.w0)
    meter = SharpnessMeter(opt, prob, k=1, tol=1e-4)
    ts, sharp, loss = [], [], []
    status = "ok"
    tic = time.perf_counter()
    try:
        while proc.t < steps:
            chunk = proc.advance(every)
            s = meter(proc.w, proc.state, proc.t)
            ts.append(proc.t)
            sharp.append(s)
            loss.append(float(chunk.loss[-1]))
            if not quiet and (proc.t % (10 * every) == 0):
                print(f"  step {proc.t:5d}  loss {loss[-1]:.5f}  sharpness {s:8.3f}", flush=True)
            if not np.isfinite(s):
                raise FloatingPointError("sharpness not finite")
    except Exception as exc:  # noqa: BLE001 - report what stopped the run
        status = f"stopped at step {proc.t}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    ts, sharp = np.array(ts), np.array(sharp)
    crossed = np.flatnonzero(sharp >= 0.95 * c)
    eos_step = int(ts[crossed[0]]) if crossed.size else None
    out = {
        "problem": name,
        "optimizer": opt_name,
        "set": sets,
        "threshold": c,
        "status": status,
        "eos_step": eos_step,
        "sharpness_start": float(sharp[0]) if sharp.size else None,
        "loss_start": loss[0] if loss else None,
        "loss_end": loss[-1] if loss else None,
        "seconds": time.perf_counter() - tic,
        "trace": {"step": ts.tolist(), "sharpness": sharp.tolist(), "loss": loss},
    }
    if eos_step is not None:
        after = sharp[ts >= eos_step]
        late = after[len(after) // 2 :]
        out["after_eos"] = [float(after.min() / c), float(after.max() / c)]
        out["late_band"] = [float(q / c) for q in (late.min(), np.median(late), late.max())]
        out["steps_after_eos"] = int(ts[-1] - eos_step)
    return out


def _report(r: dict) -> str:
    parts = [f"{r['problem']} {r['optimizer']} {r['set']}: {r['status']}", f"eos {r['eos_step']}"]
    if r["sharpness_start"] is not None:
        parts.append(f"start {r['sharpness_start'] / r['threshold']:.3f}c")
    if "late_band" in r:
        lo, mid, hi = r["late_band"]
        parts.append(f"late [{lo:.2f}, {mid:.2f}, {hi:.2f}]c")
        parts.append(f"after eos max {r['after_eos'][1]:.2f}c")
    if r["loss_end"] is not None:
        parts.append(f"loss {r['loss_start']:.4f}→{r['loss_end']:.4f}")
    parts.append(f"{r['seconds']:.0f}s")
    return "; ".join(parts)


def cmd_eos(args) -> None:
    sets = {}
    for item in args.set or []:
        k, v = item.split("=", 1)
        sets[k] = float(v)
    opts = parse_problem_options(args.problem_opt or [], args.name)
    r = eos_run(args.name, args.opt, sets, args.steps, args.every, opts, quiet=args.quiet)
    print(_report(r), flush=True)


def cmd_suggested(names: list[str]) -> int:
    bad = 0
    for name in names or [n for n, e in REGISTRY.items() if e.alias_of is None]:
        sug = REGISTRY[name].suggested
        for opt_name in OPTIMIZERS:
            if opt_name not in sug:
                continue
            r = eos_run(name, opt_name, dict(sug[opt_name]), sug["steps"], quiet=True)
            held = "late_band" in r and 0.8 <= r["late_band"][0] and r["late_band"][2] <= 1.25
            ok = r["status"] == "ok" and r["eos_step"] is not None and held
            bad += not ok
            print(("ok   " if ok else "FAIL ") + _report(r), flush=True)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("time")
    p.add_argument("names", nargs="*")
    p = sub.add_parser("eos")
    p.add_argument("name")
    p.add_argument("--opt", default="gd", choices=OPTIMIZERS)
    p.add_argument("--set", action="append")
    p.add_argument("--problem-opt", action="append")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("suggested")
    p.add_argument("names", nargs="*")
    args = ap.parse_args()
    with float64():
        if args.cmd == "time":
            cmd_time(args.names)
        elif args.cmd == "eos":
            cmd_eos(args)
        else:
            return cmd_suggested(args.names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
