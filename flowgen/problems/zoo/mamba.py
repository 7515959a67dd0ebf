"""``mamba``: a small selective state-space model (Mamba) on the sorting task."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem

__all__ = ["mamba"]

#: Taps of the causal depthwise convolution before the scan (Mamba's ``d_conv``).
CONV_TAPS = 4


def mamba_block_init(rng: np.random.Generator, width: int, inner: int, state: int) -> dict:
    """Parameters of one residual Mamba block (``inner`` = expanded width ``E``)."""
    rank = max(1, math.ceil(width / 16))  # Δ's low-rank projection, as in Mamba
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), inner))  # (E,) initial step sizes
    f64 = jnp.float64
    return {
        "norm": jnp.ones(width, dtype=f64),
        "in": nn.dense_init(rng, width, 2 * inner, bias=False),
        "conv": {
            "W": jnp.asarray(rng.standard_normal((CONV_TAPS, inner)) / np.sqrt(CONV_TAPS), f64),
            "b": jnp.zeros(inner, dtype=f64),
        },
        "x_proj": nn.dense_init(rng, inner, rank + 2 * state, bias=False),
        "dt": {
            "W": jnp.asarray(rng.uniform(-1.0, 1.0, (rank, inner)) / np.sqrt(rank), f64),
            "b": jnp.asarray(dt + np.log(-np.expm1(-dt)), f64),  # softplus(b) = dt
        },
        "A_log": jnp.asarray(np.log(np.tile(np.arange(1.0, state + 1), (inner, 1))), f64),
        "D": jnp.ones(inner, dtype=f64),
        "out": nn.dense_init(rng, inner, width, bias=False),
    }


def selective_scan(
    x: jax.Array, delta: jax.Array, a: jax.Array, b: jax.Array, c: jax.Array
) -> jax.Array:
    """``s_t = exp(Δ_t A) ⊙ s_{t−1} + (Δ_t x_t) B_tᵀ``, ``y_t = s_t C_t`` from ``s_0 = 0``.

    Shapes: ``x``, ``delta`` (n, T, E); ``a`` (E, N); ``b``, ``c`` (n, T, N);
    the state ``s_t`` is (n, E, N); returns ``y`` (n, T, E). One ``lax.scan``
    step per time ``t`` (zero-order-hold discretisation ``exp(Δ_t A)`` of
    ``ds/dτ = A s + B x``, with Mamba's simplified input term ``Δ_t B_t x_t``).
    """

    def step(s, inputs):  # s (n, E, N)
        x_t, d_t, b_t, c_t = inputs  # (n, E), (n, E), (n, N), (n, N)
        s = jnp.exp(d_t[..., None] * a) * s + (d_t * x_t)[..., None] * b_t[:, None, :]
        return s, jnp.sum(s * c_t[:, None, :], axis=-1)  # (n, E)

    n, _, inner = x.shape
    s0 = jnp.zeros((n, inner, a.shape[1]), dtype=x.dtype)
    time_major = (jnp.swapaxes(z, 0, 1) for z in (x, delta, b, c))  # (T, n, ·)
    _, ys = jax.lax.scan(step, s0, tuple(time_major))  # (T, n, E)
    return jnp.swapaxes(ys, 0, 1)


def mamba_block(p: dict, h: jax.Array) -> jax.Array:
    """``h + W_out (y ⊙ silu(z))``, with ``[x, z] = W_in RMSNorm(h)``, ``x ← silu(causal
    conv(x))``, ``[δ, B, C] = W_x x``, ``Δ = softplus(W_Δ δ + b_Δ)``, ``A = −exp(A_log)``
    and ``y = SSM(x; Δ, A, B, C) + D ⊙ x``: (n, T, width) → same."""
    n, steps, _ = h.shape
    inner, state = p["A_log"].shape
    rank = p["dt"]["W"].shape[0]
    xz = nn.dense(p["in"], nn.rms_norm(p["norm"], h))  # (n, T, 2E)
    x, z = jnp.split(xz, 2, axis=-1)  # (n, T, E) each
    padded = jnp.pad(x, ((0, 0), (CONV_TAPS - 1, 0), (0, 0)))  # causal: past only
    x = sum(padded[:, j : j + steps] * p["conv"]["W"][j] for j in range(CONV_TAPS))
    x = jax.nn.silu(x + p["conv"]["b"])  # (n, T, E)
    proj = nn.dense(p["x_proj"], x)  # (n, T, rank + 2N)
    d_low, b, c = proj[..., :rank], proj[..., rank : rank + state], proj[..., rank + state :]
    delta = jax.nn.softplus(nn.dense(p["dt"], d_low))  # (n, T, E), > 0
    a = -jnp.exp(p["A_log"])  # (E, N), < 0: a decaying state
    y = selective_scan(x, delta, a, b, c) + p["D"] * x  # (n, T, E)
    return h + nn.dense(p["out"], y * jax.nn.silu(z))


@in_float64
def mamba(
    n: int = 32,
    vocab: int = 4,
    length: int = 8,
    width: int = 16,
    depth: int = 1,
    expand: int = 2,
    state: int = 4,
    init_scale: float = 0.1,
    criterion: str = "mse",
    seed: int = 0,
) -> Problem:
    r"""Residual Mamba blocks (selective state-space model, Gu & Dao 2023) on the sorting task.

    Data (:func:`flowgen.problems.data.sorting`): ``n`` sequences of
    ``length`` tokens in ``0..vocab-1`` followed by their sorted copy; the
    model reads the first ``2·length − 1`` tokens and is scored on its
    prediction of each token of the sorted half from the tokens before it.

    Model::

        h₀ = E[tokens]                                            (n, T, width)
        h ← h + Mamba(RMSNorm(h))                                  depth times
        f_t = W RMSNorm(h)_t + b                                   at the scored positions

    A Mamba block expands to ``E = expand·width`` channels, splits into ``x``
    and a gate ``z``, runs ``x`` through a causal depthwise convolution
    (4 taps) and ``silu``, then through the *selective* linear recurrence
    ``s_t = exp(Δ_t A) s_{t−1} + Δ_t x_t B_t``, ``y_t = C_t·s_t + D x_t``
    (per channel, state size ``N = state``), whose step ``Δ_t > 0``
    (softplus) and ``B_t``, ``C_t`` depend on the input; ``A = −exp(A_log)``
    keeps it stable. The output ``y ⊙ silu(z)`` is projected back to
    ``width``. The recurrence is a ``lax.scan`` (no parallel scan); every
    function is smooth (exp, softplus, silu), so third derivatives are exact.

    Loss (``criterion``), averaged over the ``n·length`` scored predictions:
    ``mse`` ½·mean ‖f_t − e_{y_t}‖² or ``ce`` mean (logsumexp f_t − f_t[y_t]).

    Init as in Mamba: ``A_log = log(1..N)``, ``D = 1``, ``Δ``'s bias so that
    ``softplus(b_Δ)`` is log-uniform in [0.001, 0.1]; projections LeCun
    normal, embedding ``N(0, 1)``; the readout ``W`` is multiplied by
    ``init_scale`` (small: progressive sharpening). The data are drawn from
    ``default_rng(seed)``, the weights from ``default_rng([seed, 1])``.

    Args:
        n: sequences.
        vocab: vocabulary size (≥ 2).
        length: tokens to sort (≥ 2).
        width: model width.
        depth: Mamba blocks.
        expand: inner channels per model channel.
        state: state size ``N`` per inner channel.
        init_scale: multiplies the readout's initial weights.
        criterion: ``mse`` or ``ce``.
        seed: seeds the data and the initialisation.
    """
    opts = Options("mamba", mamba)
    n = opts.int("n", n, 1)
    vocab = opts.int("vocab", vocab, 2)
    length = opts.int("length", length, 2)
    width = opts.int("width", width, 1)
    depth = opts.int("depth", depth, 1)
    expand = opts.int("expand", expand, 1)
    state = opts.int("state", state, 1)
    init_scale = opts.real("init_scale", init_scale, 0.0, strict=True)
    criterion = opts.criterion(criterion)
    seed = opts.seed(seed)

    task = data.sorting(n, vocab, length, seed)
    rng = np.random.default_rng([seed, 1])
    params = {
        "embed": jnp.asarray(rng.standard_normal((vocab, width)), dtype=jnp.float64),
        "blocks": [mamba_block_init(rng, width, expand * width, state) for _ in range(depth)],
        "norm": jnp.ones(width, dtype=jnp.float64),
        "readout": nn.dense_init(rng, width, vocab, init_scale),
    }

    x_j, y_j = map(jnp.asarray, task.one_hot())  # (n, T, vocab), (n·length, vocab)

    def logits_of(p: dict) -> jax.Array:
        h = x_j @ p["embed"]  # (n, T, width)
        for blk in p["blocks"]:
            h = mamba_block(blk, h)
        h = nn.rms_norm(p["norm"], h[:, task.predicted])  # (n, length, width)
        logits = nn.dense(p["readout"], h)  # (n, length, vocab)
        return logits.reshape(n * length, vocab)

    return losses.supervised(
        "mamba",
        params,
        logits_of,
        y_j,
        criterion,
        options=opts.values,
        data="sorting",
        n_sequences=n,
        n_predictions=n * length,
    )
