"""``flowgen validate`` on a problem with more than 10⁶ parameters: time per step, peak memory.

    python benchmarks/million.py                 # mlp width 1024: 64 → 1024 → 1024 → 4
    python benchmarks/million.py --width 1400 --steps 300 --json

GD (lr 0.4) on the digits MLP widened to ``--width`` (``keep_constant=true``:
all 64 pixels, 400 examples, MSE), restarted 100 steps after the edge of
stability, with the discrete run's effective sharpness every ``--eig-every``
steps. Reports the parameter count, the device, the wall time per step of each
process (discrete, central flow, stable flow, sharpness measurements), the
time of one gradient (the unit the cost model counts in), the verdict and the
peak resident memory of the process (``ru_maxrss``: everything, including XLA's
buffers and compiled code). Runs are checkpointed in ``--out`` and resume.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flowgen  # noqa: E402
from flowgen.precision import float64  # noqa: E402
from flowgen.problems import get_problem  # noqa: E402


def gradient_seconds(prob, repeat: int = 10) -> float:
    g = jax.jit(jax.grad(prob.loss))
    jax.block_until_ready(g(prob.w0))
    best = float("inf")
    for _ in range(repeat):
        tic = time.perf_counter()
        jax.block_until_ready(g(prob.w0))
        best = min(best, time.perf_counter() - tic)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.4)
    ap.add_argument("--eig-every", type=int, default=5)
    ap.add_argument("--restart-at", default="auto", help="T or auto (100 steps after the edge)")
    ap.add_argument(
        "--substeps", type=int, default=None, help="central-flow substeps (validate's default)"
    )
    ap.add_argument("--out", default=str(ROOT / "runs" / "million"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    opts = {"width": args.width, "keep_constant": True}
    with float64():
        prob = get_problem("mlp", **opts)
        g_s = gradient_seconds(prob)
        out = Path(args.out)
        tic = time.perf_counter()
        res = flowgen.load(ROOT / "optimizers" / "gd.opt").validate(
            "mlp",
            problem_options=opts,
            steps=args.steps,
            restart_at=args.restart_at if args.restart_at == "auto" else int(args.restart_at),
            eig_every=args.eig_every,
            substeps=args.substeps,
            out=out,
            resume=(out / "checkpoint.npz").exists(),
            lr=args.lr,
        )
        wall = time.perf_counter() - tic
    tm = res.timings
    N, S = args.steps, res.start
    flows = max(N - S, 1)
    report = {
        "problem": f"mlp width={args.width} keep_constant=true",
        "n_params": prob.n,
        "device": str(jax.devices()[0]),
        "devices": res.devices,
        "steps": N,
        "eos_start": res.eos_start,
        "flows_from": S,
        "gradient_ms": 1e3 * g_s,
        "wall_s": wall,
        "per_step_ms": {
            "discrete": 1e3 * tm.get("discrete_s", 0.0) / N,
            "central": 1e3 * tm.get("central_s", 0.0) / flows,
            "stable": 1e3 * tm.get("stable_s", 0.0) / flows,
            "sharpness": 1e3 * tm.get("discrete_sharpness_s", 0.0) / N,
        },
        "central_per_step_gradients": tm.get("central_s", 0.0) / flows / g_s,
        "summary": res.summary,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    ps = report["per_step_ms"]
    sm = res.summary
    print(f"{report['problem']}: n = {prob.n:,} parameters on {report['device']}")
    print(f"  one gradient {report['gradient_ms']:.1f} ms; wall {wall:.0f} s for {N} steps")
    print(f"  eos_start {res.eos_start}, flows from step {S}")
    print(
        f"  per step: discrete {ps['discrete']:.0f} ms, central flow {ps['central']:.0f} ms "
        f"({report['central_per_step_gradients']:.1f} gradients), stable flow "
        f"{ps['stable']:.0f} ms, sharpness {ps['sharpness']:.0f} ms"
    )
    print(
        f"  central {sm['central_distance_rel']:.3f} vs stable {sm['stable_distance_rel']:.3f}, "
        f"loss error {100 * sm['loss_pred_rel_err']:.1f} % — {sm['verdict']}"
    )
    print(f"  peak resident memory {report['peak_rss_gb']:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
