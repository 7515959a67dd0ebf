"""Stage 4: code generation — a readable, self-contained JAX module per optimizer."""

from flowgen.codegen.jaxgen import generate, load_module

__all__ = ["generate", "load_module"]
