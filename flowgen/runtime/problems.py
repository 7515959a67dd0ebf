"""Problems: a loss on a flat float64 parameter vector and where to start.

A :class:`Problem` is the contract between "what is being optimised" and the
rest of the runtime (discrete optimizers, stable and central flows)::

    problem = get_problem("digits-mlp", n=400)
    problem.loss(problem.w0)        # scalar float64
    problem.n                       # number of parameters

Problems come from three places, all named by one string ``spec``:

* a built-in name (:data:`BUILTIN`): ``"quadratic"``, ``"digits-mlp"``;
* a Python file, ``"path/to/file.py:make_problem"``;
* an importable module, ``"package.module:make_problem"``.

A user function returns ``(loss_fn, w0)``; ``w0`` may be any pytree of arrays
(it is flattened with :func:`jax.flatten_util.ravel_pytree` and ``loss_fn`` is
wrapped to take the flat vector). User code is imported only when the user
names it. Every mistake in a specification is reported as a
:class:`~flowgen.errors.ProblemError` with a one-sentence message and a hint.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from flowgen.errors import Location, ProblemError, location_in  # noqa: E402
from flowgen.precision import in_float64

__all__ = [
    "BUILTIN",
    "Problem",
    "digits_mlp",
    "get_problem",
    "parse_problem_options",
    "quadratic",
]


# --------------------------------------------------------------------------- #
# The contract
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class Problem:
    """A differentiable loss on a flat float64 parameter vector.

    Attributes:
        name: what the problem is called (the spec it came from).
        loss: ``loss(w) -> scalar``; ``w`` has shape ``(n,)``, float64; written
            with ``jax.numpy`` so it can be jitted and differentiated.
        w0: the initial point, shape ``(n,)``, float64.
        unravel: maps a flat vector back to the user's pytree (``None`` when
            the parameters were a flat vector to begin with).
        info: plain data describing the problem: the options used,
            ``n_params``, and problem-specific facts. Suitable for a config file.
    """

    name: str
    loss: Callable[[jax.Array], jax.Array]
    w0: jax.Array
    unravel: Callable[[jax.Array], Any] | None = None
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Number of parameters."""
        return int(self.w0.shape[0])


# --------------------------------------------------------------------------- #
# Built-in: an ill-conditioned quadratic that sharpens
# --------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------- #
# Built-in: an MLP on scikit-learn's digits (the paper-style benchmark)
# --------------------------------------------------------------------------- #

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
}


def _digits_data(n: int, classes: int, keep_constant: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """The first ``n`` digits of classes ``0..classes-1``, standardised per pixel.

    Returns ``X`` (n, d), one-hot ``Y`` (n, classes) and the dropped pixel indices.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    images, labels = load_digits(return_X_y=True)  # (1797, 64), (1797,)
    mask = labels < classes
    available = int(mask.sum())
    if n > available:
        raise ProblemError(
            f"digits has only {available} examples of classes 0..{classes - 1}, asked for n={n}",
            hint=f"use n <= {available} (or more classes)",
        )
    x = images[mask][:n].astype(np.float64)  # (n, 64)
    y = labels[mask][:n]  # (n,)
    mean, std = x.mean(axis=0), x.std(axis=0)  # (64,), (64,)
    constant = std == 0.0
    dropped = [int(i) for i in np.flatnonzero(constant)]
    if keep_constant:
        x = (x - mean) / np.where(constant, 1.0, std)
        x[:, constant] = 0.0  # exactly zero: their weights get identically zero gradients
        dropped = []
    else:
        x = (x[:, ~constant] - mean[~constant]) / std[~constant]
    onehot = np.eye(classes)[y]  # (n, classes)
    return x, onehot, dropped


@in_float64
def digits_mlp(
    n: int = 400,
    classes: int = 4,
    width: int = 32,
    depth: int = 2,
    init_scales: tuple[float, ...] = (0.2, 1.0, 0.1),
    seed: int = 0,
    activation: str = "tanh",
    keep_constant: bool = False,
) -> Problem:
    r"""An MLP on scikit-learn's bundled digits, trained full-batch with MSE.

    Data: the first ``n`` examples of classes ``0..classes-1`` (dataset order),
    each pixel standardised over those ``n`` examples (mean 0, std 1); pixels
    constant on them are dropped (for n=400, classes=4, 10 pixels are dropped
    and 54 inputs remain). With ``keep_constant=True`` they are kept as
    columns of exact zeros, so the first layer's weights on them get an
    identically zero gradient (a known NaN pitfall for RMSProp-like flows).

    Model: ``inputs → width → … → classes`` with ``depth`` hidden layers and
    ``activation``; loss ``L = ½ · mean_i ‖f(x_i) − y_i‖²`` (squared error
    summed over the outputs, averaged over examples) on one-hot ``y``.

    Init: LeCun normal (std ``1/√fan_in``, biases 0) seeded by ``seed``
    (numpy ``default_rng``), weight layer ``k`` multiplied by ``init_scales[k]``.
    The small scales (0.2, 1, 0.1) make GD sharpen progressively; at LeCun
    scale these small MLPs never reach the edge of stability. Measured (GD,
    lr 0.4, defaults): sharpness 2.7 at step 0, ≥ 5 = 2/lr by step ~15, then
    hovers around 5.

    Parameters are a list of ``{"W": (fan_in, fan_out), "b": (fan_out,)}``
    dicts, flattened with ``ravel_pytree`` (2948 parameters with the defaults).
    """
    _check_int("digits-mlp", "n", n, 1)
    _check_int("digits-mlp", "classes", classes, 2, 10)
    _check_int("digits-mlp", "width", width, 1)
    _check_int("digits-mlp", "depth", depth, 1)
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise ProblemError(
            f"digits-mlp needs an integer seed, got seed={seed!r}", hint="e.g. seed=0"
        )
    if activation not in _ACTIVATIONS:
        raise ProblemError(
            f"digits-mlp has no activation {activation!r}",
            hint="choose one of: " + ", ".join(_ACTIVATIONS),
        )
    scales = tuple(init_scales) if isinstance(init_scales, list | tuple) else (init_scales,)
    if len(scales) != depth + 1 or not all(_is_real(s) and np.isfinite(s) for s in scales):
        raise ProblemError(
            f"digits-mlp needs {depth + 1} numbers in init_scales (one per weight layer), "
            f"got {init_scales!r}",
            hint="e.g. init_scales=0.2,1,0.1 for depth=2",
        )
    scales = tuple(float(s) for s in scales)

    x, y, dropped = _digits_data(int(n), int(classes), bool(keep_constant))
    n_inputs = x.shape[1]
    dims = [n_inputs] + [int(width)] * int(depth) + [int(classes)]
    rng = np.random.default_rng(seed)
    params = []
    for k, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in) * scales[k]
        params.append({"W": jnp.asarray(w), "b": jnp.zeros(fan_out, dtype=jnp.float64)})
    w0, unravel = ravel_pytree(params)

    x_j, y_j = jnp.asarray(x), jnp.asarray(y)  # (n, d), (n, classes)
    act = _ACTIVATIONS[activation]

    def loss(w: jax.Array) -> jax.Array:
        layers = unravel(w)
        h = x_j  # (n, d)
        for layer in layers[:-1]:
            h = act(h @ layer["W"] + layer["b"])  # (n, width)
        out = h @ layers[-1]["W"] + layers[-1]["b"]  # (n, classes)
        return 0.5 * jnp.mean(jnp.sum((out - y_j) ** 2, axis=1))

    info = {
        "builtin": "digits-mlp",
        "options": {
            "n": int(n),
            "classes": int(classes),
            "width": int(width),
            "depth": int(depth),
            "init_scales": scales,
            "seed": int(seed),
            "activation": activation,
            "keep_constant": bool(keep_constant),
        },
        "n_params": int(w0.shape[0]),
        "n_inputs": int(n_inputs),
        "n_examples": int(n),
        "dropped_pixels": dropped,
        "loss": "0.5 * mean_i sum_k (f(x_i)_k - y_ik)^2",
    }
    return Problem(name="digits-mlp", loss=loss, w0=w0, unravel=unravel, info=info)


BUILTIN: dict[str, Callable[..., Problem]] = {"quadratic": quadratic, "digits-mlp": digits_mlp}


# --------------------------------------------------------------------------- #
# Options given as text (the CLI's key=value)
# --------------------------------------------------------------------------- #

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def parse_problem_options(items: Sequence[str], spec: str | None = None) -> dict[str, Any]:
    """Turn ``["n=200", "init_scales=0.2,1,0.1"]`` into keyword options.

    ``{"n": 200, "init_scales": (0.2, 1.0, 0.1)}`` for the example above.

    With ``spec`` naming a built-in, each value is converted to the type of
    that option's default (int, float, bool, str, tuple of numbers) and an
    unknown option is an error listing the valid ones. Otherwise (user
    functions) values are read literally: int, then float, then true/false,
    then a comma list of those, else the string itself.
    """
    builtin = BUILTIN.get(spec) if spec is not None else None
    defaults = _defaults(builtin) if builtin is not None else None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ProblemError(
                f"problem option {item!r} is not of the form key=value",
                hint="write e.g. n=200 or init_scales=0.2,1,0.1",
            )
        if key in out:
            raise ProblemError(
                f"problem option `{key}` is given twice", hint="give each option once"
            )
        text = text.strip()
        if defaults is None:
            out[key] = _literal(text)
            continue
        if key not in defaults:
            raise ProblemError(
                f"built-in problem `{spec}` has no option `{key}`",
                hint=_options_hint(spec, key, defaults),
            )
        out[key] = _convert(spec, key, text, defaults[key])
    return out


def _defaults(fn: Callable) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _options_hint(spec: str, key: str, defaults: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(defaults), n=1)
    valid = ", ".join(f"{k} (default {_show(v)})" for k, v in defaults.items())
    lead = f"did you mean `{close[0]}`? " if close else ""
    return f"{lead}valid options of `{spec}`: {valid}"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    return str(value)


def _convert(spec: str, key: str, text: str, default: Any) -> Any:
    """Convert ``text`` to the type of ``default``."""

    def bad(kind: str, example: str) -> ProblemError:
        return ProblemError(
            f"option `{key}` of `{spec}` expects {kind}, got {text!r}",
            hint=f"write e.g. {key}={example}",
        )

    if isinstance(default, bool):
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise bad("true or false", "true")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an integer", str(default)) from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise bad("a number", str(default)) from None
    if isinstance(default, tuple):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            raise bad("comma-separated numbers", _show(default)) from None
    return text


def _literal(text: str) -> Any:
    """Read a value without knowing its type: int, float, bool, comma list, else str."""
    if "," in text:
        return tuple(_literal(p.strip()) for p in text.split(",") if p.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    return text


# --------------------------------------------------------------------------- #
# Resolving a spec
# --------------------------------------------------------------------------- #


@in_float64
def get_problem(spec: str, **options: Any) -> Problem:
    """Build the problem named by ``spec``.

    Args:
        spec: a built-in name (``"quadratic"``, ``"digits-mlp"``),
            ``"path/to/file.py:func"`` or ``"package.module:func"``.
        **options: keyword options. For a built-in they must be among its
            parameters (strings are converted as by :func:`parse_problem_options`);
            for a user function they are passed as keyword arguments.

    Raises:
        ProblemError: for every mistake in the specification or the problem it builds.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ProblemError(
            f"a problem specification must be a non-empty string, got {spec!r}",
            hint=_spec_hint(),
        )
    spec = spec.strip()
    if spec in BUILTIN:
        return _builtin(spec, options)
    if ":" not in spec:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            raise ProblemError(
                f"problem file `{spec}` does not name a function",
                hint=f"write `{spec}:make_problem` (the function returning (loss_fn, w0))",
            )
        close = difflib.get_close_matches(spec, list(BUILTIN), n=1, cutoff=0.5)
        lead = f"did you mean `{close[0]}`? " if close else ""
        raise ProblemError(
            f"unknown built-in problem `{spec}`",
            hint=f"{lead}built-ins: {', '.join(BUILTIN)}; or {_spec_hint()}",
        )
    target, _, func_name = spec.rpartition(":")
    if not target or not func_name.isidentifier():
        raise ProblemError(
            f"problem specification `{spec}` is not of the form source:function",
            hint=_spec_hint(),
        )
    if target.endswith(".py") or os.sep in target or "/" in target or os.path.isfile(target):
        module, path = _load_file(target), os.path.abspath(target)
    else:
        module = _load_module(target)
        path = getattr(module, "__file__", None)
    return _from_user(spec, module, func_name, path, options)


def _spec_hint() -> str:
    return "name a built-in, `path/to/file.py:function` or `package.module:function`"


def _builtin(spec: str, options: dict[str, Any]) -> Problem:
    fn = BUILTIN[spec]
    defaults = _defaults(fn)
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key not in defaults:
            raise ProblemError(
                f"built-in problem `{spec}` has no option `{key}`",
                hint=_options_hint(spec, key, defaults),
            )
        default = defaults[key]
        if isinstance(value, str) and not isinstance(default, str):
            value = _convert(spec, key, value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    return fn(**kwargs)


# --------------------------------------------------------------------------- #
# User code
# --------------------------------------------------------------------------- #


def _load_file(target: str) -> Any:
    """Import a Python file as a fresh module."""
    path = os.path.abspath(target)
    if not os.path.exists(path):
        raise ProblemError(
            f"no such file `{target}`",
            hint="check the path (relative paths are relative to the current directory)",
        )
    if os.path.isdir(path):
        raise ProblemError(
            f"`{target}` is a directory, not a Python file",
            hint="name a .py file, e.g. `examples/my_problem.py:make_problem`",
        )
    name = "flowgen_user_problem_" + format(abs(hash(path)), "x")
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader(name, path)
    module_spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if module_spec is None:  # pragma: no cover - SourceFileLoader accepts any path
        raise ProblemError(f"cannot import `{target}`", hint="name a Python source file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    directory = os.path.dirname(path)
    sys.path.insert(0, directory)  # let the file import its sibling modules
    try:
        loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        loc = None
        if exc.lineno is not None:
            loc = _location(path, exc.lineno, exc.offset or 1)
        raise ProblemError(
            f"problem file `{target}` has a syntax error: {exc.msg}",
            location=loc,
            hint="fix the Python syntax; the file is imported as a module",
        ) from None
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ProblemError(
            f"importing `{target}` raised {_one_line(exc)}",
            location=_user_location(exc, path),
            hint="the file is run top to bottom when imported; fix the error it raises",
        ) from None
    finally:
        try:
            sys.path.remove(directory)
        except ValueError:  # pragma: no cover - removed by the user's code
            pass
    return module


def _load_module(target: str) -> Any:
    """Import ``package.module``."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (target == missing or target.startswith(missing + ".")):
            raise ProblemError(
                f"no module named `{target}`",
                hint="check the spelling and that it is importable (installed or on PYTHONPATH); "
                "for a file write `path/to/file.py:function`",
            ) from None
        raise ProblemError(
            f"importing `{target}` raised {_one_line(exc)}",
            hint="the module imports something that is not installed",
        ) from None
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        path = _module_origin(target)
        raise ProblemError(
            f"importing `{target}` raised {_one_line(exc)}",
            location=_user_location(exc, path) if path else None,
            hint="fix the error the module raises when it is imported",
        ) from None


def _module_origin(target: str) -> str | None:
    try:
        found = importlib.util.find_spec(target)
    except Exception:  # noqa: BLE001 - a broken parent package
        return None
    return found.origin if found is not None else None


def _from_user(
    spec: str, module: Any, func_name: str, path: str | None, options: dict[str, Any]
) -> Problem:
    source = spec.rpartition(":")[0]
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        mod_name = getattr(module, "__name__", "")
        found = sorted(
            k
            for k, v in vars(module).items()
            if not k.startswith("_")
            and callable(v)
            and not inspect.isclass(v)
            and getattr(v, "__module__", mod_name) == mod_name
        )
        close = difflib.get_close_matches(func_name, found, n=1)
        lead = f"did you mean `{close[0]}`? " if close else ""
        if fn is not None:
            message = f"`{func_name}` in `{source}` is not a function"
        else:
            message = f"`{source}` does not define a function `{func_name}`"
        listing = ", ".join(f"`{k}`" for k in found) if found else "none"
        raise ProblemError(message, hint=f"{lead}functions it defines: {listing}")

    _check_user_options(spec, fn, options)
    try:
        result = fn(**options)
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ProblemError(
            f"`{spec}` raised {_one_line(exc)}",
            location=_user_location(exc, path) if path else None,
            hint="the function must build the problem and return (loss_fn, w0)",
        ) from None

    if not isinstance(result, tuple | list) or len(result) != 2:
        got = (
            f"a {len(result)}-tuple"
            if isinstance(result, tuple | list)
            else f"a {type(result).__name__}"
        )
        raise ProblemError(
            f"`{spec}` must return (loss_fn, w0), got {got}",
            hint="end the function with `return loss_fn, w0`",
        )
    loss_fn, w0_tree = result
    if not callable(loss_fn):
        raise ProblemError(
            f"the first value returned by `{spec}` must be the loss function, "
            f"got a {type(loss_fn).__name__}",
            hint="return (loss_fn, w0) in this order, with loss_fn(w0) a scalar",
        )
    w0, unravel = _flatten_w0(spec, w0_tree)
    flat_loss = _wrap_loss(loss_fn, unravel)
    _check_loss(spec, _wrap_loss(loss_fn, unravel, cast=False), flat_loss, w0, path)
    info = {
        "spec": spec,
        "source": path if path else source,
        "function": func_name,
        "options": dict(options),
        "n_params": int(w0.shape[0]),
        "pytree": unravel is not None,
    }
    return Problem(
        name=_short_name(source, func_name), loss=flat_loss, w0=w0, unravel=unravel, info=info
    )


def _short_name(source: str, func_name: str) -> str:
    """``my_problem.make_problem`` for ``path/to/my_problem.py:make_problem``: safe in paths."""
    stem = os.path.basename(source)
    stem = stem[:-3] if stem.endswith(".py") else stem
    return f"{stem}.{func_name}"


def _check_user_options(spec: str, fn: Callable, options: dict[str, Any]) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: just try the call
        return
    try:
        sig.bind(**options)
    except TypeError as exc:
        params = [
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        accepted = ", ".join(f"`{p}`" for p in params) if params else "no options"
        unknown = [k for k in options if k not in params]
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            message = f"`{spec}` does not accept the option `{unknown[0]}`"
        else:
            message = f"`{spec}` cannot be called with the given options: {exc}"
        raise ProblemError(
            message,
            hint=f"it accepts {accepted}; to take an option, give the function a keyword "
            "parameter with a default",
        ) from None


def _flatten_w0(spec: str, tree: Any) -> tuple[jax.Array, Callable | None]:
    """Flatten ``w0`` to a float64 vector; ``unravel`` is None for a flat vector."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ProblemError(
            f"the initial point w0 returned by `{spec}` is empty",
            hint="return the initial parameters: an array or a dict/list of arrays",
        )
    converted = []
    for leaf in leaves:
        try:
            arr = np.asarray(leaf)
        except Exception:  # noqa: BLE001 - e.g. a tracer or an odd object
            arr = np.asarray(object())
        if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
            raise ProblemError(
                f"the initial point w0 returned by `{spec}` contains a non-numeric value "
                f"({type(leaf).__name__} of dtype {arr.dtype})",
                hint="w0 must hold real numbers: float arrays, possibly in a dict or list",
            )
        converted.append(arr)
    if sum(a.size for a in converted) == 0:
        raise ProblemError(
            f"the initial point w0 returned by `{spec}` has no parameters",
            hint="return at least one parameter",
        )
    treedef = jax.tree_util.tree_structure(tree)
    tree64 = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(a, dtype=jnp.float64) for a in converted]
    )
    flat, unravel = ravel_pytree(tree64)
    if jax.tree_util.treedef_is_leaf(treedef) and converted[0].ndim == 1:
        return flat, None
    return flat, unravel


def _wrap_loss(
    loss_fn: Callable, unravel: Callable | None, *, cast: bool = True
) -> Callable[[jax.Array], jax.Array]:
    """``loss_fn`` as a function of the flat vector (its output cast to float64)."""

    def flat_loss(w: jax.Array) -> jax.Array:
        out = loss_fn(w if unravel is None else unravel(w))
        return jnp.asarray(out, dtype=jnp.float64) if cast else out

    return flat_loss


_TRACER_ERRORS = tuple(
    getattr(jax.errors, name)
    for name in (
        "ConcretizationTypeError",
        "TracerArrayConversionError",
        "TracerBoolConversionError",
        "TracerIntegerConversionError",
        "NonConcreteBooleanIndexError",
    )
    if hasattr(jax.errors, name)
)


def _check_loss(
    spec: str, raw_loss: Callable, flat_loss: Callable, w0: jax.Array, path: str | None
) -> None:
    """Shape, dtype, differentiability and finiteness of the loss at ``w0``.

    ``raw_loss`` is the user's loss on the flat vector, ``flat_loss`` the same
    with its output cast to float64.
    """
    not_jax_hint = (
        "the loss must be written with jax.numpy so it can be differentiated: no numpy "
        "calls, float()/int() or Python if on parameter values (use jnp.where)"
    )
    try:
        out = jax.eval_shape(raw_loss, w0)
    except _TRACER_ERRORS as exc:
        raise ProblemError(
            f"the loss of `{spec}` cannot be traced by JAX",
            location=_user_location(exc, path),
            hint=not_jax_hint,
        ) from None
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ProblemError(
            f"the loss of `{spec}` raised {_one_line(exc)} when called on w0",
            location=_user_location(exc, path) if path else None,
            hint="loss_fn(w0) must run; check that it takes w0 in the form returned",
        ) from None
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape is None or dtype is None:
        raise ProblemError(
            f"the loss of `{spec}` must return a JAX scalar, got {type(out).__name__}",
            hint="return a scalar such as jnp.mean(...) or jnp.sum(...)",
        )
    if shape != ():
        raise ProblemError(
            f"the loss of `{spec}` must return a scalar, got an array of shape {tuple(shape)}",
            hint="reduce it, e.g. with jnp.sum(...) or jnp.mean(...)",
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ProblemError(
            f"the loss of `{spec}` must return a real float, got dtype {dtype}",
            hint="compute the loss in floating point (e.g. jnp.mean of squared errors)",
        )
    try:
        jax.eval_shape(jax.grad(flat_loss), w0)
    except _TRACER_ERRORS as exc:
        raise ProblemError(
            f"the loss of `{spec}` cannot be differentiated by JAX",
            location=_user_location(exc, path),
            hint=not_jax_hint,
        ) from None
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ProblemError(
            f"the loss of `{spec}` cannot be differentiated by JAX: {_one_line(exc)}",
            location=_user_location(exc, path) if path else None,
            hint=not_jax_hint,
        ) from None
    try:
        value = float(flat_loss(w0))
        grad = np.asarray(jax.grad(flat_loss)(w0))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ProblemError(
            f"the loss of `{spec}` raised {_one_line(exc)} when evaluated at w0",
            location=_user_location(exc, path) if path else None,
            hint="loss_fn(w0) must run eagerly as well as under jax.jit",
        ) from None
    if not np.isfinite(value):
        raise ProblemError(
            f"the loss of `{spec}` is {value} at w0",
            hint="the loss must be finite at the initial point; check w0 and any log/division",
        )
    if not np.all(np.isfinite(grad)):
        bad = int(np.sum(~np.isfinite(grad)))
        raise ProblemError(
            f"the gradient of the loss of `{spec}` is not finite at w0 ({bad} coordinates)",
            hint="avoid sqrt/log/abs at points where their derivative is infinite",
        )


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _check_int(problem: str, key: str, value: Any, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)
    if not ok:
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ProblemError(
            f"{problem} needs an integer {key} {span}, got {key}={value!r}",
            hint=f"e.g. {key}={_defaults(BUILTIN[problem])[key]}",
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _location(path: str, line: int, column: int) -> Location:
    try:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
    except OSError:
        source = ""
    return location_in(path, source, line, column)


def _user_location(exc: BaseException, path: str | None) -> Location | None:
    """The deepest traceback frame inside the user's file, as a Location."""
    if not path:
        return None
    target = os.path.abspath(path)
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == target and frame.lineno is not None:
            line = frame.lineno
    if line is None:
        return None
    loc = _location(path, line, 1)
    text = loc.source_line
    column = len(text) - len(text.lstrip()) + 1 if text else 1
    return Location(path=loc.path, line=line, column=column, source_line=text)
