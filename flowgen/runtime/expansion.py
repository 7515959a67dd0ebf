"""Is an oscillation small enough for the central flow's second-order time average?

The central flow replaces the time average of the gradient over an oscillation
``w_t = w̄ + δ_t`` (``mean δ_t = 0``) by its expansion to second order::

    mean ∇L(w_t) = ∇L(w̄) + ½ ∇³L[C] + Σ_{j≥3} (1/j!) mean ∇^{j+1}L[δ_t^j],   C = mean δ_t δ_tᵀ.

:func:`expansion_check` measures, on iterates of a discrete run, how large the
terms it drops are against the average itself. Where the residual is a few
percent or less the flow's drift is the run's; where it is comparable to the
average (the oscillation is wide against the scale on which the curvature
changes, or ``∇L(w̄)`` and ``½∇³L[C]`` nearly cancel) no flow that expands to
second order can follow the run, however it is integrated.

Every derivative is exact (nested forward-mode JAX over ``jax.grad``); the
window's terms are evaluated with one ``vmap`` per order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import SimulationError, UsageError
from flowgen.precision import in_float64

__all__ = ["ExpansionCheck", "ExpansionChecker", "expansion_check"]


@dataclass(frozen=True)
class ExpansionCheck:
    """The time-averaged gradient over one window against its Taylor expansion.

    Attributes:
        width: iterates in the window.
        rms: ``sqrt(mean ‖δ_t‖²)``, the oscillation's size.
        mean_grad: ``‖mean ∇L(w_t)‖``, what the run's average moves by (per unit lr).
        grad_at_mean: ``‖∇L(w̄)‖``.
        terms: ``‖(1/j!) mean ∇^{j+1}L[δ^j]‖`` for ``j = 2 … order`` (``j = 2`` is
            ``½∇³L[C]``, the central flow's implicit term).
        residual: ``‖mean ∇L(w_t) − expansion to order j‖`` for ``j = 2 … order``.
    """

    width: int
    rms: float
    mean_grad: float
    grad_at_mean: float
    terms: tuple[float, ...]
    residual: tuple[float, ...]

    @property
    def relative(self) -> float:
        """The second-order expansion's error relative to the average: the central
        flow's drift error where the oscillation is measured exactly."""
        return self.residual[0] / self.mean_grad if self.mean_grad > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain data (for ``--json``): the fields and ``relative``."""
        return {**asdict(self), "relative": self.relative}


def _directional(grad: Callable, j: int) -> Callable:
    """``(w, v) ↦ ∇^{j+1}L(w)[v^j]``: ``j`` nested forward derivatives of the gradient."""
    if j == 0:
        return lambda w, v: grad(w)
    inner = _directional(grad, j - 1)
    return lambda w, v: jax.jvp(lambda x: inner(x, v), (w,), (v,))[1]


class ExpansionChecker:
    """:func:`expansion_check` for one loss, its compiled derivatives kept between calls
    (one compilation per window width and order)."""

    def __init__(self, loss: Callable[[jax.Array], jax.Array], order: int = 2):
        if not 2 <= order <= 5:
            raise UsageError(f"order must be between 2 and 5, got {order}")
        self.order = int(order)
        grad = jax.grad(loss)
        self._grads = jax.jit(jax.vmap(grad))
        self._grad = jax.jit(grad)
        self._terms = [
            jax.jit(jax.vmap(_directional(grad, j), in_axes=(None, 0)))
            for j in range(2, self.order + 1)
        ]

    @in_float64
    def __call__(self, iterates: np.ndarray) -> ExpansionCheck:
        w = np.asarray(iterates, dtype=np.float64)
        if w.ndim != 2 or w.shape[0] < 2:
            raise UsageError(
                f"expansion_check needs a (W ≥ 2, n) array of iterates, got shape {w.shape}"
            )
        if not np.all(np.isfinite(w)):
            raise SimulationError(
                "expansion_check: the iterates contain NaN or inf",
                hint="check the window: the run diverged before it",
            )
        wbar = w.mean(0)
        delta = w - wbar
        mean_grad = np.asarray(self._grads(jnp.asarray(w))).mean(0)
        at_mean = np.asarray(self._grad(jnp.asarray(wbar)))
        model = at_mean.copy()
        terms, residual = [], []
        for j, d_j in enumerate(self._terms, start=2):
            term = np.asarray(d_j(jnp.asarray(wbar), jnp.asarray(delta))).mean(0)
            term = term / math.factorial(j)
            model = model + term
            terms.append(float(np.linalg.norm(term)))
            residual.append(float(np.linalg.norm(mean_grad - model)))
        return ExpansionCheck(
            width=int(w.shape[0]),
            rms=float(np.sqrt(np.mean(np.sum(delta**2, axis=1)))),
            mean_grad=float(np.linalg.norm(mean_grad)),
            grad_at_mean=float(np.linalg.norm(at_mean)),
            terms=tuple(terms),
            residual=tuple(residual),
        )


def expansion_check(
    loss: Callable[[jax.Array], jax.Array], iterates: np.ndarray, order: int = 2
) -> ExpansionCheck:
    """Compare ``mean ∇L(w_t)`` over ``iterates`` (shape ``(W, n)``) with its expansion
    around ``w̄ = mean w_t`` to ``order`` (2 = the central flow's; up to 5).

    Use a window of whole periods (an even width for GD's period-two oscillation),
    so that ``w̄`` is the average the flow describes. To check many windows of one
    loss, keep an :class:`ExpansionChecker` (it compiles once).
    """
    return ExpansionChecker(loss, order)(iterates)
