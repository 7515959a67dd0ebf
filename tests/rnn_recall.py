"""A tanh RNN that must recall its first input: gradient flow sharpens to ~10³ × GD's threshold.

Used by ``tests/test_stable.py`` and ``benchmarks/stable_flow.py`` as a user
problem (``tests/rnn_recall.py:make_problem``).

The task: ``n`` sequences of ``length`` inputs ``x_τ ∈ R^d`` (standard normal);
the target is the first input, ``y = x_0[:out]``, read from the last hidden
state. Carrying ``x_0`` through ``length − 1`` tanh steps needs a recurrent
matrix near the edge of explosion, so the loss develops a cliff: under gradient
flow the top Hessian eigenvalues jump from ≈ 1 to thousands within a few units
of flow time (``lr·τ``), and keep a broad tail (tens of eigenvalues above 20).
GD with ``lr = 0.1`` reaches the edge of stability (``λ_max ≈ 2/lr = 20``) and
keeps learning there, while its stable flow (gradient flow) sharpens to
``lr·λ_max`` in the hundreds — an ODE that is stiff by a factor of hundreds.

Measured (defaults: hidden 16, 404 parameters; GD lr 0.1): ``λ_max(H)`` 1.0 at
the start, 860 at flow time 10 and ≈ 3–5·10³ from flow time 15 on (gradient
flow); the discrete run's effective sharpness ``lr·λ_max`` hovers in 2–3 from
step ~240. With ``hidden=32, n=256`` (1316 parameters) the same happens a little
later.
"""

import jax
import jax.numpy as jnp
import numpy as np


def make_problem(
    n: int = 64,
    length: int = 8,
    d: int = 4,
    hidden: int = 16,
    out: int = 4,
    rec_scale: float = 0.5,
    in_scale: float = 0.1,
    out_scale: float = 0.1,
    seed: int = 0,
):
    """``h_τ = tanh(h_{τ−1} W + x_τ U + b)``, ``f = h_last V + c``, loss ``½ mean_i ‖f − y‖²``.

    Init: ``W`` (hidden, hidden) normal · ``rec_scale/√hidden``, ``U`` (d, hidden)
    normal · ``in_scale/√d``, ``V`` (hidden, out) normal · ``out_scale/√hidden``,
    biases 0; all seeded by ``seed``.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((length, n, d))  # (length, n, d) inputs
    y = x[0, :, :out].copy()  # (n, out) targets: the first input
    x, y = jnp.asarray(x), jnp.asarray(y)
    w0 = {
        "W": rng.standard_normal((hidden, hidden)) * rec_scale / np.sqrt(hidden),
        "U": rng.standard_normal((d, hidden)) * in_scale / np.sqrt(d),
        "b": np.zeros(hidden),
        "V": rng.standard_normal((hidden, out)) * out_scale / np.sqrt(hidden),
        "c": np.zeros(out),
    }

    def loss_fn(p):
        def cell(h, x_t):
            return jnp.tanh(h @ p["W"] + x_t @ p["U"] + p["b"]), None  # (n, hidden)

        h, _ = jax.lax.scan(cell, jnp.zeros((x.shape[1], p["W"].shape[0])), x)
        f = h @ p["V"] + p["c"]  # (n, out)
        return 0.5 * jnp.mean(jnp.sum((f - y) ** 2, axis=1))

    return loss_fn, w0
