"""The intermediate description of a derived flow: frozen dataclasses holding
sympy expressions. Code generation and reports read only this."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from flowgen.flow.discrete import DiscreteSpec
from flowgen.symbolic.model import rmean, rsum
from flowgen.symbolic.moments import MOMENTS, runtime_table
from flowgen.symbolic.stability import Bifurcation
from flowgen.symbolic.stationary import StationarySpec


def expr_str(e: sp.Expr | None) -> str | None:
    """A sympy-parseable string in the file's own names (``sum(...)`` for reductions)."""
    if e is None:
        return None
    s = sp.sstr(e, order="none")
    return s


#: how internal quantities print in every output: the plain letter, or an accented one when
#: the file uses that letter as a name (a file's names are ASCII identifiers, so Greek and
#: accented letters are always free: the multiplier μ, the curvature λ, α = λ·p)
INTERNAL_NAMES = {"p": ("p", "p̂"), "c": ("c", "ĉ")}


@dataclass(frozen=True)
class StateFlow:
    name: str
    kind: str  # counter | fast | slow | delay ("" when the flow was not derived)
    scalar: bool
    init: sp.Expr | None  # in hyperparameters and w (None when the flow was not derived)
    rate: sp.Expr | None  # ds/dt before averaging (in g, t, states, hypers); None for a delay
    drift: sp.Expr | None  # E[ds/dt] in Eg, Vg, states (None: no central flow, or a delay)
    kappa: sp.Expr | None  # δs = κ·δg(w_t) on the flip mode (oscillating states)
    line: int = 0
    argument: sp.Expr | None = None  # a delay state: the value it keeps for the next step

    @property
    def is_flow_state(self) -> bool:
        """An ODE state of the stable and central flows (every state but a delay)."""
        return self.kind != "delay"


@dataclass(frozen=True)
class Statement:
    target: str
    role: str  # state | local | w
    expr: sp.Expr  # in names as they are bound when the statement runs
    line: int = 0


@dataclass(frozen=True)
class StabilitySpec:
    bifurcation: Bifurcation  # a str enum: flip | fold | neimark-sacker | none
    char_poly: sp.Expr | None  # monic in μ; in α = λ·p when c is a number, else in λ
    critical_curvature: sp.Expr | None
    effective_step: sp.Expr | None
    threshold: sp.Expr | None
    threshold_value: float | None
    note: str = ""
    step_note: str = ""  # why there is no effective step p (or no constant c)


@dataclass(frozen=True)
class FlowSpec:
    """Everything derived from one `.opt` file at given hyperparameters."""

    name: str
    description: str
    path: str
    sha256: str
    source: str
    hyper: dict[str, float]
    hyper_symbols: dict[str, sp.Symbol]
    states: tuple[StateFlow, ...]
    statements: tuple[Statement, ...]
    w_rate: sp.Expr | None
    w_drift: sp.Expr | None
    stability: StabilitySpec | None
    central_reason: str | None = None  # why there is no central flow, if there is none
    extras: dict = field(default_factory=dict)
    discrete: DiscreteSpec | None = None  # the discrete step this flow was derived from
    flow_reason: str | None = None  # why there is no flow at all (no rates), if there is none
    # the moment table as plain data: (name, ((coef, einsum spec, operands), ...)), in the
    # order of the generated drift's arguments (flowgen.symbolic.moments)
    moments: tuple = field(default_factory=runtime_table)

    @property
    def flow_states(self) -> tuple[StateFlow, ...]:
        """The ODE states of the flows: every state but the delay states."""
        return tuple(s for s in self.states if s.is_flow_state)

    @property
    def moment_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.moments)

    @property
    def names(self) -> frozenset[str]:
        """Every name the file declares or assigns."""
        return frozenset(
            {*self.hyper, *(s.name for s in self.states), *(st.target for st in self.statements)}
        )

    def shown(self, key: str) -> str:
        """How the internal quantity ``key`` (``"p"``, ``"c"``) prints for this file."""
        plain, alt = INTERNAL_NAMES[key]
        return alt if plain in self.names else plain

    stationary: StationarySpec | None = None  # the stationary preconditioner (symbolic.stationary)

    @property
    def has_central(self) -> bool:
        return self.central_reason is None

    @property
    def has_flow(self) -> bool:
        """Rates exist (the stable flow); False for a spec of the discrete step alone."""
        return self.flow_reason is None

    def state(self, name: str) -> StateFlow:
        for s in self.states:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def threshold(self) -> float | None:
        return None if self.stability is None else self.stability.threshold_value

    def to_json(self) -> dict:
        st = self.stability
        stab = None
        if st is not None:
            stab = {
                "bifurcation": Bifurcation(st.bifurcation).value,
                "critical_curvature": expr_str(st.critical_curvature),
                "effective_step": expr_str(st.effective_step),
                "threshold": expr_str(st.threshold),
                "threshold_value": st.threshold_value,
                "characteristic_polynomial": expr_str(st.char_poly),
                "note": st.note or None,
                "effective_step_note": st.step_note or None,
            }
        drift = None
        if self.has_central:
            drift = {"w": expr_str(self.w_drift)}
            drift.update({s.name: expr_str(s.drift) for s in self.flow_states})
        return {
            "optimizer": self.name,
            "description": self.description,
            "source": self.path,
            "sha256": self.sha256,
            "hyper": dict(self.hyper),
            "states": {s.name: s.kind for s in self.states},
            "flow_states": [s.name for s in self.flow_states],
            "delays": {s.name: expr_str(s.argument) for s in self.states if not s.is_flow_state},
            "scalar_states": [s.name for s in self.states if s.scalar],
            "stability": stab,
            "rates": {
                "w": expr_str(self.w_rate),
                **{s.name: expr_str(s.rate) for s in self.flow_states},
            },
            "drift": drift,
            "kappa": {s.name: expr_str(s.kappa) for s in self.states if s.kappa is not None},
            "central_flow": None if self.has_central else self.central_reason,
            "stationary": self.stationary.to_json() if self.stationary else None,
            "notation": {
                **{m.name: m.meaning for m in MOMENTS},
                "sum": "sum over coordinates",
                "μ": "multiplier of the linearised map (variable of the characteristic polynomial)",
                "λ": "curvature of the eigendirection (g = λ w)",
                "α": "dimensionless curvature α = λ·p",
            },
        }


PARSE_LOCALS = {"sum": rsum, "mean": rmean}
