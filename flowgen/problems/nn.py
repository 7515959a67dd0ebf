"""Small functional layers shared by the built-in architectures.

Parameters are plain dicts of float64 arrays, initialised from a
``numpy.random.Generator`` (so every problem is reproducible from its seed and
the arrays are float64 whatever JAX's default); the forward functions are
``jax.numpy`` and smooth, because the central flow differentiates the loss
three times:

* activations are ``tanh``, ``gelu`` (tanh form), ``softplus``, ``silu`` or
  ``sigmoid`` — no ReLU, whose second derivative is a Dirac mass;
* normalisations are per example (layer norm, group norm, RMS norm) with
  ``eps`` inside the square root — no batch statistics, so the loss is one
  fixed function of ``w``;
* nothing is random at call time (no dropout).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ACTIVATIONS",
    "attention",
    "attention_init",
    "avg_pool2",
    "conv2d",
    "conv_init",
    "dense",
    "dense_init",
    "group_norm",
    "image_patches",
    "conv2d_patches",
    "layer_norm",
    "norm_init",
    "rms_norm",
    "transformer_block",
    "transformer_block_init",
]

#: Smooth activations by name.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
}

#: ``eps`` of every normalisation (inside the square root).
NORM_EPS = 1e-5


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape) * std, dtype=jnp.float64)


def dense_init(
    rng: np.random.Generator, fan_in: int, fan_out: int, scale: float = 1.0, bias: bool = True
) -> dict:
    """``{"W": (fan_in, fan_out), "b": (fan_out,)}``: LeCun normal, std ``scale/√fan_in``; b = 0."""
    p = {"W": _normal(rng, (fan_in, fan_out), scale / np.sqrt(fan_in))}
    if bias:
        p["b"] = jnp.zeros(fan_out, dtype=jnp.float64)
    return p


def dense(p: dict, x: jax.Array) -> jax.Array:
    """``x W + b`` on the last axis: (..., fan_in) → (..., fan_out)."""
    out = x @ p["W"]
    return out + p["b"] if "b" in p else out


def norm_init(dim: int) -> dict:
    """Gain 1 and shift 0: ``{"g": (dim,), "b": (dim,)}``."""
    return {"g": jnp.ones(dim, dtype=jnp.float64), "b": jnp.zeros(dim, dtype=jnp.float64)}


def layer_norm(p: dict, x: jax.Array) -> jax.Array:
    """``g ⊙ (x − mean x) / √(var x + eps) + b`` over the last axis, per example."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)
    return p["g"] * (x - mu) / jnp.sqrt(var + NORM_EPS) + p["b"]


def rms_norm(g: jax.Array, x: jax.Array) -> jax.Array:
    """``g ⊙ x / √(mean x² + eps)`` over the last axis (Mamba's normalisation)."""
    return g * x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + NORM_EPS)


def group_norm(p: dict, x: jax.Array, groups: int) -> jax.Array:
    """Group norm of images ``x`` (n, H, W, C): each example's channels split into
    ``groups`` groups, each standardised over (H, W, C/groups); then ``g ⊙ · + b``
    per channel. ``groups = 1`` is layer norm over the whole feature map."""
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, groups, c // groups)  # (n, H, W, G, C/G)
    mu = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)  # (n, 1, 1, G, 1)
    var = jnp.mean((xg - mu) ** 2, axis=(1, 2, 4), keepdims=True)
    xg = (xg - mu) / jnp.sqrt(var + NORM_EPS)
    return xg.reshape(n, h, w, c) * p["g"] + p["b"]


def conv_init(
    rng: np.random.Generator, c_in: int, c_out: int, size: int = 3, scale: float = 1.0
) -> dict:
    """``{"W": (size, size, c_in, c_out), "b": (c_out,)}``: LeCun normal over the
    ``size²·c_in`` inputs of each output, b = 0."""
    fan_in = size * size * c_in
    return {
        "W": _normal(rng, (size, size, c_in, c_out), scale / np.sqrt(fan_in)),
        "b": jnp.zeros(c_out, dtype=jnp.float64),
    }


@functools.cache
def _shifts(height: int, width: int, size: int) -> np.ndarray:
    """``S[a·size + b, p, q] = 1`` when output pixel ``q`` reads input pixel ``p`` through
    kernel tap ``(a, b)`` ('same' zero padding): (size², H·W, H·W)."""
    r = size // 2
    s = np.zeros((size * size, height * width, height * width))
    for a in range(size):
        for b in range(size):
            for i in range(height):
                for j in range(width):
                    ii, jj = i + a - r, j + b - r
                    if 0 <= ii < height and 0 <= jj < width:
                        s[a * size + b, ii * width + jj, i * width + j] = 1.0
    return s


def conv2d(p: dict, x: jax.Array) -> jax.Array:
    """Stride-1 'same' convolution (zero padding): (n, H, W, C_in) → (n, H, W, C_out).

    ``out[q, o] = Σ_{a,b,i} x[q + (a, b) − r, i] · K[a, b, i, o] + c[o]``, applied
    as one dense linear map ``T(K) = Σ_{ab} S_ab ⊗ K_ab`` of size
    (H·W·C_in, H·W·C_out), with ``S_ab`` the fixed shift matrices. On 8×8
    images this is faster on a CPU than a convolution primitive, for the
    gradient and even more for Hessian-vector products (forward over reverse);
    the result is the same (tested against ``lax.conv_general_dilated``).
    """
    n, h, w, c_in = x.shape
    size, c_out = p["W"].shape[0], p["W"].shape[3]
    shifts = _shifts(h, w, size)  # (size², H·W, H·W), numpy constant
    kernel = p["W"].reshape(size * size, c_in, c_out)  # (size², C_in, C_out)
    op = jnp.einsum("kpq,kio->piqo", shifts, kernel).reshape(h * w * c_in, h * w * c_out)
    out = (x.reshape(n, h * w * c_in) @ op).reshape(n, h, w, c_out)
    return out + p["b"]


def image_patches(images: np.ndarray, size: int = 3) -> np.ndarray:
    """The ``size×size`` neighbourhood of every pixel, zero padded (numpy, for fixed data):
    (n, H, W, C) → (n, H, W, size²·C), taps in the order of :func:`conv_init`'s kernel."""
    n, h, w, c = images.shape
    r = size // 2
    padded = np.pad(images, ((0, 0), (r, r), (r, r), (0, 0)))
    taps = [padded[:, a : a + h, b : b + w, :] for a in range(size) for b in range(size)]
    return np.concatenate(taps, axis=-1)


def conv2d_patches(p: dict, patches: jax.Array) -> jax.Array:
    """:func:`conv2d` of fixed inputs given as :func:`image_patches`: one matrix product,
    (n, H, W, size²·C_in) → (n, H, W, C_out)."""
    size, _, c_in, c_out = p["W"].shape
    return patches @ p["W"].reshape(size * size * c_in, c_out) + p["b"]


def avg_pool2(x: jax.Array) -> jax.Array:
    """Mean over 2×2 blocks: (n, H, W, C) → (n, H/2, W/2, C) (H, W even)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def attention_init(rng: np.random.Generator, dim: int, scale: float = 1.0) -> dict:
    """Query, key, value and output projections, each (dim, dim) without bias."""
    return {
        name: dense_init(rng, dim, dim, scale if name == "o" else 1.0, bias=False)
        for name in ("q", "k", "v", "o")
    }


def attention(p: dict, x: jax.Array, heads: int, causal: bool) -> jax.Array:
    """Multi-head softmax attention: (n, T, d) → (n, T, d).

    With ``d = heads·d_h``, head ``a`` computes
    ``softmax(Q_a K_aᵀ / √d_h + M) V_a`` with ``Q = x W_q`` etc. and ``M`` the
    causal mask (``−∞`` above the diagonal) when ``causal``; the heads are
    concatenated and projected by ``W_o``.
    """
    n, t, d = x.shape
    dh = d // heads

    def split(z):  # (n, T, d) -> (n, heads, T, d_h)
        return z.reshape(n, t, heads, dh).transpose(0, 2, 1, 3)

    q, k, v = (split(dense(p[name], x)) for name in ("q", "k", "v"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)  # (n, heads, T, T)
    if causal:
        allowed = np.tril(np.ones((t, t), dtype=bool))  # (T, T) position i sees j <= i
        scores = jnp.where(allowed, scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)  # (n, heads, T, T)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(n, t, d)  # (n, T, d)
    return dense(p["o"], out)


def transformer_block_init(rng: np.random.Generator, width: int) -> dict:
    """Parameters of one pre-norm block: two layer norms, attention, a 2×width MLP."""
    return {
        "norm1": norm_init(width),
        "attn": attention_init(rng, width),
        "norm2": norm_init(width),
        "up": dense_init(rng, width, 2 * width),
        "down": dense_init(rng, 2 * width, width),
    }


def transformer_block(p: dict, h: jax.Array, heads: int, causal: bool) -> jax.Array:
    """``h + A(LN(h))`` then ``h + W₂ gelu(W₁ LN(h) + b₁) + b₂``: (n, T, width) → same."""
    h = h + attention(p["attn"], layer_norm(p["norm1"], h), heads, causal)
    return h + dense(p["down"], jax.nn.gelu(dense(p["up"], layer_norm(p["norm2"], h))))
