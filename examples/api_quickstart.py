"""The Python API in a few lines: derive, generate, run.

python examples/api_quickstart.py
"""

from pathlib import Path

import flowgen

ROOT = Path(__file__).resolve().parent.parent

adam = flowgen.load(ROOT / "optimizers" / "adam.opt")
spec = adam.derive(beta1=0.9)
print("threshold on lambda_max(P^-1 H):", spec.stability.threshold, "=", spec.threshold)
print("dv/dt =", spec.state("v").drift)

source = adam.codegen(lr=3e-3)  # the generated JAX module, as text
print(source.splitlines()[0])

res = adam.run("digits-mlp", steps=100, lr=3e-3, beta2=0.99, eig_every=10)
s = res.series
print(f"final loss: discrete {s['loss_discrete'][-1]:.4g}, stable flow {s['loss_stable'][-1]:.4g}")
