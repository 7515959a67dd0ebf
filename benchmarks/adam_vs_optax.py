"""The generated Adam step against ``optax.adam``, and the cost of the stable flow.

On ``digits-mlp`` (tanh MLP, n = 2948 parameters, float64), side by side:

* the discrete step generated from ``optimizers/adam.opt`` and ``optax.adam``
  with the same hyperparameters, each as one jitted ``lax.scan`` of ``--steps``
  full-batch steps (gradient included) — the two scans have identical bodies
  apart from the update; the calls alternate between the two, and the median
  over ``--repeats`` calls gives steps per second;
* the same with a fixed gradient ("update only"), which isolates the update
  itself from the MLP's forward/backward pass;
* the stable flow (``flowgen.runtime.processes.StableFlow``: diffrax Tsit5 with
  PID control, Kvaerno5 when stiff) over ``t = 0 .. --steps``: seconds per unit
  of time (one unit = one discrete step) and solver steps per unit, timed after
  a warm-up call that compiles it.

Run: ``python benchmarks/adam_vs_optax.py [--steps 200] [--repeats 11]``
(10-20 s on a laptop CPU). The goal is flowgen/optax >= 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flowgen  # noqa: E402
from flowgen.problems import get_problem  # noqa: E402
from flowgen.runtime.processes import StableFlow  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def flowgen_scan(opt, grad_fn, steps):
    """``run(w, g0)``: ``steps`` generated Adam steps; ``grad_fn(w, g0)`` gives g."""

    @jax.jit
    def run(w, g0):
        def body(carry, _):
            w, s, t = carry
            w, s = opt.step(w, s, grad_fn(w, g0), t)
            return (w, s, t + 1.0), None

        (w, _, _), _ = jax.lax.scan(body, (w, opt.init(w), jnp.float64(1.0)), None, length=steps)
        return w

    return run


def optax_scan(tx, grad_fn, steps):
    @jax.jit
    def run(w, g0):
        def body(carry, _):
            w, s = carry
            updates, s = tx.update(grad_fn(w, g0), s, w)
            return (optax.apply_updates(w, updates), s), None

        (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
        return w

    return run


def time_pair(fns, args, repeats):
    """Median wall time of each function (calls alternate between them)."""
    for f in fns.values():  # compile
        jax.block_until_ready(f(*args))
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            tic = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in times.items()}


def time_stable_flow(opt, problem, K, repeats):
    flow = StableFlow(opt, problem, problem.w0)
    w0, s0 = flow.w, flow.state
    tic = time.perf_counter()
    flow.advance(K)  # compiles (and runs once)
    first = time.perf_counter() - tic
    solver = flow.solver_name
    times, steps = [], []
    for _ in range(repeats):
        flow.w, flow.state, flow.t, flow.n_steps = w0, s0, 0, 0  # the same K units again
        tic = time.perf_counter()
        chunk = flow.advance(K)
        jax.block_until_ready(chunk.w)
        times.append(time.perf_counter() - tic)
        steps.append(flow.n_steps)
    return statistics.median(times), statistics.median(steps), first, solver


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per scan / flow time units")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--flow-repeats", type=int, default=5)
    args = ap.parse_args(argv)

    problem = get_problem("digits-mlp")
    n = problem.n
    opt = flowgen.load(ROOT / "optimizers" / "adam.opt").optimizer(**HYPER)
    tx = optax.adam(HYPER["lr"], HYPER["beta1"], HYPER["beta2"], HYPER["eps"])
    grad = jax.grad(problem.loss)
    g_fixed = jnp.asarray(np.random.default_rng(0).normal(size=n) * 1e-2)

    print(
        f"digits-mlp (n = {n}), float64, jax {jax.__version__}, optax {optax.__version__}, "
        f"{jax.devices()[0].platform}"
    )
    print(
        "Adam "
        + ", ".join(f"{k}={v:g}" for k, v in HYPER.items())
        + f"; {args.steps} steps per jitted lax.scan, median of {args.repeats} calls\n"
    )

    rows = []
    full = {
        "flowgen": flowgen_scan(opt, lambda w, g0: grad(w), args.steps),
        "optax": optax_scan(tx, lambda w, g0: grad(w), args.steps),
    }
    upd = {
        "flowgen": flowgen_scan(opt, lambda w, g0: g0, args.steps),
        "optax": optax_scan(tx, lambda w, g0: g0, args.steps),
    }
    for label, fns in (("step incl. gradient", full), ("update only (fixed g)", upd)):
        med = time_pair(fns, (problem.w0, g_fixed), args.repeats)
        rows.append((label, args.steps / med["flowgen"], args.steps / med["optax"]))

    w_f = np.asarray(full["flowgen"](problem.w0, g_fixed))
    w_o = np.asarray(full["optax"](problem.w0, g_fixed))
    rel = np.linalg.norm(w_f - w_o) / np.linalg.norm(w_o)

    head = f"{'':32s} {'flowgen':>10s} {'optax':>10s} {'flowgen/optax':>14s}"
    print(head)
    print("-" * len(head))
    for label, f, o in rows:
        print(f"{label + ' [steps/s]':32s} {f:10.0f} {o:10.0f} {f / o:14.3f}")
    print(f"\nrelative difference of w after {args.steps} steps: {rel:.1e}")
    ratio = rows[0][1] / rows[0][2]
    print(f"goal flowgen/optax >= 0.9 (with gradient): {'met' if ratio >= 0.9 else 'NOT met'}")

    K = args.steps
    sec, nsteps, first, solver = time_stable_flow(opt, problem, K, args.flow_repeats)
    disc = 1.0 / rows[0][1]
    print(f"\nstable flow of adam, t = 0..{K} (diffrax, rtol 1e-6, atol 1e-9; solver: {solver})")
    print("(each advance also evaluates loss and |grad| at the K sampled times)")
    head = f"{'':34s} {'value':>12s}"
    print(head)
    print("-" * len(head))
    print(f"{'first call incl. compile [s]':34s} {first:12.2f}")
    print(f"{'seconds per unit time [ms]':34s} {1e3 * sec / K:12.3f}")
    print(f"{'solver steps per unit time':34s} {nsteps / K:12.2f}")
    print(f"{'ms per solver step':34s} {1e3 * sec / max(nsteps, 1):12.3f}")
    print(f"{'cost / one discrete step':34s} {sec / K / disc:12.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
