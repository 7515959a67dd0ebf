"""Stage 3: the plain intermediate descriptions: the discrete step (:class:`DiscreteSpec`,
every well-formed file) and the derived flow (:class:`FlowSpec`, the derivation)."""

from flowgen.flow.build import build_flow
from flowgen.flow.discrete import DiscreteSpec, build_discrete
from flowgen.flow.spec import FlowSpec, StateFlow

__all__ = ["DiscreteSpec", "FlowSpec", "StateFlow", "build_discrete", "build_flow"]
