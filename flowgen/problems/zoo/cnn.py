"""``cnn``: a small convolutional network on the 8×8 digits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem

__all__ = ["cnn"]


@in_float64
def cnn(
    n: int = 256,
    classes: int = 4,
    channels: int = 8,
    depth: int = 2,
    activation: str = "tanh",
    init_scale: float = 0.1,
    criterion: str = "mse",
    seed: int = 0,
) -> Problem:
    r"""Convolutions and average pooling on the digits images, then a linear readout.

    Data: the first ``n`` digits of classes ``0..classes-1`` as 8×8×1 images,
    each pixel standardised over the ``n`` examples (constant pixels are 0).

    Model: ``depth`` stages ``h ← pool(σ(conv₃ₓ₃(h)))`` (``channels`` filters,
    zero padding, 2×2 average pooling, ``σ = activation``), 8×8 → 4×4 → 2×2
    → 1×1, then ``f = W h + b`` on the flattened map::

        f(x) = W · flat(pool σ(K_D * … pool σ(K_1 * x + c_1) … + c_D)) + b

    Loss (``criterion``): ``mse`` ½·mean_i ‖f(x_i) − e_{y_i}‖² or ``ce``
    mean_i (logsumexp f(x_i) − f(x_i)_{y_i}).

    Init: LeCun normal (std ``1/√fan_in``), biases 0; the readout ``W`` is
    multiplied by ``init_scale``. A small readout makes the sharpness start
    low and rise under training (progressive sharpening), so the optimizers
    reach the edge of stability.

    Args:
        n: examples (≤ the number of digits of those classes).
        classes: classes 0..classes-1 (2 to 10), the number of outputs.
        channels: filters per convolution.
        depth: convolution stages (1 to 3; each halves the resolution).
        activation: ``tanh``, ``gelu``, ``softplus``, ``sigmoid`` or ``silu`` (smooth).
        init_scale: multiplies the readout's initial weights.
        criterion: ``mse`` or ``ce``.
        seed: seeds the initialisation (numpy ``default_rng``).
    """
    opts = Options("cnn", cnn)
    n = opts.int("n", n, 1)
    classes = opts.int("classes", classes, 2, 10)
    channels = opts.int("channels", channels, 1)
    depth = opts.int("depth", depth, 1, 3)
    activation = opts.choice("activation", activation, list(nn.ACTIVATIONS))
    init_scale = opts.real("init_scale", init_scale, 0.0, strict=True)
    criterion = opts.criterion(criterion)
    seed = opts.seed(seed)

    x, labels = data.digits_images(n, classes)  # (n, 8, 8, 1), (n,)
    rng = np.random.default_rng(seed)
    convs, c_in = [], 1
    for _ in range(depth):
        convs.append(nn.conv_init(rng, c_in, channels))
        c_in = channels
    side = data.DIGITS_SIDE // 2**depth
    params = {
        "convs": convs,
        "readout": nn.dense_init(rng, side * side * channels, classes, init_scale),
    }

    patches = jnp.asarray(nn.image_patches(x))  # (n, 8, 8, 9): the first layer's inputs
    y_j = jnp.asarray(data.one_hot(labels, classes))  # (n, classes)
    act = nn.ACTIVATIONS[activation]

    def logits_of(p: dict) -> jax.Array:
        h = nn.avg_pool2(act(nn.conv2d_patches(p["convs"][0], patches)))  # (n, 4, 4, channels)
        for conv in p["convs"][1:]:
            h = nn.avg_pool2(act(nn.conv2d(conv, h)))  # (n, H/2, W/2, channels)
        logits = nn.dense(p["readout"], h.reshape(n, -1))  # (n, classes)
        return logits

    return losses.supervised(
        "cnn",
        params,
        logits_of,
        y_j,
        criterion,
        options=opts.values,
        data="digits",
        n_examples=n,
    )
