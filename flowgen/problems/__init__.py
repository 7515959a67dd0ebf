"""Problems: a loss on a flat float64 parameter vector and where to start.

A :class:`Problem` is the contract between "what is being optimised" and the
rest of flowgen (discrete optimizers, stable and central flows)::

    problem = get_problem("cnn", criterion="ce")
    problem.loss(problem.w0)        # scalar float64
    problem.n                       # number of parameters

Problems come from three places, all named by one string ``spec``:

* a built-in (:data:`REGISTRY`, listed by ``flowgen problems``): ``quadratic``
  and one small model per architecture on bundled data — ``mlp`` (alias
  ``digits-mlp``), ``cnn``, ``resnet``, ``vit`` on scikit-learn's digits;
  ``lstm``, ``transformer``, ``mamba`` on a toy sorting task;
* a Python file, ``"path/to/file.py:make_problem"``;
* an importable module, ``"package.module:make_problem"``.

Layout: :mod:`~flowgen.problems.base` (the contract, option checks),
:mod:`~flowgen.problems.registry` (the table, :func:`get_problem`, option
parsing), :mod:`~flowgen.problems.user` (user files and their checks),
:mod:`~flowgen.problems.data`, :mod:`~flowgen.problems.losses`,
:mod:`~flowgen.problems.nn` (shared layers), and one module per built-in in
:mod:`flowgen.problems.zoo`.
Importing this package imports no JAX; the constructors load on first use.
"""

from __future__ import annotations

from typing import Any

from flowgen.problems.base import Problem
from flowgen.problems.registry import (
    BUILTIN,
    REGISTRY,
    Entry,
    builtin_names,
    describe_problems,
    get_problem,
    parse_problem_options,
)

__all__ = [
    "BUILTIN",
    "QUADRATIC_EOS_LR",
    "REGISTRY",
    "Entry",
    "Problem",
    "builtin_names",
    "describe_problems",
    "digits_mlp",
    "get_problem",
    "mlp",
    "parse_problem_options",
    "quadratic",
]

# constructors importable by name, loaded (with JAX) on first access
_LAZY = {
    "quadratic": ("quadratic", "quadratic"),
    "QUADRATIC_EOS_LR": ("quadratic", "QUADRATIC_EOS_LR"),
    "mlp": ("mlp", "mlp"),
    "digits_mlp": ("mlp", "digits_mlp"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"flowgen.problems.zoo.{module}"), attr)
    raise AttributeError(f"module 'flowgen.problems' has no attribute {name!r}")
