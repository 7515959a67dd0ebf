"""``transformer``: a small causal pre-norm transformer on the sorting task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem

__all__ = ["transformer"]


@in_float64
def transformer(
    n: int = 32,
    vocab: int = 4,
    length: int = 8,
    width: int = 16,
    depth: int = 2,
    heads: int = 2,
    init_scale: float = 0.1,
    criterion: str = "mse",
    seed: int = 0,
) -> Problem:
    r"""A causal (GPT-style) pre-norm transformer predicting the sorted half of a sequence.

    Data (:func:`flowgen.problems.data.sorting`): ``n`` sequences of
    ``length`` tokens in ``0..vocab-1`` followed by their sorted copy; the
    model reads the first ``T = 2·length − 1`` tokens and is scored on its
    prediction of each token of the sorted half from the tokens before it.

    Model::

        h₀ = E[tokens] + Π                                       (n, T, width)
        h ← h + MHA_causal(LN(h)),  h ← h + W₂ gelu(W₁ LN(h) + b₁) + b₂   depth times
        f_t = W LN(h)_t + b                                      at the scored positions

    Causal softmax attention with ``heads`` heads (position ``t`` attends to
    ``s ≤ t``), an MLP with ``2·width`` hidden units, layer norm per token:
    smooth, deterministic, no dropout.

    Loss (``criterion``), averaged over the ``n·length`` scored predictions:
    ``mse`` ½·mean ‖f_t − e_{y_t}‖² or ``ce`` mean (logsumexp f_t − f_t[y_t]).

    Init: embedding and positions ``N(0, 1)``, dense layers LeCun normal,
    biases 0; the readout ``W`` is multiplied by ``init_scale`` (small:
    progressive sharpening). The data are drawn from ``default_rng(seed)``,
    the weights from ``default_rng([seed, 1])``.

    Args:
        n: sequences.
        vocab: vocabulary size (≥ 2).
        length: tokens to sort (≥ 2).
        width: model width (a multiple of ``heads``).
        depth: transformer blocks.
        heads: attention heads.
        init_scale: multiplies the readout's initial weights.
        criterion: ``mse`` or ``ce``.
        seed: seeds the data and the initialisation.
    """
    opts = Options("transformer", transformer)
    n = opts.int("n", n, 1)
    vocab = opts.int("vocab", vocab, 2)
    length = opts.int("length", length, 2)
    width = opts.int("width", width, 1)
    depth = opts.int("depth", depth, 1)
    heads = opts.int("heads", heads, 1)
    opts.divides("width", width, "heads", heads)
    init_scale = opts.real("init_scale", init_scale, 0.0, strict=True)
    criterion = opts.criterion(criterion)
    seed = opts.seed(seed)

    task = data.sorting(n, vocab, length, seed)
    steps = task.tokens.shape[1]
    rng = np.random.default_rng([seed, 1])
    params = {
        "embed": jnp.asarray(rng.standard_normal((vocab, width)), dtype=jnp.float64),
        "pos": jnp.asarray(rng.standard_normal((steps, width)), dtype=jnp.float64),
        "blocks": [nn.transformer_block_init(rng, width) for _ in range(depth)],
        "norm": nn.norm_init(width),
        "readout": nn.dense_init(rng, width, vocab, init_scale),
    }

    x_j, y_j = map(jnp.asarray, task.one_hot())  # (n, T, vocab), (n·length, vocab)

    def logits_of(p: dict) -> jax.Array:
        h = x_j @ p["embed"] + p["pos"]  # (n, T, width)
        for blk in p["blocks"]:
            h = nn.transformer_block(blk, h, heads, causal=True)
        h = nn.layer_norm(p["norm"], h[:, task.predicted])  # (n, length, width)
        logits = nn.dense(p["readout"], h)  # (n, length, vocab)
        return logits.reshape(n * length, vocab)

    return losses.supervised(
        "transformer",
        params,
        logits_of,
        y_j,
        criterion,
        options=opts.values,
        data="sorting",
        n_sequences=n,
        n_predictions=n * length,
    )
