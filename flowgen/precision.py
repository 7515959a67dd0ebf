"""Float64 for flowgen's own computations, without touching JAX's global config.

Importing flowgen never changes ``jax.config``. Every entry point that
simulates (the API's ``run``/``validate``/``explain``, the processes, the
problem constructors) runs inside :func:`float64`, a scoped
``jax.enable_x64(True)``; outside it the user's setting is untouched::

    with flowgen.float64():
        problem = flowgen.problems.get_problem("mlp")
        problem.loss(problem.w0)         # float64

JAX is imported lazily, so the derivation path (``flowgen derive``) stays free
of it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

F = TypeVar("F", bound=Callable)

__all__ = ["float64", "in_float64"]


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Run the block with 64-bit JAX types enabled (restored on exit)."""
    import jax

    with jax.enable_x64(True):
        yield


def in_float64(fn: F) -> F:
    """Decorator: call ``fn`` inside :func:`float64`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with float64():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
