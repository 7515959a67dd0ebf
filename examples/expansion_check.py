"""Is the oscillation small enough for a second-order flow? Measure it on the discrete run.

    python examples/expansion_check.py                                  # mamba, GD lr 0.3
    python examples/expansion_check.py --problem mlp --set lr=0.4 --at 200 300 400 500
    python examples/expansion_check.py --opt optimizers/gd.opt --set lr=0.2 --steps 800 \\
        --at 450 600 700 780 --json

Runs the discrete optimizer from the problem's start, and in a window of
``--window`` iterates around each time in ``--at`` compares the time-averaged
gradient with its expansion around the window's mean iterate
(:class:`flowgen.runtime.expansion.ExpansionChecker`): the second-order model
``∇L(w̄) + ½∇³L[C]`` is the central flow's, with the oscillation's covariance
``C`` measured instead of predicted. Its relative residual is the error of the
flow's drift that no choice of Σ and no integrator can remove. The terms of
order 3 to ``--order`` show whether the series converges at this amplitude.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import flowgen
from flowgen.cli import parse_sets
from flowgen.errors import FlowgenError
from flowgen.problems import get_problem, parse_problem_options
from flowgen.runtime.expansion import ExpansionChecker
from flowgen.runtime.processes import DiscreteProcess

ROOT = Path(__file__).resolve().parent.parent


def _percent(x: float) -> str:
    return f"{100 * x:.2g} %"


def _measure(args, hyper: dict, half: int) -> list[dict]:
    """Run the discrete optimizer and check the expansion in each window."""
    with flowgen.float64():
        options = parse_problem_options(args.problem_opt, args.problem)
        problem = get_problem(args.problem, **options)
        opt = flowgen.load(args.opt).optimizer(**hyper)
        proc = DiscreteProcess(opt, problem, problem.w0)
        chunks = -(-args.steps // 50)
        iterates = np.concatenate([np.asarray(proc.advance(50).w) for _ in range(chunks)])
        check = ExpansionChecker(problem.loss, args.order)
        rows = []
        for t in args.at:  # iterates[i] is the iterate after step i + 1
            window = iterates[t - half - 1 : t + half - 1]
            rows.append({"t": t, **check(window).as_dict()})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opt", default=str(ROOT / "optimizers" / "gd.opt"))
    ap.add_argument("--problem", default="mamba")
    ap.add_argument("--problem-opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--steps", type=int, default=640)
    ap.add_argument("--at", type=int, nargs="+", default=[300, 420, 500, 580])
    ap.add_argument("--window", type=int, default=20, help="iterates per window (even for GD)")
    ap.add_argument("--order", type=int, default=4, help="expand up to this order (2..5)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    half = args.window // 2
    if args.window < 2 or any(t - half < 1 or t + half > args.steps for t in args.at):
        ap.error(f"every --at time needs {half} steps on each side within 1..--steps")
    try:
        hyper = parse_sets(args.set) or {"lr": 0.3}  # flowgen's own --set rules
        rows = _measure(args, hyper, half)
    except FlowgenError as err:
        print(err.format(), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"problem": args.problem, "hyper": hyper, "rows": rows}, indent=1))
        return 0
    title = f"{Path(args.opt).stem} on {args.problem} {hyper}: mean ∇L(w_t) against its expansion"
    table = Table(title=title)
    for col in ("step", "rms δ", "‖mean ∇L‖", "‖∇L(w̄)‖", "‖½∇³L[C]‖", "error, order 2"):
        table.add_column(col, justify="right")
    for j in range(3, args.order + 1):
        table.add_column(f"order {j}", justify="right")
    for r in rows:
        table.add_row(
            str(r["t"]),
            f"{r['rms']:.3g}",
            f"{r['mean_grad']:.3g}",
            f"{r['grad_at_mean']:.3g}",
            f"{r['terms'][0]:.3g}",
            _percent(r["relative"]),
            *(_percent(x / r["mean_grad"]) for x in r["residual"][1:]),
        )
    Console().print(table)
    print(
        "error, order j: ‖mean ∇L(w_t) − expansion to order j‖ / ‖mean ∇L(w_t)‖ "
        "(order 2 is the central flow's drift with the measured covariance)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
