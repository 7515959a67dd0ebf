"""``mlp`` (alias ``digits-mlp``): a fully connected network on the digits.

The paper-style benchmark flowgen started with; ``digits-mlp`` is the same
constructor under its historical name (same defaults, same ``w0``, same loss).
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np

from flowgen.errors import ProblemError
from flowgen.precision import in_float64
from flowgen.problems import data, losses, nn
from flowgen.problems.base import Options, Problem, is_real

__all__ = ["digits_mlp", "mlp"]


@in_float64
def mlp(
    n: int = 400,
    classes: int = 4,
    width: int = 32,
    depth: int = 2,
    init_scales: tuple[float, ...] = (0.2, 1.0, 0.1),
    seed: int = 0,
    activation: str = "tanh",
    keep_constant: bool = False,
    criterion: str = "mse",
) -> Problem:
    r"""An MLP on scikit-learn's bundled digits, trained full batch.

    Data: the first ``n`` examples of classes ``0..classes-1`` (dataset order),
    each pixel standardised over those ``n`` examples (mean 0, std 1); pixels
    constant on them are dropped (for n=400, classes=4, 10 pixels are dropped
    and 54 inputs remain). With ``keep_constant=True`` they are kept as
    columns of exact zeros, so the first layer's weights on them get an
    identically zero gradient (a known NaN pitfall for RMSProp-like flows).

    Model: ``f(x) = W_{D+1} σ(… σ(W_1 x + b_1) …) + b_{D+1}``, inputs → width
    → … → classes with ``depth = D`` hidden layers and ``σ = activation``.
    Loss (``criterion``): ``mse`` ``L = ½ · mean_i ‖f(x_i) − e_{y_i}‖²``
    (squared error summed over the outputs, averaged over examples) on
    one-hot targets, or ``ce`` ``L = mean_i (logsumexp f(x_i) − f(x_i)_{y_i})``.

    Init: LeCun normal (std ``1/√fan_in``, biases 0) seeded by ``seed``
    (numpy ``default_rng``), weight layer ``k`` multiplied by ``init_scales[k]``.
    The small scales (0.2, 1, 0.1) make GD sharpen progressively; at LeCun
    scale these small MLPs never reach the edge of stability. Measured (GD,
    lr 0.4, defaults): sharpness 2.7 at step 0, ≥ 5 = 2/lr by step ~15, then
    hovers around 5.

    Parameters are a list of ``{"W": (fan_in, fan_out), "b": (fan_out,)}``
    dicts, flattened with ``ravel_pytree`` (2948 parameters with the defaults).
    """
    opts = Options("mlp", mlp)
    n = opts.int("n", n, 1)
    classes = opts.int("classes", classes, 2, 10)
    width = opts.int("width", width, 1)
    depth = opts.int("depth", depth, 1)
    seed = opts.seed(seed)
    activation = opts.choice("activation", activation, list(nn.ACTIVATIONS))
    criterion = opts.criterion(criterion)
    scales = tuple(init_scales) if isinstance(init_scales, list | tuple) else (init_scales,)
    if len(scales) != depth + 1 or not all(is_real(s) and np.isfinite(s) for s in scales):
        raise ProblemError(
            f"mlp needs {depth + 1} numbers in init_scales (one per weight layer), "
            f"got {init_scales!r}",
            hint="e.g. init_scales=0.2,1,0.1 for depth=2",
        )
    scales = tuple(float(s) for s in scales)

    x, labels, dropped = data.digits(n, classes, bool(keep_constant))  # (n, d), (n,)
    n_inputs = x.shape[1]
    dims = [n_inputs] + [width] * depth + [classes]
    rng = np.random.default_rng(seed)
    params = []
    for k, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in) * scales[k]
        params.append({"W": jnp.asarray(w), "b": jnp.zeros(fan_out, dtype=jnp.float64)})

    x_j = jnp.asarray(x)  # (n, d)
    y_j = jnp.asarray(data.one_hot(labels, classes))  # (n, classes)
    act = nn.ACTIVATIONS[activation]

    def logits_of(layers: list) -> jax.Array:
        h = x_j  # (n, d)
        for layer in layers[:-1]:
            h = act(h @ layer["W"] + layer["b"])  # (n, width)
        return h @ layers[-1]["W"] + layers[-1]["b"]  # (n, classes)

    return losses.supervised(
        "mlp",
        params,
        logits_of,
        y_j,
        criterion,
        options={
            "n": n,
            "classes": classes,
            "width": width,
            "depth": depth,
            "init_scales": scales,
            "seed": seed,
            "activation": activation,
            "keep_constant": bool(keep_constant),
            "criterion": criterion,
        },
        data="digits",
        n_inputs=int(n_inputs),
        n_examples=n,
        dropped_pixels=dropped,
    )


def digits_mlp(*args, **kwargs) -> Problem:
    """:func:`mlp` under its historical name ``digits-mlp`` (same options, defaults and ``w0``)."""
    p = mlp(*args, **kwargs)
    info = {**p.info, "builtin": "digits-mlp", "alias_of": "mlp"}
    return Problem(name="digits-mlp", loss=p.loss, w0=p.w0, unravel=p.unravel, info=info)


digits_mlp.__signature__ = inspect.signature(mlp)  # its options are mlp's
