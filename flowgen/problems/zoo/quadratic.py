"""``quadratic``: a small ill-conditioned problem whose sharpness rises under GD.

No data set: the cheapest built-in (20 parameters), for tests and for seeing
GD reach the edge of stability in a few hundred steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import ProblemError
from flowgen.precision import in_float64
from flowgen.problems.base import Options, Problem
from flowgen.problems.base import is_real as _is_real

__all__ = ["QUADRATIC_EOS_LR", "quadratic"]


#: Learning rate at which plain GD on ``quadratic()`` (defaults) reaches the
#: edge of stability: sharpness starts at ~65, crosses 2/lr = 200 after ~150-270
#: steps, then hovers in [198, 203]. (lr = 0.02 works as well: threshold 100.)
QUADRATIC_EOS_LR = 0.01

_Q_SCALE0 = 0.8  # initial value of the scale parameter s
_Q_SCALE_TARGET = 2.0  # the pull ½(s − 2)² drives s (and the sharpness λ_max·s²) up
_Q_TARGET_ENERGY = 10.0  # bᵀ A b: the target lives mostly in flat directions
_Q_JITTER = 0.01  # x0 = b/s0 + 0.01·ξ, so that every direction is excited


def _soft_square(r: jax.Array, quartic: float) -> jax.Array:
    """``log cosh(√(12q)·r) / (12q) = ½r² − q·r⁴ + O(r⁶)``; exactly ``½r²`` for q = 0."""
    if quartic == 0.0:
        return 0.5 * r**2
    a = 12.0 * quartic
    z = jnp.sqrt(a) * r
    return (jnp.logaddexp(z, -z) - jnp.log(2.0)) / a


@in_float64
def quadratic(n: int = 20, seed: int = 0, cond: float = 100.0, quartic: float = 0.1) -> Problem:
    r"""A fixed ill-conditioned quadratic whose curvature grows along the GD path.

    Parameters ``w = (x, s)`` with ``x ∈ R^{n-1}`` and a scalar scale ``s``::

        L(w) = Σ_i λ_i ℓ(r_i) + ½ (s − 2)²,    r = Qᵀ(s·x − b),
        ℓ(r) = log cosh(√(12q)·r) / (12q) = ½ r² − q r⁴ + O(r⁶),   q = quartic.

    ``A = Q diag(λ) Qᵀ`` (``Q`` a seeded random rotation, ``λ`` log-spaced in
    ``[1, cond]``), so near its minimum in ``x`` the loss is the quadratic
    ``½ (s x − b)ᵀ A (s x − b)``. The sharpness is about ``λ_max·s²``. Starting
    on the valley floor ``x0 = b/s0`` (plus a 0.01 jitter) with ``s0 = 0.8``,
    the pull ``½(s − 2)²`` raises ``s`` slowly, so the sharpness rises
    progressively from ≈ 65 towards ≈ 400 (``b`` lies mostly in flat
    directions: ``bᵀAb = 10``). The small negative quartic in ``ℓ`` makes the
    loss soften along an oscillation, which lets GD settle at the edge of
    stability instead of catapulting (with ``quartic = 0`` it catapults
    repeatedly).

    Measured with GD at ``lr = 0.01`` (``QUADRATIC_EOS_LR``; 2/lr = 200), n = 20,
    seeds 0-2: sharpness 65 at step 0, crosses 200 at step 150-270, overshoots
    to ~280 once, then hovers in [198, 203] (period-2 oscillation) with the loss
    ≈ 0.59. ``lr = 0.02`` reaches its threshold 100 after ~30 steps.

    Args:
        n: number of parameters (≥ 2).
        seed: seeds the rotation ``Q``, the target ``b`` and the jitter.
        cond: condition number of ``A`` (its eigenvalues span ``[1, cond]``).
        quartic: coefficient ``q`` of the softening quartic term (≥ 0).
    """
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 2:
        raise ProblemError(
            f"quadratic needs an integer n >= 2, got n={n!r}",
            hint="n counts the parameters (n-1 coordinates plus one scale), e.g. n=20",
        )
    if not _is_real(cond) or not np.isfinite(cond) or cond < 1.0:
        raise ProblemError(
            f"quadratic needs cond >= 1, got cond={cond!r}",
            hint="cond is the ratio of the largest to the smallest eigenvalue, e.g. cond=100",
        )
    if not _is_real(quartic) or not np.isfinite(quartic) or quartic < 0.0:
        raise ProblemError(
            f"quadratic needs quartic >= 0, got quartic={quartic!r}",
            hint="quartic is the size of the softening term, e.g. quartic=0.1 (0 disables it)",
        )
    seed = Options("quadratic", quadratic).seed(seed)
    n, cond, quartic = int(n), float(cond), float(quartic)
    m = n - 1
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((m, m)))  # (m, m) rotation
    lam = np.logspace(0.0, np.log10(cond), m)  # (m,) eigenvalues of A
    c = rng.standard_normal(m) / np.sqrt(lam)  # (m,) target in the eigenbasis
    c *= np.sqrt(_Q_TARGET_ENERGY / np.sum(lam * c**2))
    b = q @ c  # (m,)
    x0 = b / _Q_SCALE0 + _Q_JITTER * rng.standard_normal(m)  # (m,)

    q_j, lam_j, b_j = jnp.asarray(q), jnp.asarray(lam), jnp.asarray(b)

    def loss(w: jax.Array) -> jax.Array:
        x, s = w[:-1], w[-1]  # (m,), ()
        r = q_j.T @ (s * x - b_j)  # (m,) residual in the eigenbasis of A
        return jnp.sum(lam_j * _soft_square(r, quartic)) + 0.5 * (s - _Q_SCALE_TARGET) ** 2

    w0 = jnp.asarray(np.concatenate([x0, [_Q_SCALE0]]), dtype=jnp.float64)
    info = {
        "builtin": "quadratic",
        "options": {"n": n, "seed": seed, "cond": cond, "quartic": quartic},
        "n_params": n,
        "eos_lr": QUADRATIC_EOS_LR,
        "layout": "w = (x[0..n-2], s)",
    }
    return Problem(name="quadratic", loss=loss, w0=w0, unravel=None, info=info)
