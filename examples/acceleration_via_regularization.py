"""The talk's "acceleration via regularization", measured: RMSProp on digits-mlp, lr over a decade.

    python examples/acceleration_via_regularization.py          # the sweep, then the analysis
    python examples/acceleration_via_regularization.py --resume # continue an interrupted sweep

1. ``flowgen.sweep``: RMSProp (β₂ = 0.99) at lr = 1e-4, 2e-4, 5e-4, 1e-3, the four
   discrete runs batched with ``jax.vmap``; train loss, raw sharpness ``λ_max(H)`` and
   the harmonic mean of the effective step sizes ``n / Σ 1/p_i`` per step
   (``examples/figures/acceleration/sweep.json``, ``sweep.png``).
2. At each run's last iterate, the stationary preconditioner ``P*(w)`` (the SDP of the
   talk, polished by Newton on its KKT system) and its implicit curvature penalty
   ``½∇⟨H, Σ*⟩``, and how each term of the stationary flow
   ``dw/dt = −P*⁻¹[∇L + ½∇⟨H,Σ*⟩]`` moves the raw sharpness: with ``u`` the top
   eigenvector of ``H``, ``dλ_max/dt = ∇(uᵀHu) · dw/dt`` split into the gradient's part
   (progressive sharpening) and the penalty's part
   (``examples/figures/acceleration/penalty.json``, printed as a table).

Takes a few minutes on 2 CPU cores.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import flowgen
from flowgen.precision import float64
from flowgen.problems import get_problem
from flowgen.runtime import derivatives, eigen
from flowgen.runtime.stationary import (
    curvature_penalty,
    harmonic_mean,
    kkt_from_sdp,
    kkt_polish,
    stationary_form,
    stationary_sdp,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "figures" / "acceleration"
LRS = [1e-4, 2e-4, 5e-4, 1e-3]
BETA2 = 0.99
STEPS = 1500


def penalty_analysis(problem, lr: float, w) -> dict:
    """P*(w), Σ*'s penalty and their effect on λ_max(H) at ``w`` (module docstring)."""
    opt = flowgen.load(ROOT / "optimizers" / "rmsprop.opt").optimizer(lr=lr, beta2=BETA2)
    form, _ = stationary_form(opt)
    w = jnp.asarray(w)
    sdp = stationary_sdp(
        problem.loss, w, form.lr, eps=form.eps, threshold=opt.threshold, alpha=form.alpha,
        const=form.const, k=12, tol=1e-7,
    )  # fmt: skip
    P, V = kkt_from_sdp(sdp, problem.loss, w)
    kp = kkt_polish(problem.loss, w, form, P, V, ~sdp.dead, tol=1e-10)
    pen = curvature_penalty(problem.loss, w, form, kp)  # (n,) ½∇⟨H,Σ*⟩
    g = np.asarray(jax.grad(problem.loss)(w))
    Pinv = np.where(sdp.dead, 0.0, 1.0 / kp.P)
    # the top eigenvector of H and ∇λ_max = ∇(uᵀHu)
    mv = eigen.sym_eff_hessian_matvec(problem.loss, w, jnp.ones(problem.n))
    est = eigen.top_eigenpairs(mv, problem.n, 1, tol=1e-9)
    grad_lam = np.asarray(derivatives.third_contractions(problem.loss, w, est.vecs)[0, 0])
    rate_grad = float(grad_lam @ (-Pinv * g))  # dλ_max/dt from −P*⁻¹∇L
    rate_pen = float(grad_lam @ (-Pinv * pen))  # dλ_max/dt from −P*⁻¹ ½∇⟨H,Σ*⟩
    return {
        "lr": lr,
        "lambda_max_H": float(est.vals[0]),
        "n_binding": int(kp.k),
        "trace_P_star": float(np.sum(kp.P[~sdp.dead])),
        "hmean_stationary": harmonic_mean(Pinv[~sdp.dead]),
        "penalty_over_grad": float(np.linalg.norm(pen) / np.linalg.norm(g)),
        "dlambda_dt_gradient": rate_grad,
        "dlambda_dt_penalty": rate_pen,
        "kkt_residual": float(kp.residual),
    }


def main(resume: bool = False) -> None:
    tic = time.perf_counter()
    res = flowgen.sweep(
        ["optimizers/rmsprop.opt"],
        "digits-mlp",
        STEPS,
        lr=LRS,
        beta2=BETA2,
        eig_every=10,
        chunk=100,
        out=OUT,
        resume=resume,
        progress=lambda ph, d, n: print(f"  {ph}: {d}/{n}", end="\r", flush=True),
    )
    print(f"\nsweep: {time.perf_counter() - tic:.0f} s, {res.batching[0]['mode']}")
    head = ("lr", "loss", "mean loss", "λmax(H)", "λmax(P⁻¹H)", "hmean p")
    print(" ".join(f"{h:>10}" for h in head))
    for r in res.runs:
        f = r["final"]
        print(
            f"{r['hyper']['lr']:10.0e} {f['loss']:10.4g} {f['mean_loss']:10.4g} "
            f"{f['sharpness']:9.4g} {f['effective_sharpness']:11.4g} "
            f"{f['harmonic_mean_step']:10.4g}"
        )
    problem = get_problem("digits-mlp")
    rows = []
    with float64():
        for r in res.runs:
            rows.append(penalty_analysis(problem, r["hyper"]["lr"], res.w_final[r["name"]]))
            print(json.dumps(rows[-1]))
    (OUT / "penalty.json").write_text(
        json.dumps({"steps": STEPS, "at_final_iterate": rows}, indent=1)
    )
    shutil.rmtree(OUT / "checkpoints", ignore_errors=True)  # the sweep is complete
    print(f"total {time.perf_counter() - tic:.0f} s; wrote {OUT}")


if __name__ == "__main__":
    main(resume="--resume" in sys.argv[1:])
