"""Classification criteria on logits: squared error on one-hot targets, cross-entropy.

Both are smooth in the logits (the central flow differentiates the loss three
times) and average over the scored predictions ``i = 1..m`` (examples, or
predicted positions of every sequence):

* ``mse``: ``L = ½ · mean_i ‖f_i − e_{y_i}‖²`` (squared error summed over the
  ``C`` outputs, averaged over predictions);
* ``ce``:  ``L = mean_i (logsumexp(f_i) − f_i[y_i])``.

:func:`supervised` turns a network (a parameter tree and its logits) into a
:class:`~flowgen.problems.base.Problem` with these criteria: the one place the
built-in networks flatten their parameters and describe themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flowgen.problems.base import Problem

__all__ = ["CRITERIA", "FORMULAS", "ce", "criterion_fn", "mse", "supervised"]


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


def supervised(
    name: str,
    params: Any,
    logits_of: Callable[[Any], jax.Array],
    targets: jax.Array,
    criterion: str,
    *,
    options: Mapping[str, Any],
    data: str,
    **facts: Any,
) -> Problem:
    """The built-in problem ``L(w) = criterion(logits_of(unravel(w)), targets)``.

    Args:
        name: the built-in's name (``info["builtin"]`` and the problem's name).
        params: the initial parameter tree; flattened with ``ravel_pytree`` into ``w0``.
        logits_of: maps a parameter tree to the logits, shape ``targets.shape``.
        targets: one-hot targets ``(m, C)``.
        criterion: ``"mse"`` or ``"ce"`` (checked by the caller).
        options: the constructor's checked options, as recorded in ``info``.
        data: the dataset's name (``"digits"``, ``"sorting"``).
        **facts: further plain facts for ``info`` (e.g. ``n_examples``).

    Returns:
        The problem; its ``info`` holds ``builtin``, ``options``, ``n_params``,
        ``data``, the facts and the loss as a formula, in that order.
    """
    w0, unravel = ravel_pytree(params)
    crit = criterion_fn(criterion)

    def loss(w: jax.Array) -> jax.Array:
        return crit(logits_of(unravel(w)), targets)

    info = {
        "builtin": name,
        "options": dict(options),
        "n_params": int(w0.shape[0]),
        "data": data,
        **facts,
        "loss": FORMULAS[criterion],
    }
    return Problem(name=name, loss=loss, w0=w0, unravel=unravel, info=info)
