"""``lstm``: a small LSTM on the sorting task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem

__all__ = ["lstm"]


def lstm_layer(p: dict, xs: jax.Array) -> jax.Array:
    """One LSTM layer over time: (n, T, d_in) → hidden states (n, T, width).

    ``[i, f, g, o] = [x_t, h_{t−1}] W + b``,
    ``c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g)``, ``h_t = σ(o) ⊙ tanh(c_t)``,
    from ``h_0 = c_0 = 0``, by ``lax.scan`` over ``t``.
    """
    n = xs.shape[0]
    width = p["W"].shape[1] // 4

    def cell(carry, x_t):  # x_t (n, d_in)
        h, c = carry  # (n, width) each
        z = jnp.concatenate([x_t, h], axis=1) @ p["W"] + p["b"]  # (n, 4·width)
        i, f, g, o = jnp.split(z, 4, axis=1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((n, width), dtype=xs.dtype)
    _, hs = jax.lax.scan(cell, (zeros, zeros), jnp.swapaxes(xs, 0, 1))  # (T, n, width)
    return jnp.swapaxes(hs, 0, 1)


@in_float64
def lstm(
    n: int = 64,
    vocab: int = 4,
    length: int = 8,
    width: int = 16,
    depth: int = 1,
    init_scale: float = 0.1,
    criterion: str = "mse",
    seed: int = 0,
) -> Problem:
    r"""An LSTM reading the sorting task left to right, predicting the sorted half.

    Data (:func:`flowgen.problems.data.sorting`): ``n`` sequences of
    ``length`` tokens in ``0..vocab-1`` followed by their sorted copy; the
    model reads the first ``2·length − 1`` tokens and is scored on its
    prediction of each token of the sorted half from the tokens before it.

    Model: embedding ``e_t = E[token_t]`` (width), ``depth`` stacked LSTM
    layers (gates with the logistic σ, cell and output with tanh, all smooth),
    then ``f_t = W h_t + b`` (vocab logits) at the ``length`` scored positions.

    Loss (``criterion``), averaged over the ``n·length`` scored predictions:
    ``mse`` ½·mean ‖f_t − e_{y_t}‖² or ``ce`` mean (logsumexp f_t − f_t[y_t]).

    Init: embedding ``N(0, 1)``, LSTM weights LeCun normal over their
    ``d_in + width`` inputs, biases 0; the readout ``W`` is multiplied by
    ``init_scale`` (small: progressive sharpening). The data are drawn from
    ``default_rng(seed)``, the weights from ``default_rng([seed, 1])``.

    Args:
        n: sequences.
        vocab: vocabulary size (≥ 2).
        length: tokens to sort (≥ 2).
        width: embedding and hidden size.
        depth: stacked LSTM layers.
        init_scale: multiplies the readout's initial weights.
        criterion: ``mse`` or ``ce``.
        seed: seeds the data and the initialisation.
    """
    opts = Options("lstm", lstm)
    n = opts.int("n", n, 1)
    vocab = opts.int("vocab", vocab, 2)
    length = opts.int("length", length, 2)
    width = opts.int("width", width, 1)
    depth = opts.int("depth", depth, 1)
    init_scale = opts.real("init_scale", init_scale, 0.0, strict=True)
    criterion = opts.criterion(criterion)
    seed = opts.seed(seed)

    task = data.sorting(n, vocab, length, seed)
    rng = np.random.default_rng([seed, 1])
    params = {
        "embed": jnp.asarray(rng.standard_normal((vocab, width)), dtype=jnp.float64),
        "layers": [nn.dense_init(rng, 2 * width, 4 * width) for _ in range(depth)],
        "readout": nn.dense_init(rng, width, vocab, init_scale),
    }

    x_j, y_j = map(jnp.asarray, task.one_hot())  # (n, T, vocab), (n·length, vocab)

    def logits_of(p: dict) -> jax.Array:
        h = x_j @ p["embed"]  # (n, T, width)
        for layer in p["layers"]:
            h = lstm_layer(layer, h)  # (n, T, width)
        logits = nn.dense(p["readout"], h[:, task.predicted])  # (n, length, vocab)
        return logits.reshape(n * length, vocab)

    return losses.supervised(
        "lstm",
        params,
        logits_of,
        y_j,
        criterion,
        options=opts.values,
        data="sorting",
        n_sequences=n,
        n_predictions=n * length,
    )
