"""The :class:`Problem` contract and the checks every built-in runs on its options.

A problem is a differentiable loss on one flat float64 parameter vector and the
point to start from. This module imports no JAX at load time, so the command
line can list problems without paying for it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from flowgen.errors import ProblemError

if TYPE_CHECKING:  # pragma: no cover
    import jax

__all__ = ["SPEC_HINT", "USER_SPEC", "Options", "Problem", "defaults_of"]

#: How to name a user's problem.
USER_SPEC = "`path/to/file.py:function` or `package.module:function`"
#: How to name a problem, for hints.
SPEC_HINT = f"name a built-in, {USER_SPEC}"


@dataclass(frozen=True, eq=False)
class Problem:
    """A differentiable loss on a flat float64 parameter vector.

    Attributes:
        name: what the problem is called (the spec it came from).
        loss: ``loss(w) -> scalar``; ``w`` has shape ``(n,)``, float64; written
            with ``jax.numpy`` so it can be jitted and differentiated (three
            times: the central flow needs ``∇³L``).
        w0: the initial point, shape ``(n,)``, float64.
        unravel: maps a flat vector back to the parameter pytree (``None`` when
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


def defaults_of(fn: Callable) -> dict[str, Any]:
    """The keyword parameters of a constructor and their defaults: its options."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def is_real(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


class Options:
    """Checks the options of one built-in constructor, with hints from its defaults.

    Each method returns the value in its plain Python type or raises a
    :class:`~flowgen.errors.ProblemError` naming the problem, the option and
    the accepted range, with the default as an example::

        opts = Options("cnn", cnn)
        channels = opts.int("channels", channels, 1)   # "cnn needs an integer channels >= 1"

    and records it in :attr:`values` (in the order checked), the ``options`` of the
    problem's ``info``.
    """

    def __init__(self, problem: str, constructor: Callable):
        self.problem = problem
        self.defaults = defaults_of(constructor)
        self.values: dict[str, Any] = {}

    def _keep(self, key: str, value: Any) -> Any:
        self.values[key] = value
        return value

    def _example(self, key: str) -> str:
        default = self.defaults.get(key)
        if isinstance(default, tuple):
            return f"{key}=" + ",".join(str(v) for v in default)
        return f"{key}={default}"

    def int(self, key: str, value: Any, low: int, high: int | None = None) -> int:
        """An integer in ``[low, high]``."""
        ok = is_int(value) and value >= low and (high is None or value <= high)
        if not ok:
            span = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ProblemError(
                f"{self.problem} needs an integer {key} {span}, got {key}={value!r}",
                hint=f"e.g. {self._example(key)}",
            )
        return self._keep(key, int(value))

    def seed(self, value: Any) -> int:
        """Any integer."""
        if not is_int(value):
            raise ProblemError(
                f"{self.problem} needs an integer seed, got seed={value!r}", hint="e.g. seed=0"
            )
        return self._keep("seed", int(value))

    def real(
        self, key: str, value: Any, low: float | None = None, *, strict: bool = False
    ) -> float:
        """A finite real number ``>= low`` (``> low`` with ``strict``)."""
        ok = is_real(value) and bool(np.isfinite(value))
        if ok and low is not None:
            ok = value > low if strict else value >= low
        if not ok:
            span = "" if low is None else (f" > {low:g}" if strict else f" >= {low:g}")
            raise ProblemError(
                f"{self.problem} needs a finite number {key}{span}, got {key}={value!r}",
                hint=f"e.g. {self._example(key)}",
            )
        return self._keep(key, float(value))

    def member(self, key: str, value: Any, allowed: Sequence[int]) -> int:
        """An integer among ``allowed``."""
        if not is_int(value) or value not in allowed:
            raise ProblemError(
                f"{self.problem} needs {key} in {{{', '.join(map(str, allowed))}}}, "
                f"got {key}={value!r}",
                hint=f"e.g. {self._example(key)}",
            )
        return self._keep(key, int(value))

    def choice(self, key: str, value: Any, choices: Sequence[str]) -> str:
        """One of ``choices``."""
        if value not in choices:
            raise ProblemError(
                f"{self.problem} has no {key} {value!r}",
                hint="choose one of: " + ", ".join(choices),
            )
        return self._keep(key, str(value))

    def criterion(self, value: Any) -> str:
        """``"mse"`` (squared error on one-hot targets) or ``"ce"`` (cross-entropy)."""
        if value not in ("mse", "ce"):
            raise ProblemError(
                f"{self.problem} has no criterion {value!r}",
                hint="choose criterion=mse (squared error on one-hot targets) or "
                "criterion=ce (cross-entropy on logits)",
            )
        return self._keep("criterion", str(value))

    def divides(self, key: str, value: int, by_key: str, by: int) -> None:
        """``value`` is a multiple of ``by`` (e.g. a width split into heads)."""
        if value % by != 0:
            raise ProblemError(
                f"{self.problem} needs {key} to be a multiple of {by_key}, "
                f"got {key}={value} and {by_key}={by}",
                hint=f"e.g. {self._example(key)} with {self._example(by_key)}",
            )
