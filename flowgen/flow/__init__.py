"""Stage 3: the plain intermediate description of a flow (:class:`FlowSpec`)."""

from flowgen.flow.build import build_flow
from flowgen.flow.spec import FlowSpec, StateFlow

__all__ = ["FlowSpec", "StateFlow", "build_flow"]
