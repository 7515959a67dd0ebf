"""flowgen — derive, generate and validate central flows of optimizers.

The pipeline, one subpackage per stage (each imports only earlier ones):
``language`` (parse → AST → checks) → ``symbolic`` (rates, classes, stability,
drift) → ``flow`` (the intermediate :class:`FlowSpec`) → ``codegen`` (JAX
source) → ``runtime`` (problems, eigensolver, SDCP, processes, validation) →
``report`` and ``cli``. :func:`load` is the Python entry point.
"""

__version__ = "0.1.0"

__all__ = ["load", "OptFile", "sweep", "clear_caches", "float64", "__version__"]


def __getattr__(name):  # lazy: `import flowgen` stays light (no JAX on the derive path)
    if name in ("load", "OptFile", "sweep"):
        from flowgen import api

        return getattr(api, name)
    if name == "clear_caches":
        from flowgen.runtime.caches import clear_caches

        return clear_caches
    if name == "float64":  # the scoped float64 context (precision.py imports JAX lazily)
        from flowgen.precision import float64

        return float64
    raise AttributeError(name)
