"""Stationary preconditioners, symbolically (``docs/interpretation.md``).

Freeze the time-averaged iterate ``w̄`` and the counter ``t`` and let the
optimizer's states relax under their averaged rates (the drift). When they
settle, the preconditioner settles at ``P*(w̄)``, the *stationary
preconditioner*. This module decides, from the derivation alone, whether and
how that happens and which semidefinite program ``P*`` solves:

1. **the slow state.** ``p`` (the effective step, ``P⁻¹ = diag(p)``) must depend
   on exactly one slow state ``ν`` (per coordinate, or a scalar).
2. **the fixed point.** Every non-counter state's drift must be affine in the
   state and decay (``∂ṡ/∂s < 0``, constant). Fast states are solved first
   (momentum: ``m* = E[g]``), then ``ν* = α·E[g]² + γ·Var[g] + β`` with
   constants ``α, β ≥ 0`` and ``γ > 0`` (RMSProp and Adam: ``α = γ = 1``,
   ``β = 0``; AdaBelief: ``α = 0``). The relaxation time of each state is
   ``1/|∂ṡ/∂s|`` (``β₂/(1 − β₂)`` for an EMA).
3. **the SDP.** With ``P = √(ν + ε_in)/η`` and ``ν*`` as above, ``P*`` solves
   (talk, "Lemma"; ``c`` the derived threshold, 2 for RMSProp, 38 for Adam with
   ``β₁ = 0.9``)::

       min_{P diagonal}  tr P + Σ_i a_i / P_i   s.t.  H ⪯ c·P,
       a_i = (α ∇L_i² + β + ε_in) / η²,

   its dual matrix being ``γ·c·Σ*/η²``. Three answers:

   * ``exact``: ``1/p²`` is affine in ``ν``, ``1/p² = (ν + ε_in)/η²``, with
     constant coefficients (RMSProp with ε inside the root, no bias correction);
   * ``asymptotic``: that form holds only in a limit — bias corrections
     ``β^t → 0`` (``t → ∞``) and/or a hyperparameter outside the root → 0
     (``ε ≪ √ν``). The SDP is then solved for the limit form ``P_lim(ν)``, and
     the error of the actual preconditioner, per coordinate,
     ``r(ν, t) = P(ν, t)/P_lim(ν) − 1`` (Adam:
     ``(1 − β₁^t)(1/√(1 − β₂^t) + ε/√ν) − 1``), bounds the disagreement;
   * ``none``, with the reason (no slow state, two slow states, a drift without
     a decaying affine fixed point, a ``p`` that is no power of ``ν`` even in the
     limit, ...).

   A scalar ``ν`` (scalar RMSProp) gives the one-dimensional SDP
   ``min P + (α‖∇L‖² + β + ε_in)/(η² P)  s.t.  λ_max(H) ≤ c·P``, whose solution
   is ``P* = max(√(α‖∇L‖² + β + ε_in)/η, λ_max(H)/c)``.

Only sympy runs here; the runtime reads the numbers recorded on
:class:`StationarySpec` (``eta``, ``eps_inside``, ``alpha``, ``beta``, ...)
and evaluates the error ``r`` with the generated ``precond``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from flowgen.symbolic.model import REDUCTION_CLASSES, Eg, T, Vg, rsum, tidy

__all__ = ["StationarySpec", "analyse", "EXACT", "ASYMPTOTIC", "NONE"]

EXACT, ASYMPTOTIC, NONE = "exact", "asymptotic", "none"

_NU = sp.Symbol("nu", positive=True)  # the slow state's value in P(ν)


@dataclass(frozen=True)
class StationarySpec:
    """How the slow states of a derived flow settle, and which SDP ``P*`` solves.

    Attributes:
      kind: ``"exact"``, ``"asymptotic"`` or ``"none"``.
      reason: why not (``none``), or the limits taken (``asymptotic``).
      state: the slow state ``ν`` that ``p`` depends on (None: none).
      shape: ``"diagonal"`` (per-coordinate ``ν``) or ``"scalar"``.
      fixed_points: state → its stationary value (in ``Eg``, ``Vg``, hyperparameters);
        ``Eg = E[g]`` reads ``∇L`` in the talk's form of the SDP.
      relaxation_times: state → ``1/|∂ṡ/∂s|`` (units of time = steps), at the hyperparameters.
      precond: ``P(ν, t) = 1/p`` (sympy, in ``nu``, ``t`` and hyperparameters).
      limit: ``P_lim(ν) = √(ν + ε_in)/η`` (sympy).
      error: ``r(ν, t) = P(ν, t)/P_lim(ν) − 1`` (sympy; 0 when exact).
      limits: the limits taken, in words (``"beta2**t → 0 (t → ∞)"``, ``"eps → 0"``).
      eta, eps_inside, alpha, gamma, beta: the SDP's constants at the hyperparameters.
      threshold: ``c`` (the stability constraint is ``H ⪯ c·P``).
    """

    kind: str
    reason: str = ""
    state: str | None = None
    shape: str | None = None
    fixed_points: dict = field(default_factory=dict)
    relaxation_times: dict = field(default_factory=dict)
    precond: sp.Expr | None = None
    limit: sp.Expr | None = None
    error: sp.Expr | None = None
    limits: tuple[str, ...] = ()
    eta: float | None = None
    eps_inside: float | None = None
    alpha: float | None = None
    gamma: float | None = None
    beta: float | None = None
    threshold: float | None = None

    @property
    def sdp_applies(self) -> bool:
        return self.kind in (EXACT, ASYMPTOTIC)

    @property
    def slowest_time(self) -> float | None:
        """The longest relaxation time of a non-counter state (None: no such state)."""
        vals = [v for v in self.relaxation_times.values() if v is not None]
        return max(vals) if vals else None

    def to_json(self) -> dict:
        def s(e):
            return None if e is None else sp.sstr(e, order="none")

        return {
            "kind": self.kind,
            "reason": self.reason or None,
            "state": self.state,
            "shape": self.shape,
            "fixed_points": {k: s(v) for k, v in self.fixed_points.items()},
            "relaxation_times": dict(self.relaxation_times),
            "precond": s(self.precond),
            "limit": s(self.limit),
            "error": s(self.error),
            "limits": list(self.limits),
            "eta": self.eta,
            "eps_inside": self.eps_inside,
            "alpha": self.alpha,
            "gamma": self.gamma,
            "beta": self.beta,
            "threshold": self.threshold,
        }


def _by_name(expr: sp.Expr) -> dict[str, sp.Symbol]:
    return {s.name: s for s in expr.free_symbols}


def _numeric(expr: sp.Expr, hyper: dict[str, float]) -> sp.Expr:
    """Hyperparameters replaced by their values (exact rationals where possible)."""
    subs = {}
    for s in expr.free_symbols:
        if s.name in hyper:
            subs[s] = sp.nsimplify(hyper[s.name], rational=True)
    return expr.xreplace(subs)


def _const(expr: sp.Expr) -> float | None:
    """``float(expr)`` when it has no free symbols, else None."""
    if expr.free_symbols:
        expr = sp.cancel(expr)
        if expr.free_symbols:
            return None
    try:
        val = complex(sp.N(expr, 30))
    except (TypeError, ValueError):
        return None
    return val.real if abs(val.imag) < 1e-14 * max(1.0, abs(val.real)) else None


def _affine_root(drift: sp.Expr, s: sp.Symbol) -> tuple[sp.Expr, sp.Expr] | None:
    """``(s*, ∂ṡ/∂s)`` when the drift is affine in ``s`` (``ṡ = k·(s − s*)``), else None."""
    k = sp.cancel(sp.diff(drift, s))
    if k.has(s) or k == 0:
        return None
    return sp.cancel(-drift.subs(s, 0) / k), k


def _bias_to_zero(expr: sp.Expr, hyper: dict[str, float]) -> tuple[sp.Expr, list[str]]:
    """``base**t → 0`` for every hyperparameter base with value in (0, 1) (``t → ∞``)."""
    taken = []

    def vanishes(e) -> bool:
        if not (isinstance(e, sp.Pow) and e.exp == T and isinstance(e.base, sp.Symbol)):
            return False
        v = hyper.get(e.base.name)
        return v is not None and 0 < v < 1

    for e in sorted(expr.atoms(sp.Pow), key=sp.default_sort_key):
        if vanishes(e):
            taken.append(f"{e} → 0 (t → ∞)")
    return expr.replace(vanishes, lambda e: sp.Integer(0)), taken


def _sqrt_form(P: sp.Expr, hyper: dict[str, float]) -> tuple[float, float] | None:
    """``(η, ε_in)`` when ``P² = (ν + ε_in)/η²`` with constants η > 0, ε_in ≥ 0; else None."""
    P2 = sp.cancel(sp.expand(_numeric(P, hyper) ** 2))
    slope = sp.cancel(sp.diff(P2, _NU))
    if slope.has(_NU):
        return None
    icpt = sp.cancel(P2.subs(_NU, 0))
    sl, ic = _const(slope), _const(icpt)
    if sl is None or ic is None or sl <= 0 or ic < 0:
        return None
    return float(1 / sl**0.5), float(ic / sl)


def _fixed_point_coeffs(nu_star: sp.Expr, scalar: bool, hyper: dict[str, float]):
    """``(α, γ, β)`` with ``ν* = α·Eg² + γ·Vg + β`` (scalar: inside one ``sum``); else None."""
    e = sp.expand(_numeric(nu_star, hyper))
    if scalar:
        # sum(...) is linear: collect every reduction's argument
        inner = sp.Integer(0)
        rest = sp.Integer(0)
        for term in sp.Add.make_args(e):
            reds = term.atoms(*REDUCTION_CLASSES)
            if not reds:
                rest += term
                continue
            if len(reds) != 1:
                return None
            (r,) = reds
            if not isinstance(r, rsum):
                return None
            coef = sp.cancel(term / r)
            if coef.free_symbols:
                return None
            inner += coef * sp.expand(r.args[0])
        e, const = sp.expand(inner), rest
    else:
        const = None
    try:
        poly = sp.Poly(e, Eg, Vg)
    except sp.PolynomialError:
        return None
    coeffs = dict(poly.terms())
    allowed = {(2, 0), (0, 1), (0, 0)}
    if set(coeffs) - allowed:
        return None
    vals = {m: _const(coeffs.get(m, sp.Integer(0))) for m in allowed}
    if any(v is None for v in vals.values()):
        return None
    alpha, gamma, beta = vals[(2, 0)], vals[(0, 1)], vals[(0, 0)]
    if const is not None:
        cb = _const(const)
        if cb is None:
            return None
        beta += cb
    if alpha < 0 or beta < 0 or gamma <= 0:
        return None
    return alpha, gamma, beta


def analyse(
    states,
    effective_step: sp.Expr | None,
    threshold: float | None,
    hyper: dict[str, float],
    *,
    central_reason: str | None = None,
) -> StationarySpec:
    """The stationary preconditioner of a derived flow (module docstring).

    Args:
      states: the flow's ``StateFlow`` records (name, kind, scalar, drift).
      effective_step: ``p`` (None: the update does not factor as ``−p·(…)``).
      threshold: ``c``.
      hyper: hyperparameter values.
      central_reason: why there is no central flow (None: there is one).
    """
    if central_reason is not None:
        return StationarySpec(NONE, f"there is no central flow ({central_reason})")
    if effective_step is None or threshold is None:
        return StationarySpec(NONE, "the update has no effective step p, so no preconditioner")
    names = _by_name(effective_step)
    slow = [s for s in states if s.kind == "slow" and s.name in names]
    times = {}
    fixed: dict[str, sp.Expr] = {}
    subs_fixed: dict[sp.Symbol, sp.Expr] = {}
    # fast states first (their fixed points enter the slow drifts), then slow ones
    order = [s for s in states if s.kind == "fast"] + [s for s in states if s.kind == "slow"]
    for s in order:
        if s.drift is None:
            return StationarySpec(NONE, f"the state {s.name} has no averaged drift")
        sym = _by_name(s.drift).get(s.name, sp.Symbol(s.name, real=True))
        drift = s.drift.xreplace(subs_fixed)
        root = _affine_root(drift, sym)
        if root is None:
            return StationarySpec(
                NONE,
                f"the drift of {s.name} is not affine in {s.name} ({s.drift}), so flowgen "
                "cannot solve for its fixed point",
                relaxation_times=times,
            )
        value, k = root
        kval = _const(_numeric(k, hyper))
        if kval is None or kval >= 0:
            return StationarySpec(
                NONE,
                f"the drift of {s.name} does not decay towards a fixed point "
                f"(∂ṡ/∂s = {k} is not a negative constant)",
                relaxation_times=times,
            )
        times[s.name] = float(-1.0 / kval)
        fixed[s.name] = sp.factor(value)
        subs_fixed[sym] = value
    base = dict(relaxation_times=times, fixed_points=fixed, threshold=float(threshold))
    if not slow:
        return StationarySpec(
            NONE,
            f"no slow preconditioner state: p = {effective_step} does not depend on a state "
            "that adapts to the gradients",
            **base,
        )
    if len(slow) > 1:
        return StationarySpec(
            NONE,
            f"the preconditioner depends on {len(slow)} slow states "
            f"({', '.join(s.name for s in slow)}); the SDP has one",
            **base,
        )
    nu = slow[0]
    shape = "scalar" if nu.scalar else "diagonal"
    base.update(state=nu.name, shape=shape)
    coeffs = _fixed_point_coeffs(fixed[nu.name], nu.scalar, hyper)
    if coeffs is None:
        return StationarySpec(
            NONE,
            f"the fixed point {nu.name}* = {fixed[nu.name]} is not of the form "
            "α·E[g]² + γ·Var[g] + β with α, β ≥ 0 < γ",
            **base,
        )
    alpha, gamma, beta = coeffs
    base.update(alpha=alpha, gamma=gamma, beta=beta)
    others = set(_by_name(effective_step)) - {nu.name, "t"} - set(hyper)
    if others:
        return StationarySpec(
            NONE,
            f"p = {effective_step} depends on {', '.join(sorted(others))} besides {nu.name}",
            **base,
        )
    P = sp.cancel(1 / effective_step.xreplace({names[nu.name]: _NU}))
    shown = {_NU: names[nu.name]}
    base.update(precond=tidy(P).xreplace(shown))
    form = _sqrt_form(P, hyper) if not P.has(T) else None
    if form is not None:
        eta, eps_in = form
        return StationarySpec(
            EXACT,
            "P = √(ν + ε)/η with constant η, ε: the SDP holds exactly",
            limit=tidy(P).xreplace(shown),
            error=sp.Integer(0),
            eta=eta,
            eps_inside=eps_in,
            **base,
        )
    # the limits: bias corrections → 1, then hyperparameters outside the root → 0
    P_inf, taken = _bias_to_zero(P, hyper)
    form = _sqrt_form(P_inf, hyper) if not P_inf.has(T) else None
    lim_expr = P_inf
    if form is None and not P_inf.has(T):
        for h in sorted(_by_name(P_inf)):
            if h not in hyper or h == nu.name:
                continue
            cand = sp.cancel(P_inf.xreplace({_by_name(P_inf)[h]: 0}))
            if cand.has(sp.zoo, sp.oo, sp.nan) or cand == 0:
                continue
            form = _sqrt_form(cand, hyper)
            if form is not None:
                taken.append(f"{h} → 0 ({h} ≪ √{nu.name})")
                lim_expr = cand
                break
    if form is None:
        return StationarySpec(
            NONE,
            f"P = 1/p = {P.xreplace({_NU: names[nu.name]})} is not √({nu.name} + ε)/η, "
            "not even as t → ∞ or with one hyperparameter → 0",
            **base,
        )
    eta, eps_in = form
    err = tidy(P) / tidy(lim_expr) - 1  # lr cancels; kept unexpanded for reading
    return StationarySpec(
        ASYMPTOTIC,
        "the SDP holds in the limit " + ", ".join(taken),
        limit=tidy(lim_expr).xreplace(shown),
        error=err.xreplace(shown),
        limits=tuple(taken),
        eta=eta,
        eps_inside=eps_in,
        **base,
    )
