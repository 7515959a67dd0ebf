"""The stable flow against the discrete run, with the old and the new solver side by side.

    python benchmarks/stable_flow.py [--cases rnn,digits-gd,digits-rmsprop] [--steps 400]
                                     [--chunk 50] [--legacy-units N] [--no-legacy] [--json FILE]

Cases (each from the problem's initialisation; the flows start at the discrete
iterate after ``start`` steps, as ``flowgen run`` does):

* ``rnn`` — ``tests/rnn_recall.py:make_problem`` with ``hidden=32, n=256`` (1316
  parameters), GD lr 0.1: the stable flow (gradient flow) sharpens to thousands
  of times GD's threshold, so it is stiff after τ ≈ 120;
* ``digits-gd`` — digits-mlp (2948 parameters), GD lr 0.4 (not stiff);
* ``digits-rmsprop`` — digits-mlp, RMSProp lr 3e-4, β₂ 0.99 (not stiff).

For each case, in one run: the discrete optimizer (jit + ``lax.scan``), the old
stable flow (:class:`~flowgen.runtime.stable.DiffraxStableFlow`: diffrax Tsit5 per
chunk, Kvaerno5 after a failure) and the new one
(:class:`~flowgen.runtime.stable.StableFlow`: Tsit5, then RA34PW2 with GMRES on
Jacobian–vector products once stiff), advanced ``--steps`` units in chunks of
``--chunk``. Compilation is timed separately (warm-up calls, or ahead-of-time
``StableFlow.compile``); wall times exclude it. ``grad-eq`` is wall time in units
of one jitted ``value_and_grad`` of the loss at the start (the discrete step's floor
is one gradient per unit of time plus the loss of the new iterate). Also reported:
the new solver's steps, field evaluations (one gradient each) and
Jacobian–vector products, when it switched, its error against the old solver
(relative to the distance travelled) and the effective sharpness the flows end at.
``--legacy-units`` caps the old solver's horizon (its cost per unit is then
extrapolated and marked).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flowgen  # noqa: E402
from flowgen.precision import float64  # noqa: E402
from flowgen.problems import get_problem  # noqa: E402
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter  # noqa: E402
from flowgen.runtime.stable import DiffraxStableFlow, StableFlow  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "rnn": (
        f"{ROOT / 'tests' / 'rnn_recall.py'}:make_problem",
        dict(hidden=32, n=256),
        "gd",
        {"lr": 0.1},
    ),
    "digits-gd": ("digits-mlp", {}, "gd", {"lr": 0.4}),
    "digits-rmsprop": ("digits-mlp", {}, "rmsprop", {"lr": 3e-4, "beta2": 0.99}),
}


def _wall(fn, *args):
    tic = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(getattr(out, "w", out))
    return out, time.perf_counter() - tic


def _grad_time(problem) -> float:
    vg = jax.jit(jax.value_and_grad(problem.loss))
    jax.block_until_ready(vg(problem.w0))
    best = np.inf
    for _ in range(5):
        tic = time.perf_counter()
        for _ in range(10):
            out = vg(problem.w0)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - tic) / 10)
    return best


def run_case(name: str, steps: int, chunk: int, legacy_units: int | None, legacy: bool) -> dict:
    spec, popts, opt_name, hyper = CASES[name]
    problem = get_problem(spec, **popts)
    opt = flowgen.load(ROOT / "optimizers" / f"{opt_name}.opt").optimizer(**hyper)
    start = 1 if opt.state_names else 0
    d0 = DiscreteProcess(opt, problem, problem.w0)
    if start:
        d0.advance(start)
    w_start, s_start = d0.w, d0.state
    t_grad = _grad_time(problem)
    res = {
        "case": name,
        "n_params": int(problem.n),
        "optimizer": opt_name,
        "hyper": hyper,
        "start": start,
        "units": steps,
        "chunk": chunk,
        "grad_s": t_grad,
        "device": str(jax.devices()[0]),
    }
    meter = SharpnessMeter(opt, problem)
    thr = opt.threshold
    # first use of the small ops the processes share (indexing, norms) outside the timings
    for cls in (DiscreteProcess, StableFlow, DiffraxStableFlow):
        cls(opt, problem, w_start, s_start, start).advance(2)

    # discrete: warm up the jitted scan without moving the process, then time it
    d = DiscreteProcess(opt, problem, w_start, s_start, start)
    tic = time.perf_counter()
    jax.block_until_ready(d._run(d.w, d.state, float(d.t), chunk)[0])
    compile_d = time.perf_counter() - tic
    wall_d = 0.0
    while d.t < start + steps:
        _, dt = _wall(d.advance, chunk)
        wall_d += dt
    res["discrete"] = {
        "wall_s": wall_d,
        "compile_and_first_chunk_s": compile_d,
        "grad_eq_per_unit": wall_d / steps / t_grad,
        "sharpness_end": meter(d.w, d.state, d.t) / thr,
    }

    # new stable flow
    sf = StableFlow(opt, problem, w_start, s_start, start)
    tic = time.perf_counter()
    sf.compile(chunk)
    compile_s = time.perf_counter() - tic
    wall_s, chunks = 0.0, []
    while sf.t < start + steps:
        _, dt = _wall(sf.advance, chunk)
        wall_s += dt
        chunks.append(round(dt, 3))
    st = sf.stats
    res["stable_new"] = {
        "wall_s": wall_s,
        "compile_s": compile_s,
        "x_discrete": wall_s / wall_d,
        "grad_eq_per_unit": wall_s / steps / t_grad,
        "chunk_wall_s": chunks,
        "stats": st,
        "sharpness_end": SharpnessMeter(opt, problem)(sf.w, sf.state, sf.t) / thr,
    }

    if legacy:
        units = steps if legacy_units is None else min(steps, legacy_units)
        units -= units % chunk
        lf = DiffraxStableFlow(opt, problem, w_start, s_start, start)
        tic = time.perf_counter()
        jax.block_until_ready(lf._run(lf.w, lf.state, float(lf.t), chunk, "explicit")[0])
        compile_l = time.perf_counter() - tic
        wall_l = 0.0
        while lf.t < start + units:
            _, dt = _wall(lf.advance, chunk)
            wall_l += dt
        per_unit = wall_l / units
        out = {
            "units_run": units,
            "wall_s": wall_l,
            "compile_s": compile_l,
            "wall_s_full_horizon": per_unit * steps,
            "extrapolated": units < steps,
            "x_discrete": per_unit * steps / wall_d,
            "grad_eq_per_unit": per_unit / t_grad,
            "tsit5_or_kvaerno_steps": lf.n_steps,
            "solver": lf.solver_name,
        }
        if units == steps:
            travelled = float(jnp.linalg.norm(lf.w - w_start))
            out["new_minus_old_rel"] = float(jnp.linalg.norm(sf.w - lf.w)) / travelled
            out["sharpness_end"] = SharpnessMeter(opt, problem)(lf.w, lf.state, lf.t) / thr
        res["stable_old"] = out
    return res


def _print(res: dict) -> None:
    d, new, old = res["discrete"], res["stable_new"], res.get("stable_old")
    st = new["stats"]
    print(
        f"\n{res['case']}: {res['optimizer']} {res['hyper']} on n = {res['n_params']}, "
        f"{res['units']} units from step {res['start']}; one gradient = "
        f"{1e3 * res['grad_s']:.2f} ms ({res['device']})"
    )
    print(f"{'process':<30}{'wall s':>9}{'x discrete':>12}{'grad-eq/unit':>14}{'compile s':>11}")
    print(
        f"{'discrete (jit, lax.scan)':<30}{d['wall_s']:>9.2f}{1.0:>12.2f}"
        f"{d['grad_eq_per_unit']:>14.1f}{d['compile_and_first_chunk_s']:>11.1f}"
    )
    if old:
        tag = " (extrapolated)" if old["extrapolated"] else ""
        print(
            f"{'stable, old (diffrax Tsit5)':<30}{old['wall_s_full_horizon']:>9.2f}"
            f"{old['x_discrete']:>12.2f}{old['grad_eq_per_unit']:>14.1f}{old['compile_s']:>11.1f}"
            f"{tag}"
        )
    print(
        f"{'stable, new (stiff-aware)':<30}{new['wall_s']:>9.2f}{new['x_discrete']:>12.2f}"
        f"{new['grad_eq_per_unit']:>14.1f}{new['compile_s']:>11.1f}"
    )
    print(
        f"new solver: {st['steps_explicit']} explicit + {st['steps_implicit']} implicit steps "
        f"({st['rejected']} rejected), {st['f_evals']} gradients, {st['jvps']} Jacobian-vector "
        f"products, {st['linearisations']} linearisations; switches {st['switches']}"
    )
    line = (
        f"effective sharpness / threshold at the end: discrete {d['sharpness_end']:.2f}, "
        f"stable (new) {new['sharpness_end']:.1f}"
    )
    if old and "sharpness_end" in old:
        line += (
            f", stable (old) {old['sharpness_end']:.1f}; "
            f"‖new − old‖ / travelled = {old['new_minus_old_rel']:.1e}"
        )
    print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="rnn,digits-gd,digits-rmsprop")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--legacy-units", type=int, default=None)
    ap.add_argument("--no-legacy", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.steps % args.chunk:
        sys.exit("--steps must be a multiple of --chunk")
    results = []
    with float64():
        for name in args.cases.split(","):
            res = run_case(name, args.steps, args.chunk, args.legacy_units, not args.no_legacy)
            _print(res)
            results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
