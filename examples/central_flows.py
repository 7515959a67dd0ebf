"""Reproduce the central-flow picture (Cohen, Damian et al., ICLR 2025) on digits-mlp.

    python examples/central_flows.py gd        # GD, lr 0.4, restarted at step 300
    python examples/central_flows.py rmsprop   # RMSProp, lr 3e-4, beta2 0.99
    python examples/central_flows.py adam      # Adam, lr 1e-3, beta1 0.9, beta2 0.99
    python examples/central_flows.py ogd       # optimistic GD (a delay state), lr 0.2
    python examples/central_flows.py adan      # Adan (previous gradient), lr 1e-3
    python examples/central_flows.py all

Each run writes examples/figures/<name>/validate.png (loss, effective
sharpness, distances, Sigma) and report.json, and prints the summary.
Each takes a few minutes on 2 CPU cores.
"""

import sys
import time
from pathlib import Path

import flowgen

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SETTINGS = {
    "gd": dict(file="gd.opt", steps=1000, restart_at=300, hyper=dict(lr=0.4)),
    "rmsprop": dict(
        file="rmsprop.opt", steps=1100, restart_at="auto", hyper=dict(lr=3e-4, beta2=0.99)
    ),
    "scalar_rmsprop": dict(
        file="scalar_rmsprop.opt", steps=1100, restart_at="auto", hyper=dict(lr=0.01, beta2=0.99)
    ),
    "adam": dict(
        file="adam.opt", steps=1400, restart_at="auto", hyper=dict(lr=1e-3, beta1=0.9, beta2=0.99)
    ),
    # rules that keep the previous gradient in a delay state
    "ogd": dict(file="ogd.opt", steps=1000, restart_at="auto", hyper=dict(lr=0.2)),
    "adan": dict(file="adan.opt", steps=1500, restart_at="auto", hyper=dict(lr=1e-3)),
    # larger step: the discrete loss bursts around the prediction (distances pass, loss 16 %)
    "adam_lr3e-3": dict(
        file="adam.opt", steps=1200, restart_at="auto", hyper=dict(lr=3e-3, beta1=0.9, beta2=0.99)
    ),
}


def main(names):
    for name in names:
        s = SETTINGS[name]
        opt = flowgen.load(ROOT / "optimizers" / s["file"])
        tic = time.perf_counter()
        res = opt.validate(
            "digits-mlp",
            steps=s["steps"],
            restart_at=s["restart_at"],
            out=HERE / "figures" / name,
            **s["hyper"],
        )
        sm = res.summary
        print(
            f"{name}: eos_start {res.eos_start}, flows from step {res.start}: central "
            f"{sm['central_distance_rel']:.3f} vs stable {sm['stable_distance_rel']:.3f}, "
            f"loss error {sm['loss_pred_rel_err']:.3f}, verdict {sm['verdict']} "
            f"({time.perf_counter() - tic:.0f} s)"
        )


if __name__ == "__main__":
    args = sys.argv[1:] or ["gd"]
    main(list(SETTINGS) if args == ["all"] else args)
