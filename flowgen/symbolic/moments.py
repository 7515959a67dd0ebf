"""The moment table: what a derived drift reads, and how a step's quantities average.

At the edge of stability the iterate oscillates around its time average on the
critical directions, ``w = w̄ + δ`` with ``E[δ] = 0`` and ``E[δδᵀ] = Σ``
(``docs/mathematics.md`` §2). Everything a step reads is a mean plus an
oscillation, and a smooth function of them averages to second order:

    E f ≈ f(mean) + ½ Vg · d²/dε² f(mean + ε·amplitude)|₀ ,

with ``ε`` one unit of the gradient's oscillation. Two tables define it, and
nothing else in flowgen spells them out:

:data:`MOMENTS` — the moments of the gradient a drift reads, one row each: its
name (the symbol in expressions, JSON and the generated ``drift`` signature),
its meaning, how reports print it, and how the central flow computes it from
``(grad = ∇L, G_ij = ∇⟨H, u_i u_jᵀ⟩, HU, X)`` with ``Σ = U X Uᵀ``:

    Eg = E[g]   = ∇L + ½ Σ_ij X_ij G_ij          (per coordinate)
    Vg = Var[g] = diag(HU X (HU)ᵀ) = diag(HΣH)    (per coordinate)

:data:`OSCILLATIONS` — how each kind of quantity a step reads moves with the
gradient's oscillation on the flip (period-2) mode, per unit ``δg``:

    gradient g      mean Eg, oscillation ε
    fast state f    mean f̄ (an ODE state of the flow), oscillation κ_step·ε
    iterate w       mean w̄, oscillation ε/λ*
    delay state d   its argument h one step earlier: mean E[h], oscillation −δh

The delay row is why a previous-step value needs no rate: its value is its
argument's, one step back; on the flip mode one step back flips the sign of
every oscillation (and a counter reads ``t − 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

# ------------------------------------------------------------------ moments


@dataclass(frozen=True)
class Moment:
    """One moment of the gradient that a derived drift may read."""

    name: str  # the symbol's name: expressions, JSON, the generated drift's argument
    symbol: sp.Symbol
    meaning: str  # plain text (JSON "notation")
    short: str  # plain text, short (generated docstrings): "E[g]"
    unicode: str  # terminal: "Eg = E[g] = ∇L + ½∇⟨H,Σ⟩"
    latex: str  # LaTeX symbol
    latex_meaning: str  # LaTeX definition
    # the central flow's value: Σ_terms coef · einsum(spec, *operands), operands among
    # grad (n,), G (k, k, n), HU (n, k), X (k, k); a term with X vanishes when Σ = 0
    runtime: tuple[tuple[float, str, tuple[str, ...]], ...]


EG = Moment(
    name="Eg",
    symbol=sp.Symbol("Eg", real=True),
    meaning="E[g] = grad L + 1/2 grad<H, Sigma> (per coordinate)",
    short="E[g]",
    unicode="Eg = E[g] = ∇L + ½∇⟨H,Σ⟩",
    latex=r"\mathbb{E}[g]",
    latex_meaning=r"\mathbb{E}[g] = \nabla L + \tfrac12 \nabla\langle H, \Sigma\rangle",
    runtime=((1.0, "n->n", ("grad",)), (0.5, "ij,ijn->n", ("X", "G"))),
)
VG = Moment(
    name="Vg",
    symbol=sp.Symbol("Vg", nonnegative=True),
    meaning="Var[g] = diag(H Sigma H) (per coordinate)",
    short="diag(H Sigma H)",
    unicode="Vg = Var[g] = diag(HΣH)",
    latex=r"\operatorname{Var}[g]",
    latex_meaning=r"\operatorname{Var}[g] = \operatorname{diag}(H \Sigma H)",
    runtime=((1.0, "ni,ij,nj->n", ("HU", "X", "HU")),),
)

#: every moment a drift reads, in the order of the generated ``drift`` arguments
MOMENTS: tuple[Moment, ...] = (EG, VG)
MOMENT_NAMES: tuple[str, ...] = tuple(m.name for m in MOMENTS)
MEAN, VARIANCE = EG.symbol, VG.symbol


def moment(name: str) -> Moment:
    for m in MOMENTS:
        if m.name == name:
            return m
    raise KeyError(name)


def runtime_table() -> tuple[tuple[str, tuple[tuple[float, str, tuple[str, ...]], ...]], ...]:
    """The moments as plain data for the generated module and the runtime."""
    return tuple((m.name, m.runtime) for m in MOMENTS)


# ------------------------------------------------------------- oscillations


@dataclass(frozen=True)
class OscillationRule:
    """How one kind of quantity a step reads averages (a row of :data:`OSCILLATIONS`)."""

    kind: str
    mean: str
    oscillation: str


OSCILLATIONS: tuple[OscillationRule, ...] = (
    OscillationRule("gradient", "Eg", "ε (one unit of the gradient's oscillation)"),
    OscillationRule("fast", "the state's own flow value", "κ_step·ε (κ from the flip eigenvector)"),
    OscillationRule("iterate", "w̄", "ε/λ*"),
    OscillationRule(
        "delay", "the mean of its argument", "minus its argument's oscillation (one step back)"
    ),
)

EPS = sp.Dummy("epsilon", real=True)  # one unit of the gradient's oscillation


@dataclass(frozen=True)
class Oscillation:
    """The oscillation of every quantity a rate reads, per unit ``ε`` of ``δg``.

    Rates are written in *current* values (a state's symbol is its value after
    this step, ``w`` the iterate the gradient was taken at). A delay state's
    symbol ``d`` is its value read by the step, i.e. its argument ``h`` one step
    earlier; ``h`` is *raw*: a plain state symbol there is the old value of
    that step, ``s'`` the new one.
    """

    gradient: sp.Symbol  # g
    amplitude: dict  # current-value symbol -> amplitude (fast states: κ_step, w: 1/λ*)
    delays: dict = field(default_factory=dict)  # delay symbol d -> its raw argument h
    new_values: dict = field(default_factory=dict)  # s' -> s
    iterate: sp.Symbol | None = None  # w: the iterate the step's gradient is taken at
    counter: sp.Symbol | None = None  # t

    def at(self, expr: sp.Expr, back: int = 0) -> sp.Expr:
        """``expr`` with every oscillating quantity moved by its oscillation ``back``
        steps ago (phase ``(−1)^back``); delays read their argument one step further back."""
        sign = -1 if back % 2 else 1
        reps = {}
        for s in expr.free_symbols:
            if s in self.delays:
                reps[s] = self.at(self.delays[s], back + 1)
            elif s in self.new_values:  # only in raw delay arguments: the new value of s
                cur = self.new_values[s]
                if cur in self.delays:
                    reps[s] = self.at(self.delays[cur], back)  # h of this very step
                else:
                    reps[s] = cur + sign * self.amplitude.get(cur, 0) * EPS
            elif s == self.gradient:
                reps[s] = s + sign * EPS
            elif s in self.amplitude:
                amp = self.amplitude[s]
                # raw arguments read a state's old value: one more step back; w is always
                # the iterate the step's gradient was taken at
                old = back > 0 and s != self.iterate
                reps[s] = s + (-sign if old else sign) * amp * EPS
            elif back and s == self.counter:
                reps[s] = s - back
        return expr.xreplace(reps)

    def at_rest(self, expr: sp.Expr) -> sp.Expr:
        """``expr`` without oscillation (``Σ = 0``): delays read their argument's value."""
        return self.at(expr).xreplace({EPS: 0})


def average(
    expr: sp.Expr,
    osc: Oscillation,
    reductions: tuple[type, ...],
    *,
    on_cross_coordinate=None,
) -> sp.Expr:
    """``E[expr]`` to second order in the moments of :data:`MOMENTS`.

    ``E f = f|₀ + ½ Vg · ∂²f/∂ε²|₀`` with ``g → Eg``. Reductions average
    coordinate by coordinate (``E sum(h) = sum(E h)``); ``expr`` must be affine
    in a reduction of an oscillating quantity and must not multiply it by one
    (its average would need cross-coordinate covariances):
    ``on_cross_coordinate(reduction)`` is called (and should raise) otherwise.
    """
    full = osc.at(expr)
    reds = sorted(full.atoms(*reductions), key=sp.default_sort_key)
    holders = {r: sp.Dummy(f"R{i}", real=True) for i, r in enumerate(reds)}
    body = full.xreplace(holders)
    for r in reds:
        if not r.args[0].has(EPS):
            continue
        R = holders[r]
        if sp.diff(body, R, 2) != 0 or sp.cancel(sp.diff(body, R, EPS)) != 0:
            if on_cross_coordinate is not None:
                on_cross_coordinate(r.xreplace({EPS: 0}))
            raise ValueError(f"nonlinear in the oscillating reduction {r}")

    def second_order(e: sp.Expr) -> sp.Expr:
        first = e.subs(EPS, 0)
        corr = sp.Rational(1, 2) * VARIANCE * sp.diff(e, EPS, 2).subs(EPS, 0)
        return (first + corr).xreplace({osc.gradient: MEAN})

    means = {
        holders[r]: r.func(sp.expand(second_order(r.args[0]))) if r.args[0].has(EPS) else r
        for r in reds
    }
    return second_order(body).xreplace(means)
