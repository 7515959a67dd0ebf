"""The table of built-in problems, and resolving a problem specification.

Each built-in is one :class:`Entry`: its name, the module and constructor that
build it (imported only when used, so that listing names costs no JAX import),
the data it uses, a one-line description, and hyperparameters at which GD,
RMSProp and Adam reach the edge of stability on it (measured; see
``docs/problems.md``). Its options and their defaults are the keyword
parameters of the constructor. Adding an architecture is one module in this
package plus one line in :data:`REGISTRY`.

A specification ``spec`` names a built-in, a Python file
(``"path/to/file.py:make_problem"``) or an importable module
(``"package.module:make_problem"``); :func:`get_problem` builds it.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowgen.errors import ProblemError
from flowgen.precision import in_float64
from flowgen.problems.base import SPEC_HINT, Problem, defaults_of

__all__ = [
    "BUILTIN",
    "REGISTRY",
    "Entry",
    "builtin_names",
    "describe_problems",
    "get_problem",
    "parse_problem_options",
]


@dataclass(frozen=True)
class Entry:
    """One built-in problem.

    Attributes:
        name: the name users type (``--problem NAME``).
        module: the module of ``flowgen.problems.zoo`` that defines the constructor.
        function: the constructor's name in that module; its keyword
            parameters are the problem's options.
        data: the data set it trains on (``"digits"``, ``"sorting"``, ``"none"``).
        description: one line.
        suggested: hyperparameters at which the optimizers of ``optimizers/``
            reach the edge of stability on the defaults: ``{"steps": N,
            "gd": {"lr": ...}, "rmsprop": {...}, "adam": {...}}``, each a
            ``--set`` dictionary; ``"steps_<optimizer>"`` overrides ``steps``
            for one optimizer (the edge is reached at different steps).
        eos_step: the measured step at which each suggested run first reaches
            0.95 × its threshold (``{"gd": 120, ...}``).
        alias_of: for an alias, the name of the entry it repeats.
    """

    name: str
    module: str
    function: str
    data: str
    description: str
    suggested: Mapping[str, Any] = field(default_factory=dict)
    eos_step: Mapping[str, int] = field(default_factory=dict)
    alias_of: str | None = None

    @property
    def make(self) -> Callable[..., Problem]:
        """The constructor (imports its module)."""
        module = importlib.import_module(f"flowgen.problems.zoo.{self.module}")
        return getattr(module, self.function)

    def defaults(self) -> dict[str, Any]:
        """The options and their defaults (from the constructor's signature)."""
        return defaults_of(self.make)


def _entries(*entries: Entry) -> dict[str, Entry]:
    return {e.name: e for e in entries}


# fmt: off
REGISTRY: dict[str, Entry] = _entries(
    Entry("quadratic", "quadratic", "quadratic", "none",
          "an ill-conditioned quadratic (softened by a quartic) whose sharpness rises under GD",
          suggested={"steps": 600, "gd": {"lr": 0.01}},
          eos_step={"gd": 200}),
    Entry("mlp", "mlp", "mlp", "digits",
          "fully connected tanh network 54→32→32→4, small init",
          suggested={"steps": 1000, "steps_gd": 500, "steps_rmsprop": 900,
                     "steps_adam": 1200, "gd": {"lr": 0.4},
                     "rmsprop": {"lr": 3e-4, "beta2": 0.99},
                     "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 16, "rmsprop": 367, "adam": 735}),
    Entry("digits-mlp", "mlp", "digits_mlp", "digits",
          "the mlp under its historical name (same defaults and w0)",
          alias_of="mlp"),
    Entry("cnn", "cnn", "cnn", "digits",
          "convolutions 3×3 with tanh and 2×2 average pooling, linear readout",
          suggested={"steps": 700, "steps_gd": 600, "gd": {"lr": 0.8},
                     "rmsprop": {"lr": 1e-3, "beta2": 0.99},
                     "adam": {"lr": 5e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 101, "rmsprop": 260, "adam": 330}),
    Entry("resnet", "resnet", "resnet", "digits",
          "pre-activation residual blocks with group norm, mean-pooled",
          suggested={"steps": 850, "steps_gd": 500, "gd": {"lr": 0.4},
                     "rmsprop": {"lr": 2e-4, "beta2": 0.99},
                     "adam": {"lr": 2e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 30, "rmsprop": 390, "adam": 340}),
    Entry("vit", "vit", "vit", "digits",
          "vision transformer on 4×4 patches, pre-norm, mean-pooled",
          suggested={"steps": 850, "steps_gd": 500, "steps_adam": 1000, "gd": {"lr": 0.3},
                     "rmsprop": {"lr": 3e-4, "beta2": 0.99},
                     "adam": {"lr": 2e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 10, "rmsprop": 410, "adam": 560}),
    Entry("lstm", "lstm", "lstm", "sorting",
          "LSTM reading the sequence, predicting the sorted half",
          suggested={"steps": 600, "steps_gd": 900, "steps_adam": 600, "gd": {"lr": 0.4},
                     "rmsprop": {"lr": 1e-3, "beta2": 0.99},
                     "adam": {"lr": 2e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 430, "rmsprop": 90, "adam": 185}),
    Entry("transformer", "transformer", "transformer", "sorting",
          "causal pre-norm transformer, predicting the sorted half",
          suggested={"steps": 1000, "steps_gd": 800, "steps_adam": 500, "gd": {"lr": 0.15},
                     "rmsprop": {"lr": 1e-4, "beta2": 0.99},
                     "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 330, "rmsprop": 580, "adam": 170}),
    Entry("mamba", "mamba", "mamba", "sorting",
          "selective state-space model (Mamba blocks, lax.scan), predicting the sorted half",
          suggested={"steps": 700, "steps_rmsprop": 1000, "steps_adam": 600, "gd": {"lr": 0.3},
                     "rmsprop": {"lr": 2e-4, "beta2": 0.99},
                     "adam": {"lr": 2e-3, "beta1": 0.9, "beta2": 0.99}},
          eos_step={"gd": 240, "rmsprop": 645, "adam": 125}),
)
# fmt: on


def builtin_names() -> list[str]:
    """The names of the built-ins, in the registry's order (aliases included)."""
    return list(REGISTRY)


class _Constructors(Mapping):
    """``name -> constructor`` over :data:`REGISTRY`; modules are imported on access."""

    def __getitem__(self, name: str) -> Callable[..., Problem]:
        return REGISTRY[name].make

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


#: The built-in constructors by name (a lazy view of :data:`REGISTRY`).
BUILTIN: Mapping[str, Callable[..., Problem]] = _Constructors()


def _entry(name: str) -> Entry:
    """The entry itself, or the entry an alias repeats (for its suggestions)."""
    e = REGISTRY[name]
    return REGISTRY[e.alias_of] if e.alias_of else e


# --------------------------------------------------------------------------- #
# Listing
# --------------------------------------------------------------------------- #


@in_float64
def describe_problems(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Plain data about the built-ins (what ``flowgen problems --json`` prints).

    Each item: ``name``, ``alias_of`` (or ``None``), ``data``, ``description``,
    ``n_params`` (at the defaults; each problem is built once), ``options``
    (name → default), ``suggested`` and ``eos_step`` (see :class:`Entry`).
    """
    out = []
    for name in names if names is not None else builtin_names():
        entry = REGISTRY[name]
        source = _entry(name)
        problem = entry.make()
        out.append(
            {
                "name": name,
                "alias_of": entry.alias_of,
                "data": entry.data,
                "description": entry.description,
                "n_params": problem.n,
                "options": {k: _plain(v) for k, v in entry.defaults().items()},
                "suggested": {k: _plain(v) for k, v in source.suggested.items()},
                "eos_step": dict(source.eos_step),
            }
        )
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
    defaults = REGISTRY[spec].defaults() if spec in REGISTRY else None
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
        spec: a built-in name (see :func:`builtin_names`),
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
            hint=SPEC_HINT,
        )
    spec = spec.strip()
    if spec in REGISTRY:
        return _builtin(spec, options)
    if ":" not in spec:
        if spec.endswith(".py") or os.sep in spec or "/" in spec:
            raise ProblemError(
                f"problem file `{spec}` does not name a function",
                hint=f"write `{spec}:make_problem` (the function returning (loss_fn, w0))",
            )
        close = difflib.get_close_matches(spec, builtin_names(), n=1, cutoff=0.5)
        lead = f"did you mean `{close[0]}`? " if close else ""
        raise ProblemError(
            f"unknown built-in problem `{spec}`",
            hint=f"{lead}built-ins: {', '.join(builtin_names())}; or {SPEC_HINT}",
        )
    from flowgen.problems.user import load_user_problem

    return load_user_problem(spec, options)


def _builtin(spec: str, options: dict[str, Any]) -> Problem:
    entry = REGISTRY[spec]
    defaults = entry.defaults()
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
    return entry.make(**kwargs)
