"""``vit``: a small vision transformer on patches of the 8×8 digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem

__all__ = ["vit"]


def _patches(images: np.ndarray, patch: int) -> np.ndarray:
    """(n, 8, 8, 1) → (n, T, patch²) with T = (8/patch)², patches in row-major order."""
    n, side = images.shape[0], images.shape[1]
    k = side // patch
    x = images[..., 0].reshape(n, k, patch, k, patch).transpose(0, 1, 3, 2, 4)
    return x.reshape(n, k * k, patch * patch)


@in_float64
def vit(
    n: int = 128,
    classes: int = 4,
    patch: int = 4,
    width: int = 16,
    depth: int = 2,
    heads: int = 2,
    init_scale: float = 0.1,
    criterion: str = "mse",
    seed: int = 0,
) -> Problem:
    r"""A pre-norm transformer encoder over the patches of each image, mean-pooled.

    Data: the first ``n`` digits of classes ``0..classes-1`` as 8×8 images,
    each pixel standardised over the ``n`` examples, cut into
    ``T = (8/patch)²`` patches of ``patch²`` pixels.

    Model (Dosovitskiy et al. 2021, with mean pooling instead of a class token)::

        h₀ = P E + Π                               (n, T, width): patch embedding + positions
        h ← h + MHA(LN(h)),  h ← h + W₂ gelu(W₁ LN(h) + b₁) + b₂      depth times
        f(x) = W · mean_T LN(h) + b

    ``MHA`` is softmax attention with ``heads`` heads (no mask), the MLP has
    ``2·width`` hidden units, ``LN`` is layer norm (per token). Everything is
    smooth: ``gelu`` and softmax, no dropout.

    Loss (``criterion``): ``mse`` ½·mean_i ‖f(x_i) − e_{y_i}‖² or ``ce``
    mean_i (logsumexp f(x_i) − f(x_i)_{y_i}).

    Init: dense layers LeCun normal, positions ``N(0, 1)``, biases 0; the
    readout ``W`` is multiplied by ``init_scale`` (small: progressive
    sharpening).

    Args:
        n: examples.
        classes: classes 0..classes-1 (2 to 10), the number of outputs.
        patch: side of a square patch (1, 2, 4 or 8).
        width: model width (a multiple of ``heads``).
        depth: transformer blocks.
        heads: attention heads.
        init_scale: multiplies the readout's initial weights.
        criterion: ``mse`` or ``ce``.
        seed: seeds the initialisation (numpy ``default_rng``).
    """
    opts = Options("vit", vit)
    n = opts.int("n", n, 1)
    classes = opts.int("classes", classes, 2, 10)
    patch = opts.member("patch", patch, (1, 2, 4, 8))
    width = opts.int("width", width, 1)
    depth = opts.int("depth", depth, 1)
    heads = opts.int("heads", heads, 1)
    opts.divides("width", width, "heads", heads)
    init_scale = opts.real("init_scale", init_scale, 0.0, strict=True)
    criterion = opts.criterion(criterion)
    seed = opts.seed(seed)

    images, labels = data.digits_images(n, classes)  # (n, 8, 8, 1), (n,)
    patches = _patches(images, patch)  # (n, T, patch²)
    tokens = patches.shape[1]
    rng = np.random.default_rng(seed)
    params = {
        "embed": nn.dense_init(rng, patch * patch, width),
        "pos": jnp.asarray(rng.standard_normal((tokens, width)), dtype=jnp.float64),
        "blocks": [nn.transformer_block_init(rng, width) for _ in range(depth)],
        "norm": nn.norm_init(width),
        "readout": nn.dense_init(rng, width, classes, init_scale),
    }

    x_j = jnp.asarray(patches)  # (n, T, patch²)
    y_j = jnp.asarray(data.one_hot(labels, classes))  # (n, classes)

    def logits_of(p: dict) -> jax.Array:
        h = nn.dense(p["embed"], x_j) + p["pos"]  # (n, T, width)
        for blk in p["blocks"]:
            h = nn.transformer_block(blk, h, heads, causal=False)
        feats = jnp.mean(nn.layer_norm(p["norm"], h), axis=1)  # (n, width)
        logits = nn.dense(p["readout"], feats)  # (n, classes)
        return logits

    return losses.supervised(
        "vit",
        params,
        logits_of,
        y_j,
        criterion,
        options=opts.values,
        data="digits",
        n_examples=n,
        tokens=tokens,
    )
