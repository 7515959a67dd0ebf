"""Classification criteria on logits: squared error on one-hot targets, cross-entropy.

Both are smooth in the logits (the central flow differentiates the loss three
times) and average over the scored predictions ``i = 1..m`` (examples, or
predicted positions of every sequence):

* ``mse``: ``L = ½ · mean_i ‖f_i − e_{y_i}‖²`` (squared error summed over the
  ``C`` outputs, averaged over predictions);
* ``ce``:  ``L = mean_i (logsumexp(f_i) − f_i[y_i])``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["CRITERIA", "FORMULAS", "ce", "criterion_fn", "mse"]


def mse(logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """``½ · mean_i Σ_k (f_ik − y_ik)²``; ``logits`` and ``onehot`` (m, C)."""
    return 0.5 * jnp.mean(jnp.sum((logits - onehot) ** 2, axis=1))


def ce(logits: jax.Array, onehot: jax.Array) -> jax.Array:
    """``mean_i (logsumexp_k f_ik − Σ_k y_ik f_ik)``; ``logits`` and ``onehot`` (m, C)."""
    picked = jnp.sum(logits * onehot, axis=1)  # (m,) the target's logit
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


CRITERIA: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"mse": mse, "ce": ce}

#: The loss as a formula, for a problem's ``info["loss"]``.
FORMULAS = {
    "mse": "0.5 * mean_i sum_k (f(x_i)_k - y_ik)^2",
    "ce": "mean_i (logsumexp_k f(x_i)_k - f(x_i)_{y_i})",
}


def criterion_fn(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The criterion called ``name`` (``"mse"`` or ``"ce"``; checked by the caller)."""
    return CRITERIA[name]
