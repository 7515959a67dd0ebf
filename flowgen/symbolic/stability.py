"""Stability threshold of an update rule (``docs/mathematics.md`` §3).

Restrict to one eigendirection of curvature ``λ`` (``g = λ·w``) with slow
states and counters frozen. The linearised map of ``x = (w, oscillating
states)`` — fast states and delay states that respond linearly, e.g. the
previous gradient — is ``x_t = J(λ) x_{t-1}``; its characteristic polynomial
``χ(μ) = det(μI − J)`` decides stability (Jury / Schur–Cohn: all roots inside
the unit circle). A delay state adds one to the degree. The critical
curvature ``λ*`` is the smallest ``λ > 0`` at which a root reaches the unit
circle (:class:`Bifurcation`):

* at ``μ = −1``: *flip* (period-2 oscillation; the edge-of-stability case);
* at ``μ = +1``: *fold*;
* a complex pair: *Neimark–Sacker* (quasi-periodic).

Which boundary is crossed first is decided numerically at the given
hyperparameters (a scan of the spectral radius, refined by bisection); the
closed form is then the root of ``χ(−1)``, ``χ(1)`` or the Schur–Cohn
determinant that matches it.

**Effective step.** ``p`` is the steady-state (zero-frequency) gain from the
gradient to the step ``−Δw`` of the linearised map with slow states frozen:
feed a constant ``g`` (not ``λw``) and read ``−Δw`` once the oscillating
states have settled. With ``x' = J₀x + b·g`` (``J₀ = J(0)``),

    −p = lim_{z→1} (z − 1)·e_wᵀ (zI − J₀′)⁻¹ b ,

where ``J₀′`` drops the map's response to the *level* of ``w`` (a uniform
shift of ``w`` and of its delayed copies, e.g. decoupled weight decay), so that
``w`` integrates its steps. For heavy ball this is ``lr/(1−β)``; for RMSProp
with momentum on the preconditioned step ``lr/((1−μ)(√v+ε))``; where the
update factors as ``−p·(linear form)`` it is that ``p``. The threshold on the
effective sharpness ``λ_max(P⁻¹H)``, ``P⁻¹ = diag(p)``, is ``c = λ*·p``, a
number when ``χ`` written in the dimensionless curvature ``α = λ·p`` is free
of the frozen states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import sympy as sp

from flowgen.symbolic.classify import DELAY, oscillating, strip_reductions
from flowgen.symbolic.model import (
    REDUCTION_CLASSES,
    G,
    StepModel,
    T,
    W,
    new_symbol,
    simp,
    tidy,
    tidy_signs,
)


class Bifurcation(StrEnum):
    """How the linearised map first loses stability as the curvature grows.

    The values are what JSON outputs and the generated module carry."""

    FLIP = "flip"
    FOLD = "fold"
    NEIMARK_SACKER = "neimark-sacker"
    NONE = "none"

    @property
    def words(self) -> str:
        return {
            "flip": "a multiplier leaves the unit circle at −1: period-2 oscillation",
            "fold": "a multiplier leaves the unit circle at +1: monotone divergence",
            "neimark-sacker": "a complex pair leaves the unit circle: quasi-periodic oscillation",
            "none": "no multiplier reaches the unit circle",
        }[self.value]

    @property
    def has_central_flow(self) -> bool:
        """Central flows of the period-2 kind need a flip."""
        return self is Bifurcation.FLIP


FLIP, FOLD, NS, NONE = (
    Bifurcation.FLIP,
    Bifurcation.FOLD,
    Bifurcation.NEIMARK_SACKER,
    Bifurcation.NONE,
)

# Dummy symbols: never equal to a user's name (a hyperparameter may be called `lambda`)
LAM = sp.Dummy("lambda", positive=True)  # curvature of the eigendirection
MU = sp.Dummy("mu")  # multiplier of the linearised map
A = sp.Dummy("a", positive=True)  # dimensionless curvature λ·p
Z = sp.Dummy("z")  # frequency variable of the transfer function

#: how the internal symbols print: Greek letters, which no `.opt` name can be (names are ASCII)
SHOWN = {LAM: sp.Symbol("λ"), MU: sp.Symbol("μ"), A: sp.Symbol("α")}


@dataclass(frozen=True)
class LinearMap:
    """``x_t = J x_{t-1}`` for ``x = (w, oscillating states...)`` with ``g = λ w``.

    ``J`` and ``p`` are written in *frozen atoms*: every maximal subexpression
    that depends on frozen states or the counter (``1 − β₁ᵗ``, ``ε + √v``) is a
    Dummy symbol, which keeps the algebra small; :meth:`restore` puts them back.
    """

    variables: tuple[str, ...]  # ("w", *fast and oscillating delay states)
    J: sp.Matrix  # in LAM, hypers, frozen atoms
    p: sp.Expr | None  # effective step size (None: see p_reason)
    p_reason: str = ""  # why there is no p, in one sentence
    atoms: dict = field(default_factory=dict)  # Dummy -> the frozen subexpression it stands for
    J0: sp.Matrix | None = None  # J at λ = 0 (the map's direct response)
    b: sp.Matrix | None = None  # response to the gradient: J = J0 + λ·b·e_wᵀ

    def restore(self, expr):
        """``expr`` in the frozen states and counters again."""
        return expr.xreplace(self.atoms) if self.atoms else expr


@dataclass(frozen=True)
class Stability:
    bifurcation: Bifurcation
    char_poly: sp.Expr  # monic χ(μ) in α = λ·p when p exists and c is a number, else in λ
    critical_curvature: sp.Expr | None  # λ*
    effective_step: sp.Expr | None  # p
    threshold: sp.Expr | None  # c = λ*·p
    threshold_value: float | None
    kappa: dict[str, sp.Expr]  # δs = κ·δg(w_t) on the critical mode (oscillating states)
    note: str = ""
    step_note: str = ""  # why there is no p, or no constant c


def _frozen_substitution(model: StepModel, osc: tuple[str, ...]) -> dict:
    """New values of oscillating states expanded; slow states and counters frozen."""
    expand: dict = {}
    for st in model.statements:
        if st.role != "state":
            continue
        if st.target in osc:
            expand[new_symbol(st.target)] = st.value.xreplace(expand)
        else:
            expand[new_symbol(st.target)] = sp.Symbol(st.target, real=True)
    return expand


def _freeze_reductions(model, expr: sp.Expr, fast_syms) -> sp.Expr:
    """Reductions in a linearised map: allowed when they have no linear response
    at ``g = 0``; then they are frozen like slow states."""
    reps = {}
    for r in expr.atoms(*REDUCTION_CLASSES):
        arg = strip_reductions(r.args[0])
        at = {G: 0, W: 0, **{f: 0 for f in fast_syms}}
        for var in (G, W, *fast_syms):
            if simp(sp.diff(arg, var).subs(at)) != 0:
                raise model.error(
                    f"the reduction {r} responds linearly to the oscillation; the 1-D stability "
                    "analysis cannot freeze it",
                    model.assign_node.get("w"),
                )
        reps[r] = sp.Symbol(str(r), real=True)
    return expr.xreplace(reps)


def _atomize(e: sp.Expr, dynamic: set, hyper: set, cache: dict) -> sp.Expr:
    """Replace each maximal frozen subexpression of ``e`` (no dynamic symbol, at least one
    frozen state or counter) by a Dummy atom; products and integer powers are kept
    transparent and signs normalised, so that the same quantity is the same atom."""
    if e.is_Atom:
        return e
    fs = e.free_symbols
    if fs & dynamic or fs <= hyper:
        return e.func(*[_atomize(a, dynamic, hyper, cache) for a in e.args]) if fs & dynamic else e
    if isinstance(e, sp.Pow) and e.exp.is_Integer:
        return _atomize(e.base, dynamic, hyper, cache) ** e.exp
    if isinstance(e, sp.Mul):
        return sp.Mul(*[_atomize(a, dynamic, hyper, cache) for a in e.args])
    if isinstance(e, sp.Add) and e.could_extract_minus_sign():
        return -_atomize(-e, dynamic, hyper, cache)
    if e not in cache:
        cache[e] = sp.Dummy(f"F{len(cache)}", real=True)
    return cache[e]


def _zero_frequency_gain(
    model: StepModel, variables: tuple[str, ...], J0: sp.Matrix, b: sp.Matrix
) -> tuple[sp.Expr | None, str]:
    """``lim_{z→1} (z−1)·e_wᵀ(zI − J₀′)⁻¹ b``: the steady-state gain from a constant
    gradient to ``Δw`` (see the module docstring), or ``(None, why)``."""
    n = J0.shape[0]
    # the level of w: w itself and its delayed copies move together under a shift
    level = sp.zeros(n, 1)
    level[0] = 1
    delays = [i for i, v in enumerate(variables) if i and v in model.delays]
    if delays:
        Jdd = J0.extract(delays, delays)
        try:
            sol = (sp.eye(len(delays)) - Jdd).LUsolve(J0.extract(delays, [0]))
            for k, i in enumerate(delays):
                level[i] = simp(sol[k])
        except (ValueError, ZeroDivisionError):
            pass
    if all(level[i] == 0 for i in range(1, n)):
        # nothing follows the level of w: w' = w + a·z + a_g·g, z' = A z + b_z g, so the
        # steady-state gain is a_g + a (I − A)⁻¹ b_z (no transfer function needed)
        if n == 1:
            return simp(b[0]), ""
        A, bz = J0[1:, 1:], b[1:, 0]
        M = sp.eye(n - 1) - A
        if simp(M.det(method="berkowitz")) == 0:
            return None, (
                "under a constant gradient the step grows without bound (the oscillating "
                "states have no fixed point), so there is no effective step p"
            )
        zstar = M.LUsolve(bz)
        return simp(b[0] + (J0[0, 1:] * zstar)[0, 0]), ""
    residual = J0 * level - level
    J0p = J0.copy()
    for i in range(n):
        J0p[i, 0] = simp(J0[i, 0] - residual[i])
    M = Z * sp.eye(n) - J0p
    den = M.det(method="berkowitz")
    Mb = M.copy()
    Mb[:, 0] = b
    num = Mb.det(method="berkowitz")
    H = sp.cancel(sp.together((Z - 1) * num / den))
    hn, hd = sp.fraction(H)
    if simp(hd.subs(Z, 1)) == 0:
        if simp(hn.subs(Z, 1)) == 0:
            return None, "the steady-state gain from the gradient to the step is undetermined"
        return None, (
            "under a constant gradient the step grows without bound (the oscillating states "
            "have no fixed point), so there is no effective step p"
        )
    return simp(H.subs(Z, 1)), ""


def linear_map(model: StepModel, classes: dict[str, str]) -> LinearMap:
    osc = oscillating(model, classes)
    for s in osc:
        if model.scalar[s]:
            raise model.error(
                f"scalar state `{s}` responds linearly to g; flowgen's stability analysis "
                "supports per-coordinate fast states only",
                model.assign_node.get(s),
            )
    expand = _frozen_substitution(model, osc)
    zsyms = [sp.Symbol(s, real=True) for s in osc]
    w_new = _freeze_reductions(model, model.w_new.xreplace(expand), zsyms)
    z_new = [_freeze_reductions(model, expand[new_symbol(s)], zsyms) for s in osc]
    cache: dict = {}
    dynamic, hyper = {G, W, *zsyms}, set(model.hyper.values())
    w_new = _atomize(w_new, dynamic, hyper, cache)
    z_new = [_atomize(e, dynamic, hyper, cache) for e in z_new]
    atoms = {a: e for e, a in cache.items()}
    at0 = {G: 0, W: 0, **{z: 0 for z in zsyms}}

    def d(e, v):
        return simp(sp.diff(e, v).subs(at0))

    outs = [w_new, *z_new]
    ins = [W, *zsyms]
    n = len(outs)
    J0 = sp.Matrix(n, n, lambda i, j: d(outs[i], ins[j]))
    b = sp.Matrix([d(out, G) for out in outs])
    J = sp.Matrix(n, n, lambda i, j: simp(J0[i, j] + (b[i] * LAM if j == 0 else 0)))
    for e in J:
        if e.has(sp.zoo, sp.oo, sp.nan):
            raise model.error(
                "the update is not differentiable at g = 0 (a division by a vanishing quantity), "
                "so it has no linear stability analysis",
                model.assign_node.get("w"),
            )

    variables = ("w", *osc)

    def restored_names(e):
        return {str(x) for x in e.xreplace(atoms).free_symbols}

    gain, reason = _zero_frequency_gain(model, variables, J0, b)
    p: sp.Expr | None = None
    if gain is not None:
        if gain == 0:
            reason = (
                "a constant gradient does not move w once the states have settled (zero "
                "steady-state gain), so there is no effective step p"
            )
        else:
            p = simp(-gain)
            slow_delays = sorted(name for name in restored_names(p) if classes.get(name) == DELAY)
            if slow_delays:
                p, reason = (
                    None,
                    (
                        f"the steady-state gain reads the delay state `{slow_delays[0]}`, which is "
                        "not a state of the flow, so there is no effective step p"
                    ),
                )
    return LinearMap(variables, J, p, reason, atoms, J0, b)


# ------------------------------------------------------------------- numerics


def sample_values(model: StepModel) -> dict:
    """Numbers for a numeric look at the map: hyper values, frozen states at 1,
    ``t`` late in training."""
    vals = {sym: sp.Float(model.hyper_values[name]) for name, sym in model.hyper.items()}
    vals[T] = sp.Integer(10_000)
    return vals


FROZEN_SAMPLE = 0.5371  # value given to frozen states in numeric looks (generic, not 0 or 1)


def _numeric(expr, vals, extra=None):
    e = sp.sympify(expr).xreplace({**vals, **(extra or {})})
    e = e.xreplace({s: FROZEN_SAMPLE for s in e.free_symbols if s not in (LAM, MU, A)})
    return e


def _spectral_radius(Jnum, lam: float) -> float:
    with np.errstate(all="ignore"):
        J = Jnum(lam)
    if not np.all(np.isfinite(J)):  # float64 overflow of the map: unstable
        return np.inf
    return float(np.max(np.abs(np.linalg.eigvals(J))))


def _find_crossing(Jnum) -> tuple[float | None, str]:
    grid = np.logspace(-8, 8, 1601)
    rho = np.array([_spectral_radius(Jnum, x) for x in grid])
    tol = 1e-10
    if rho[0] > 1 + tol:  # e.g. gradient ascent: unstable from the smallest curvature on
        return None, "unstable everywhere" if np.all(rho > 1 + tol) else "unstable"
    bad = np.nonzero(rho > 1 + tol)[0]
    if len(bad) == 0:
        return None, "stable"
    i = bad[0]
    lo, hi = (grid[i - 1] if i > 0 else 0.0), grid[i]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _spectral_radius(Jnum, mid) > 1 + tol:
            hi = mid
        else:
            lo = mid
    lam_c = 0.5 * (lo + hi)
    mus = np.linalg.eigvals(Jnum(lam_c))
    mu = mus[np.argmax(np.abs(mus))]
    if abs(mu.imag) > 1e-6:
        return lam_c, NS
    return lam_c, FLIP if mu.real < 0 else FOLD


def _schur_cohn_ns(chi: sp.Poly) -> sp.Expr:
    """Condition for a complex pair on the unit circle: degree 2 → ``c0 = 1``;
    general → resultant of χ and its reciprocal, with the ``μ = ±1`` factors removed."""
    coeffs = chi.all_coeffs()
    d = chi.degree()
    if d == 2:
        return coeffs[-1] / coeffs[0] - 1
    mu2 = sp.Dummy("mu2")
    rec = sp.expand(mu2**d * chi.as_expr().subs(MU, 1 / mu2))
    res = sp.resultant(chi.as_expr(), rec.subs(mu2, MU), MU)
    return sp.factor(res)


def _free_of_frozen(expr: sp.Expr, lm: LinearMap, model: StepModel) -> sp.Expr | None:
    """``expr`` without frozen states, counters and atoms when it does not depend on them
    (checked at two generic points, since cancellation may be incomplete), else None."""
    hyper = set(model.hyper.values())
    internal = {LAM, MU, A, Z}
    if not {s for s in expr.free_symbols if s not in hyper and s not in internal}:
        return expr
    full = lm.restore(expr)
    frozen = sorted(
        (s for s in full.free_symbols if s not in hyper and s not in internal),
        key=sp.default_sort_key,
    )
    vals = sample_values(model)
    x = sp.Float(0.613)
    outs, points = [], []
    for base in (sp.Rational(3, 7), sp.Rational(11, 5)):
        pt = {f: base + sp.Rational(j, 13) for j, f in enumerate(frozen)}
        points.append(pt)
        e = full.xreplace(pt).xreplace({k: v for k, v in vals.items() if k in hyper})
        outs.append(complex(sp.N(e.xreplace({MU: x, A: x, LAM: x}))))
    if abs(outs[0] - outs[1]) > 1e-9 * max(1.0, abs(outs[0])):
        return None
    return simp(full.xreplace(points[0]))


def _monic(chi: sp.Expr) -> sp.Expr:
    """``χ/lc(χ)`` collected in ``μ``: expanded when its coefficients are polynomials,
    else coefficient by coefficient (a common denominator kept, not distributed)."""
    poly = sp.Poly(chi, MU)
    lc = poly.LC()
    coeffs = [sp.cancel(c / lc) for c in poly.coeffs()]
    if all(sp.denom(c) == 1 for c in coeffs):
        return sp.collect(sp.expand(simp(poly.as_expr() / lc)), MU)
    terms = [c * MU**k for (k,), c in zip(poly.monoms(), coeffs, strict=True)]
    return sp.collect(sp.Add(*terms), MU)


def _late_training(expr: sp.Expr, model: StepModel) -> sp.Expr:
    """``expr`` as ``t → ∞``: every ``b**(k·t)`` with ``0 < b < 1`` at the given
    hyperparameters (bias corrections) goes to 0."""
    vals = sample_values(model)

    def vanishes(e):
        if not (isinstance(e, sp.Pow) and e.exp.has(T) and not e.base.has(T)):
            return False
        k = sp.simplify(e.exp / T)
        if k.free_symbols or not (k.is_number and k > 0):
            return False
        b = complex(sp.N(e.base.xreplace(vals)))
        return abs(b.imag) < 1e-15 and 0 < b.real < 1

    return expr.replace(vanishes, lambda e: sp.Integer(0))


def analyse(model: StepModel, classes: dict[str, str]) -> Stability:
    lm = linear_map(model, classes)
    n = lm.J.shape[0]

    def char_poly(J):
        return simp((MU * sp.eye(n) - J).det(method="berkowitz"))

    vals = sample_values(model)
    Jsample = _numeric(lm.restore(lm.J), vals)
    if any(e.has(sp.zoo, sp.nan, sp.oo) for e in Jsample):
        raise model.error(
            "the linearised update is singular at the sampled state values; "
            "flowgen cannot locate its stability threshold",
            model.assign_node.get("w"),
        )
    Jn = sp.lambdify(LAM, Jsample, "numpy")

    def Jnum(x):
        return np.array(Jn(x), dtype=complex).reshape(n, n)

    p = lm.p  # in atoms
    p_out = None if p is None else tidy_signs(sp.factor(lm.restore(p)))
    step_note = lm.p_reason
    if p is not None:
        p_num = complex(sp.N(_numeric(p_out, vals)))
        if not (abs(p_num.imag) < 1e-12 * max(1.0, abs(p_num)) and p_num.real > 0):
            p = p_out = None
            step_note = (
                "the steady-state step moves along +g (p ≤ 0 at the given hyperparameters), so "
                "there is no effective step p"
            )

    lam_c, kind = _find_crossing(Jnum)
    if lam_c is None:
        note = {
            "stable": "the linearised map is stable for every curvature λ > 0",
            "unstable everywhere": "the linearised map is unstable at every curvature λ > 0",
        }.get(kind, "the linearised map is unstable already at vanishing curvature")
        chi = lm.restore(char_poly(lm.J))
        return Stability(NONE, chi, None, p_out, None, None, {}, note, step_note)

    # in the dimensionless curvature α = λ·p the polynomial is free of the frozen states
    var, chi_v, target = (LAM, None, lam_c)
    if p is not None:
        # λ = α/p entry by entry (cheap), then one determinant
        chi_a = sp.collect(sp.expand(char_poly(lm.J.subs(LAM, A / p).applyfunc(simp))), MU)
        free = _free_of_frozen(chi_a, lm, model)
        if free is None:  # bias corrections: the late-training threshold
            late = _late_training(lm.restore(chi_a), model)
            free = _free_of_frozen(late, LinearMap((), sp.zeros(0, 0), None), model)
            if free is not None:
                step_note = (
                    "with its bias corrections the threshold depends on the step t; c is its "
                    "late-training value (t → ∞)"
                )
        chi_a = free
        if chi_a is None:
            step_note = (
                "λ*·p depends on the frozen states, so there is no constant threshold c on "
                "λ_max(P⁻¹H)"
            )
        else:
            p_num = complex(sp.N(_numeric(p_out, vals))).real
            var, chi_v, target = A, chi_a, lam_c * p_num
    if var is LAM:
        chi_v = lm.restore(char_poly(lm.J))
    chi_v = _monic(chi_v)
    chi_poly = sp.Poly(chi_v, MU)
    if kind == FLIP:
        cond = chi_poly.as_expr().subs(MU, -1)
    elif kind == FOLD:
        cond = chi_poly.as_expr().subs(MU, 1)
    else:
        cond = _schur_cohn_ns(chi_poly)
    root = _pick_root(cond, target, vals, var)
    if root is None:  # no closed form: keep the number
        root = sp.Float(target, 12)
    threshold = value = None
    if var is A:
        threshold = tidy(root)
        value = _threshold_value(threshold, vals)
        lam_star_atoms = threshold / p
        lam_star = tidy_signs(threshold / p_out)
    else:
        lam_star_atoms = lam_star = tidy_signs(root)
    kappa = (
        {k: tidy(lm.restore(v)) for k, v in _kappa(lm, lam_star_atoms).items()}
        if kind == FLIP
        else {}
    )
    note = (
        "a complex pair leaves the unit circle first: the oscillation is quasi-periodic, "
        "and central flows of the period-2 kind do not apply"
        if kind == NS
        else ""
    )
    return Stability(kind, chi_v, lam_star, p_out, threshold, value, kappa, note, step_note)


def _pick_root(cond: sp.Expr, lam_c: float, vals, var=LAM) -> sp.Expr | None:
    """The root of ``cond(var) = 0`` that matches the numerically located crossing."""
    num = sp.numer(sp.together(cond))
    try:
        poly = sp.Poly(num, var)
        roots = list(sp.roots(poly, multiple=True)) if poly.degree() <= 2 else None
    except sp.PolynomialError:
        roots = None
    if not roots:
        try:
            roots = sp.solve(num, var)
        except (NotImplementedError, ValueError):
            return None
    best, err = None, np.inf
    for r in roots:
        try:
            x = complex(sp.N(_numeric(r, vals)))
        except (TypeError, ValueError):
            continue
        e = abs(x - lam_c) / max(abs(lam_c), 1e-300)
        if e < err:
            best, err = r, e
    return simp(best) if best is not None and err < 1e-5 else None


def _threshold_value(c: sp.Expr, vals) -> float | None:
    e = c.xreplace(vals)
    if e.free_symbols:
        e = sp.limit(c.xreplace({k: v for k, v in vals.items() if k is not T}), T, sp.oo)
        if e.free_symbols:
            return None
    try:
        return float(f"{float(e):.12g}")
    except TypeError:
        return None


def _kappa(lm: LinearMap, lam_star: sp.Expr) -> dict[str, sp.Expr]:
    """``δf = κ δg(w_t)`` on the flip mode: the eigenvector of ``J(λ*)`` at ``μ = −1``
    with ``v_w = 1`` solves ``(J_ff + I) v_f = −J_fw``; ``κ = v_f / λ*``. Only the ``w``
    column of ``J`` depends on ``λ`` (``J = J₀ + λ·b·e_wᵀ``), so
    ``κ = −(J₀,ff + I)⁻¹ (b_f + J₀,fw/λ*)``."""
    if len(lm.variables) == 1:
        return {}
    n = lm.J.shape[0]
    Aff = (lm.J0[1:, 1:] + sp.eye(n - 1)).applyfunc(simp)
    rhs = lm.b[1:, 0] + lm.J0[1:, 0] / lam_star
    try:
        vf = Aff.LUsolve(-rhs)
    except (ValueError, ZeroDivisionError):
        return {}
    if any(e.has(sp.zoo, sp.nan) for e in vf):
        return {}
    return {f: simp(vf[i]) for i, f in enumerate(lm.variables[1:])}
