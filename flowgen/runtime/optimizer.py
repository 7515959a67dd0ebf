"""A derived optimizer, loaded for the runtime from its generated module.

The runtime executes exactly the code :func:`flowgen.codegen.generate` writes
for users (loaded in memory), so what users read is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import jax
import jax.numpy as jnp

from flowgen.codegen import generate, load_module
from flowgen.flow.spec import FlowSpec


@dataclass(frozen=True)
class Optimizer:
    """Pure functions of one optimizer at fixed hyperparameters (optax-like)."""

    spec: FlowSpec
    source: str
    module: ModuleType = field(repr=False)

    @classmethod
    def from_spec(cls, spec: FlowSpec) -> Optimizer:
        src = generate(spec)
        return cls(spec, src, load_module(src, spec.name))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def hyper(self) -> dict[str, float]:
        return dict(self.module.HYPER)

    @property
    def threshold(self) -> float | None:
        return self.module.threshold(self.module.HYPER)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(self.module.STATES)

    def init(self, w: jax.Array) -> dict:
        return self.module.init_state(w, self.module.HYPER)

    def step(self, w, state, g, t):
        return self.module.step(w, state, g, t, self.module.HYPER)

    def precond(self, w, state, t):
        return self.module.precond(w, state, t, self.module.HYPER)

    def rates(self, w, state, g, t):
        return self.module.rates(w, state, g, t, self.module.HYPER)

    def drift(self, w, state, Eg, Vg, t):
        return self.module.drift(w, state, Eg, Vg, t, self.module.HYPER)

    @property
    def has_precond(self) -> bool:
        return self.spec.stability is not None and self.spec.stability.effective_step is not None

    def effective_step(self, w, state, t):
        """``p`` as an array of w's shape (ones·lr-like when the update does not factor)."""
        p = self.precond(w, state, t)
        if p is None:
            return jnp.ones_like(w)
        return p


def tree_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
