"""Cost of one unit of central-flow time against one discrete step, with its split.

    python benchmarks/central_flow.py [--optimizer gd|rmsprop|adam] [--steps 50]

Measured side by side in one run on digits-mlp at the edge of stability (the
flows start from the discrete iterate at step 300 for GD, at step 560 for Adam
and RMSProp, after compilation warm-ups): discrete steps (jit + lax.scan),
the stable flow (diffrax) per unit time, and the central flow per unit time
(4 Euler substeps) split into eigensolver, third derivatives, SDCP and rates.
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402

import flowgen  # noqa: E402
from flowgen.problems import get_problem  # noqa: E402
from flowgen.runtime.central import CentralFlow  # noqa: E402
from flowgen.runtime.processes import DiscreteProcess, StableFlow  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "gd": (dict(lr=0.4), 300),
    "rmsprop": (dict(lr=3e-4, beta2=0.99), 560),
    "adam": (dict(lr=3e-3, beta1=0.9, beta2=0.99), 560),
}


def timed(fn, *a):
    tic = time.perf_counter()
    out = fn(*a)
    jax.block_until_ready(getattr(out, "w", out))
    return out, time.perf_counter() - tic


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="gd", choices=sorted(SETTINGS))
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    hyper, start = SETTINGS[args.optimizer]
    prob = get_problem("digits-mlp")
    opt = flowgen.load(ROOT / "optimizers" / f"{args.optimizer}.opt").optimizer(**hyper)
    disc = DiscreteProcess(opt, prob, prob.w0)
    disc.advance(start)
    K = args.steps
    d2 = DiscreteProcess(opt, prob, disc.w, disc.state, start)
    d2.advance(K)  # compile
    _, t_disc = timed(d2.advance, K)
    st = StableFlow(opt, prob, disc.w, disc.state, start)
    st.advance(K)  # compile
    _, t_stable = timed(st.advance, K)
    cf = CentralFlow(opt, prob, disc.w, disc.state, start)
    cf.advance(5)  # compile
    for k in cf.timings:
        cf.timings[k] = 0.0
    ch, t_central = timed(cf.advance, K)
    per = {k: v / K for k, v in cf.timings.items()}
    other = t_central / K - sum(per.values())
    print(
        f"{args.optimizer} on digits-mlp (n = {prob.n}), {K} units of time from step {start}, "
        f"critical directions {int(ch.n_crit.min())}–{int(ch.n_crit.max())}"
    )
    print(f"{'process':<34}{'s per step':>12}{'x discrete':>12}")
    rows = [
        ("discrete step (jit, lax.scan)", t_disc / K),
        ("stable flow (diffrax), per unit", t_stable / K),
        ("central flow, per unit (4 substeps)", t_central / K),
    ]
    for name, v in rows:
        print(f"{name:<34}{v:>12.5f}{v / (t_disc / K):>12.1f}")
    print("central flow split (per unit of time):")
    for k, v in [*per.items(), ("other (python, records)", other)]:
        print(f"  {k:<32}{v:>12.5f}{100 * v / (t_central / K):>11.0f}%")
    print(
        f"validate (three processes) ≈ {(t_disc + t_stable + t_central) / K:.3f} s per step "
        "(plus the discrete run's sharpness measurement)"
    )


if __name__ == "__main__":
    main()
