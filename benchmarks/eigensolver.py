"""Top-eigenpair solvers on a realistic operator: the Hessian of a small MLP.

Compares, on a tanh MLP 54→32→32→4 (400 random examples, MSE, n = 2948):

* ``jax.experimental.sparse.linalg.lobpcg_standard``, cold (random start);
* the same, warm-started from the previous eigenvectors after one GD step
  of size 1/λ_max (a realistic change between two central-flow substeps);
* ``flowgen.runtime.eigen.top_eigenpairs`` (block LOBPCG, k + 2 columns,
  one block of HVPs per iteration), cold and warm;
* dense ``numpy.linalg.eigh`` of the full Hessian (the reference).

Run: ``python benchmarks/eigensolver.py [--k 1 4] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--single-thread" in sys.argv:  # must happen before jax starts its CPU backend
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.sparse.linalg import lobpcg_standard  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowgen.runtime.eigen import (  # noqa: E402
    hvp,
    sym_eff_hessian_matvec,
    top_eigenpairs_with_info,
)

jax.config.update("jax_enable_x64", True)


def make_mlp_loss(sizes=(54, 32, 32, 4), n_examples=400, seed=0):
    """A tanh MLP with MSE loss on random data; returns ``(loss(w_flat), w0_flat)``."""
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.normal(size=(n_examples, sizes[0])))  # (N, d_in)
    Y = jnp.asarray(rng.normal(size=(n_examples, sizes[-1])))  # (N, d_out)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        params.append((jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)), jnp.zeros(b)))
    w0, unravel = ravel_pytree(params)

    def loss(w):
        h = X
        layers = unravel(w)
        for i, (W, b) in enumerate(layers):
            h = h @ W + b
            if i < len(layers) - 1:
                h = jnp.tanh(h)
        return 0.5 * jnp.mean(jnp.sum((h - Y) ** 2, axis=1))

    return loss, w0


def dense_hessian(loss, w, chunk=256):
    n = w.shape[0]
    f = jax.jit(jax.vmap(lambda v: hvp(loss, w, v), in_axes=1, out_axes=1))
    eye = jnp.eye(n)
    cols = [f(eye[:, i : i + chunk]) for i in range(0, n, chunk)]
    H = np.asarray(jnp.concatenate(cols, axis=1))
    return 0.5 * (H + H.T)


def timed(fn, repeats):
    """Run ``fn`` once to compile, then ``repeats`` times; return (out, min time, median time)."""
    out = fn()
    jax.block_until_ready(out)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t)
    return out, float(np.min(ts)), float(np.median(ts))


def rel_err(vals, ref):
    vals = np.sort(np.asarray(vals))[::-1]
    return float(np.max(np.abs(vals - ref) / np.abs(ref)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4])
    ap.add_argument(
        "--tol",
        type=float,
        nargs="+",
        default=[1e-7, 1e-4],
        help="residual tolerance relative to λ_max",
    )
    ap.add_argument(
        "--step",
        type=float,
        default=0.1,
        help="perturbation before the warm solve: GD step of size step/λ_max",
    )
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument(
        "--single-thread",
        action="store_true",
        help="XLA CPU with one intra-op thread (set before jax starts)",
    )
    args = ap.parse_args(argv)

    loss, w0 = make_mlp_loss()
    n = w0.shape[0]
    print(
        f"MLP 54-32-32-4 tanh, 400 random examples, MSE: n = {n}; jax {jax.__version__}, "
        f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '').strip() or '(default)'}"
    )

    t = time.perf_counter()
    H0 = dense_hessian(loss, w0)
    t_hess = time.perf_counter() - t
    t = time.perf_counter()
    ev0 = np.linalg.eigvalsh(H0)[::-1]
    t_eigh = time.perf_counter() - t
    lam = ev0[0]
    w1 = w0 - (args.step / lam) * jax.grad(loss)(w0)
    ev1 = np.linalg.eigvalsh(dense_hessian(loss, w1))[::-1]
    print(f"top eigenvalues at w0: {np.array2string(ev0[:6], precision=4)}; smallest {ev0[-1]:.4g}")
    print(f"at w1 = w0 - ({args.step}/λ_max)·∇L: {np.array2string(ev1[:6], precision=4)}")

    op0 = sym_eff_hessian_matvec(loss, w0, 1.0)
    op1 = sym_eff_hessian_matvec(loss, w1, 1.0)

    @jax.jit
    def one_block(op, V):
        return jax.vmap(op, in_axes=1, out_axes=1)(V)

    mv = []
    for b in (1, 3, 6, 16):
        _, tb, _ = timed(lambda b=b: one_block(op0, jnp.ones((n, b))), 20)
        mv.append(f"{b} cols {1e3 * tb:.2f} ms")
    print("HVP block: " + ", ".join(mv))
    print(
        f"dense Hessian ({n} HVPs in blocks of 256): {t_hess:.2f} s; numpy eigvalsh: {t_eigh:.2f} s"
    )

    @jax.jit
    def jax_lobpcg(op, X, tol):
        block = jax.vmap(op, in_axes=1, out_axes=1)
        return lobpcg_standard(block, X, 1000, tol)

    rows = []
    for k in args.k:
        X0 = jax.random.normal(jax.random.PRNGKey(1), (n, k))
        for tol in args.tol:
            # lobpcg_standard: converged when ‖r‖ < tol'·10·n·(‖Av‖+θ) ≈ tol'·20·n·λ
            tol_j = tol / (20.0 * n)
            (th, U, it), t1, t2 = timed(lambda X0=X0, t=tol_j: jax_lobpcg(op0, X0, t), args.repeats)
            rows.append(
                (
                    k,
                    tol,
                    "lobpcg_standard cold",
                    t1,
                    t2,
                    4 * k * int(it) + k,
                    int(it),
                    rel_err(th, ev0[:k]),
                )
            )
            (th1, _, it1), t1, t2 = timed(lambda U=U, t=tol_j: jax_lobpcg(op1, U, t), args.repeats)
            rows.append(
                (
                    k,
                    tol,
                    "lobpcg_standard warm",
                    t1,
                    t2,
                    4 * k * int(it1) + k,
                    int(it1),
                    rel_err(th1, ev1[:k]),
                )
            )

            (s, info), t1, t2 = timed(
                lambda k=k, tol=tol: top_eigenpairs_with_info(op0, n, k, tol=tol), args.repeats
            )
            rows.append(
                (
                    k,
                    tol,
                    "flowgen top_eigenpairs cold",
                    t1,
                    t2,
                    int(info.matvecs),
                    int(info.iterations),
                    rel_err(s.vals, ev0[:k]),
                )
            )
            (s1, info1), t1, t2 = timed(
                lambda k=k, tol=tol, s=s: top_eigenpairs_with_info(op1, n, k, init=s.vecs, tol=tol),
                args.repeats,
            )
            rows.append(
                (
                    k,
                    tol,
                    "flowgen top_eigenpairs warm",
                    t1,
                    t2,
                    int(info1.matvecs),
                    int(info1.iterations),
                    rel_err(s1.vals, ev1[:k]),
                )
            )
        rows.append((k, None, "dense (HVP Hessian + eigvalsh)", t_hess + t_eigh, None, n, 0, 0.0))

    print()
    hdr = (
        f"{'k':>2} {'res.tol':>7}  {'solver':<31} {'min ms':>8} {'median ms':>10} "
        f"{'matvecs':>8} {'iters':>6} {'max rel.eig.err':>16}"
    )
    print(hdr)
    print("-" * len(hdr))
    for k, tol, name, t1, t2, nmv, it, err in rows:
        tols = "-" if tol is None else f"{tol:.0e}"
        med = "-" if t2 is None else f"{1e3 * t2:10.1f}"
        print(
            f"{k:>2} {tols:>7}  {name:<31} {1e3 * t1:8.1f} {med:>10} {nmv:>8} {it:>6} {err:>16.2e}"
        )


if __name__ == "__main__":
    main()
