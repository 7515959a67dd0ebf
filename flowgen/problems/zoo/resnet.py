"""``resnet``: a small pre-activation residual network with group norm on the digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem

__all__ = ["resnet"]


@in_float64
def resnet(
    n: int = 128,
    classes: int = 4,
    channels: int = 8,
    depth: int = 2,
    groups: int = 2,
    activation: str = "tanh",
    init_scale: float = 0.1,
    criterion: str = "mse",
    seed: int = 0,
) -> Problem:
    r"""A stem convolution, ``depth`` residual blocks at 4×4, group norm, a linear readout.

    Data: the first ``n`` digits of classes ``0..classes-1`` as 8×8×1 images,
    each pixel standardised over the ``n`` examples (constant pixels are 0).

    Model (pre-activation residual blocks, He et al. 2016, with group norm
    ``GN`` instead of batch norm)::

        h₀ = pool(K₀ * x + c₀)                                   (n, 4, 4, channels)
        h_{k+1} = h_k + K_k'' * σ(GN(K_k' * σ(GN(h_k))))          k = 0..depth-1
        f(x) = W · mean_{pixels} σ(GN(h_depth)) + b

    ``K *`` is a 3×3 'same' convolution, ``pool`` 2×2 averaging and
    ``σ = activation``. Group norm standardises each example's channels in
    ``groups`` groups over (pixels, channels of the group), then applies a
    per-channel gain and shift: it is a fixed function of one example, so the
    loss is one smooth function of ``w`` (no batch statistics).

    Loss (``criterion``): ``mse`` ½·mean_i ‖f(x_i) − e_{y_i}‖² or ``ce``
    mean_i (logsumexp f(x_i) − f(x_i)_{y_i}).

    Init: convolutions LeCun normal, biases 0, norm gains 1 and shifts 0;
    the readout ``W`` is multiplied by ``init_scale`` (small: progressive
    sharpening, so the optimizers reach the edge of stability).

    Args:
        n: examples.
        classes: classes 0..classes-1 (2 to 10), the number of outputs.
        channels: channels of every convolution (a multiple of ``groups``).
        depth: residual blocks (≥ 1).
        groups: groups of the group norm (1 is layer norm over the feature map).
        activation: ``tanh``, ``gelu``, ``softplus``, ``sigmoid`` or ``silu`` (smooth).
        init_scale: multiplies the readout's initial weights.
        criterion: ``mse`` or ``ce``.
        seed: seeds the initialisation (numpy ``default_rng``).
    """
    opts = Options("resnet", resnet)
    n = opts.int("n", n, 1)
    classes = opts.int("classes", classes, 2, 10)
    channels = opts.int("channels", channels, 1)
    depth = opts.int("depth", depth, 1)
    groups = opts.int("groups", groups, 1)
    opts.divides("channels", channels, "groups", groups)
    activation = opts.choice("activation", activation, list(nn.ACTIVATIONS))
    init_scale = opts.real("init_scale", init_scale, 0.0, strict=True)
    criterion = opts.criterion(criterion)
    seed = opts.seed(seed)

    x, labels = data.digits_images(n, classes)  # (n, 8, 8, 1), (n,)
    rng = np.random.default_rng(seed)
    params = {
        "stem": nn.conv_init(rng, 1, channels),
        "blocks": [
            {
                "norm1": nn.norm_init(channels),
                "conv1": nn.conv_init(rng, channels, channels),
                "norm2": nn.norm_init(channels),
                "conv2": nn.conv_init(rng, channels, channels),
            }
            for _ in range(depth)
        ],
        "norm": nn.norm_init(channels),
        "readout": nn.dense_init(rng, channels, classes, init_scale),
    }

    patches = jnp.asarray(nn.image_patches(x))  # (n, 8, 8, 9): the stem's inputs
    y_j = jnp.asarray(data.one_hot(labels, classes))  # (n, classes)
    act = nn.ACTIVATIONS[activation]

    def logits_of(p: dict) -> jax.Array:
        h = nn.avg_pool2(nn.conv2d_patches(p["stem"], patches))  # (n, 4, 4, channels)
        for blk in p["blocks"]:
            r = nn.conv2d(blk["conv1"], act(nn.group_norm(blk["norm1"], h, groups)))
            h = h + nn.conv2d(blk["conv2"], act(nn.group_norm(blk["norm2"], r, groups)))
        feats = jnp.mean(act(nn.group_norm(p["norm"], h, groups)), axis=(1, 2))  # (n, channels)
        logits = nn.dense(p["readout"], feats)  # (n, classes)
        return logits

    return losses.supervised(
        "resnet",
        params,
        logits_of,
        y_j,
        criterion,
        options=opts.values,
        data="digits",
        n_examples=n,
    )
