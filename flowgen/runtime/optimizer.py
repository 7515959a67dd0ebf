"""A derived optimizer, loaded for the runtime from its generated module.

The runtime executes exactly the code :func:`flowgen.codegen.generate` writes
for users (loaded in memory), so what users read is what runs. The adapter
reads the module's tables rather than hard-wiring them:

* ``FLOW_STATES``: the ODE states of the stable and central flows. The
  discrete state also holds *delay states* (the previous gradient, ...); a
  flow started from a discrete state or from ``init`` carries only the flow
  states (:meth:`Optimizer.flow_state`);
* ``MOMENTS``: what ``drift`` reads after ``(w, state)``, each a sum of
  ``coef · einsum(spec, *operands)`` over the central flow's ``grad = ∇L``
  (n,), ``G_ij = ∇⟨H, u_i u_jᵀ⟩`` (k, k, n), ``HU`` (n, k) and ``X`` (k, k)
  (:meth:`Optimizer.moments`); with ``Σ = 0`` the terms in ``X`` vanish.
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

    @property
    def flow_state_names(self) -> tuple[str, ...]:
        """The ODE states of the flows (every state but the delay states)."""
        return tuple(self.module.FLOW_STATES)

    @property
    def moment_names(self) -> tuple[str, ...]:
        """The moments ``drift`` reads after ``(w, state)``, in order."""
        return tuple(self.module.MOMENTS)

    def flow_state(self, state: dict) -> dict:
        """``state`` without its delay states: what the stable and central flows carry."""
        return {k: state[k] for k in self.module.FLOW_STATES}

    def moments(self, grad, G=None, HU=None, X=None) -> tuple:
        """The moments of the gradient ``drift`` reads, from the module's ``MOMENTS`` table.

        ``grad`` (n,) is ``∇L(w̄)``; ``G`` (k, k, n), ``HU`` (n, k) and ``X`` (k, k)
        describe ``Σ = U X Uᵀ``. Without them (``Σ = 0``, the stable flow) every term
        in them vanishes: ``Eg = ∇L``, ``Vg = 0``.
        """
        operands = {"grad": grad, "G": G, "HU": HU, "X": X}
        out = []
        for terms in self.module.MOMENTS.values():
            value = jnp.zeros_like(grad)  # (n,)
            for coef, spec, names in terms:
                args = [operands[n] for n in names]
                if any(a is None for a in args):
                    continue
                value = value + coef * jnp.einsum(spec, *args)
            out.append(value)
        return tuple(out)

    def init(self, w: jax.Array) -> dict:
        return self.module.init_state(w, self.module.HYPER)

    def step(self, w, state, g, t):
        return self.module.step(w, state, g, t, self.module.HYPER)

    def precond(self, w, state, t):
        return self.module.precond(w, state, t, self.module.HYPER)

    def rates(self, w, state, g, t):
        return self.module.rates(w, state, g, t, self.module.HYPER)

    def drift(self, w, state, *moments_and_t):
        """``drift(w, state, *moments, t)``: the moments in the order of :attr:`moment_names`
        (``Eg, Vg``), then the counter."""
        return self.module.drift(w, state, *moments_and_t, self.module.HYPER)

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
    """Whether every leaf of ``tree`` is finite, as a JAX boolean (works under ``jit``)."""
    finite = jnp.asarray(True)
    for x in jax.tree_util.tree_leaves(tree):
        finite = finite & jnp.all(jnp.isfinite(x))
    return finite
