"""Train a model in your own optax loop with an optimizer derived by flowgen.

optax does not ship Adan; ``optimizers/adan.opt`` describes it in eight lines,
and flowgen turns the file into an ``optax.GradientTransformation`` that works
on any pytree of parameters and chains like any other. Here it trains a
two-layer MLP on scikit-learn's digits (10 classes, 64 pixels) in float32 with
minibatches, behind optax's global-norm clipping:

    python examples/train_with_adan.py

About 10 s of training on one CPU core; test accuracy ≈ 0.98.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import flowgen

ROOT = Path(__file__).resolve().parents[1]


def data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)  # (1797, 64)
    perm = np.random.default_rng(seed).permutation(len(y))
    X, y = X[perm], y[perm]
    n_test = 360
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test])


def init_params(key, sizes=(64, 64, 10)):
    """{"W1": (64, 64), "b1": (64,), "W2": (64, 10), "b2": (10,)}, LeCun-normal, float32."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        key, sub = jax.random.split(key)
        scale = 1.0 / float(np.sqrt(fan_in))  # a Python float keeps float32
        params[f"W{i}"] = scale * jax.random.normal(sub, (fan_in, fan_out), jnp.float32)
        params[f"b{i}"] = jnp.zeros(fan_out, jnp.float32)
    return params


def logits(params, X):
    h = jnp.tanh(X @ params["W1"] + params["b1"])  # (batch, 64)
    return h @ params["W2"] + params["b2"]  # (batch, 10)


def loss_fn(params, X, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, X), y).mean()


def train(steps: int = 600, lr: float = 3e-3, batch: int = 128, seed: int = 0, log=print):
    """Minibatch training with Adan from ``optimizers/adan.opt``; returns the test accuracy."""
    (Xtr, ytr), (Xte, yte) = data(seed)
    adan = flowgen.load(ROOT / "optimizers" / "adan.opt").optax(lr=lr, weight_decay=0.02)
    tx = optax.chain(optax.clip_by_global_norm(1.0), adan)
    params = init_params(jax.random.PRNGKey(seed))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, X, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    tic = time.perf_counter()
    for k in range(1, steps + 1):
        idx = rng.choice(len(ytr), batch, replace=False)
        params, opt_state, loss = step(params, opt_state, Xtr[idx], ytr[idx])
        if k % 100 == 0 or k == 1:
            log(f"step {k:4d}  minibatch loss {float(loss):.4f}")
    acc = float(jnp.mean(jnp.argmax(logits(params, Xte), axis=1) == yte))
    log(f"test accuracy {acc:.3f} after {steps} steps ({time.perf_counter() - tic:.1f} s)")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    return acc


if __name__ == "__main__":
    train()
