"""User problems: a Python file or module that returns ``(loss_fn, w0)``.

A user names a function with ``"path/to/file.py:make_problem"`` or
``"package.module:make_problem"``; :func:`load_user_problem` imports it (only
then: user code never runs unless named), calls it with the given options and
checks what it returns::

    def make_problem(width: int = 16, seed: int = 0):
        ...
        return loss_fn, w0          # w0: any pytree of float arrays

``w0`` is flattened with :func:`jax.flatten_util.ravel_pytree` to one float64
vector and ``loss_fn`` is wrapped to take that vector. Every mistake (a missing
file or function, an import that raises, a loss that is not a scalar, cannot
be traced by JAX, or is not finite at ``w0``) is a
:class:`~flowgen.errors.ProblemError` with a one-sentence message, the line of
the user's file when known, and a hint.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from flowgen.errors import Location, ProblemError, location_in
from flowgen.problems.base import SPEC_HINT, Problem

__all__ = ["load_user_problem"]


def load_user_problem(spec: str, options: dict[str, Any]) -> Problem:
    """Import ``source:function`` (a ``.py`` path or a module), call it, check the result.

    Args:
        spec: ``"path/to/file.py:func"`` or ``"package.module:func"`` (stripped).
        options: keyword arguments for ``func``.
    """
    target, _, func_name = spec.rpartition(":")
    if not target or not func_name.isidentifier():
        raise ProblemError(
            f"problem specification `{spec}` is not of the form source:function",
            hint=SPEC_HINT,
        )
    if target.endswith(".py") or os.sep in target or "/" in target or os.path.isfile(target):
        module, path = _load_file(target), os.path.abspath(target)
    else:
        module = _load_module(target)
        path = getattr(module, "__file__", None)
    return _from_user(spec, module, func_name, path, options)


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
