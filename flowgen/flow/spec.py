"""The intermediate description of a derived flow: frozen dataclasses holding
sympy expressions. Code generation and reports read only this."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from flowgen.symbolic.model import rmean, rsum
from flowgen.symbolic.stationary import StationarySpec


def expr_str(e: sp.Expr | None) -> str | None:
    """A sympy-parseable string in the file's own names (``sum(...)`` for reductions)."""
    if e is None:
        return None
    s = sp.sstr(e, order="none")
    return s


@dataclass(frozen=True)
class StateFlow:
    name: str
    kind: str  # counter | fast | slow
    scalar: bool
    init: sp.Expr  # in hyperparameters and w
    rate: sp.Expr  # ds/dt before averaging (in g, t, states, hypers)
    drift: sp.Expr | None  # E[ds/dt] in Eg, Vg, states (None: no central flow)
    kappa: sp.Expr | None  # δs = κ·δg(w_t) on the flip mode (fast states)
    line: int = 0


@dataclass(frozen=True)
class Statement:
    target: str
    role: str  # state | local | w
    expr: sp.Expr  # in names as they are bound when the statement runs
    line: int = 0


@dataclass(frozen=True)
class StabilitySpec:
    bifurcation: str  # flip | fold | neimark-sacker | none
    char_poly: sp.Expr | None
    critical_curvature: sp.Expr | None
    effective_step: sp.Expr | None
    threshold: sp.Expr | None
    threshold_value: float | None
    note: str = ""


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
    w_rate: sp.Expr
    w_drift: sp.Expr | None
    stability: StabilitySpec | None
    central_reason: str | None = None  # why there is no central flow, if there is none
    extras: dict = field(default_factory=dict)
    stationary: StationarySpec | None = None  # the stationary preconditioner (symbolic.stationary)

    @property
    def has_central(self) -> bool:
        return self.central_reason is None

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
                "bifurcation": st.bifurcation,
                "critical_curvature": expr_str(st.critical_curvature),
                "effective_step": expr_str(st.effective_step),
                "threshold": expr_str(st.threshold),
                "threshold_value": st.threshold_value,
                "characteristic_polynomial": expr_str(st.char_poly),
                "note": st.note or None,
            }
        drift = None
        if self.has_central:
            drift = {"w": expr_str(self.w_drift)}
            drift.update({s.name: expr_str(s.drift) for s in self.states})
        return {
            "optimizer": self.name,
            "description": self.description,
            "source": self.path,
            "sha256": self.sha256,
            "hyper": dict(self.hyper),
            "states": {s.name: s.kind for s in self.states},
            "scalar_states": [s.name for s in self.states if s.scalar],
            "stability": stab,
            "rates": {
                "w": expr_str(self.w_rate),
                **{s.name: expr_str(s.rate) for s in self.states},
            },
            "drift": drift,
            "kappa": {s.name: expr_str(s.kappa) for s in self.states if s.kappa is not None},
            "central_flow": None if self.has_central else self.central_reason,
            "stationary": self.stationary.to_json() if self.stationary else None,
            "notation": {
                "Eg": "E[g] = grad L + 1/2 grad<H, Sigma> (per coordinate)",
                "Vg": "Var[g] = diag(H Sigma H) (per coordinate)",
                "sum": "sum over coordinates",
            },
        }


PARSE_LOCALS = {"sum": rsum, "mean": rmean}
