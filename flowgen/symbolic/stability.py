"""Stability threshold of an update rule (``central-flows.md`` §3).

Restrict to one eigendirection of curvature ``λ`` (``g = λ·w``) with slow
states and counters frozen. The linearised map of ``x = (w, fast states)`` is
``x_t = J(λ) x_{t-1}``; its characteristic polynomial ``χ(μ) = det(μI − J)``
decides stability (Jury / Schur–Cohn: all roots inside the unit circle). The
critical curvature ``λ*`` is the smallest ``λ > 0`` at which a root reaches the
unit circle:

* at ``μ = −1``: *flip* (period-2 oscillation; the edge-of-stability case);
* at ``μ = +1``: *fold*;
* a complex pair: *Neimark–Sacker* (quasi-periodic).

Which boundary is crossed first is decided numerically at the given
hyperparameters (a scan of the spectral radius, refined by bisection); the
closed form is then the root of ``χ(−1)``, ``χ(1)`` or the Schur–Cohn
determinant that matches it.

When the ``w`` update factors as ``−p(state)·(linear form in g and fast
states)`` (+ terms in ``w`` alone, e.g. decoupled weight decay), ``p`` is the
effective step size — the gain from a constant gradient at the fast states'
fixed point, so that the stable flow is ``dw/dt = −p·∇L`` — and the threshold
on the effective sharpness ``λ_max(P⁻¹H)``, ``P⁻¹ = diag(p)``, is ``c = λ*·p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp

from flowgen.symbolic.classify import FAST, strip_reductions
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

# Dummy symbols: never equal to a user's name (a hyperparameter may be called `lambda`)
LAM = sp.Dummy("lambda", positive=True)  # curvature of the eigendirection
MU = sp.Dummy("mu")  # multiplier of the linearised map
A = sp.Dummy("a", positive=True)  # dimensionless curvature λ·p

FLIP, FOLD, NS, NONE = "flip", "fold", "neimark-sacker", "none"


@dataclass(frozen=True)
class LinearMap:
    """``x_t = J x_{t-1}`` for ``x = (w, fast...)`` with ``g = λ w``."""

    variables: tuple[str, ...]  # ("w", *fast)
    J: sp.Matrix  # in LAM, hypers, frozen states, t
    p: sp.Expr | None  # effective step size (None: does not factor)
    ratios: dict[str, sp.Expr]  # coefficients of the linear form / (−p)


@dataclass(frozen=True)
class Stability:
    bifurcation: str
    char_poly: sp.Expr  # monic χ(μ) in a = λ·p when p exists, else in λ
    critical_curvature: sp.Expr | None  # λ*
    effective_step: sp.Expr | None  # p
    threshold: sp.Expr | None  # c = λ*·p
    threshold_value: float | None
    kappa: dict[str, sp.Expr]  # δf = κ·δg(w_t) on the critical mode (fast states)
    note: str = ""


def _frozen_substitution(model: StepModel, classes: dict[str, str]) -> dict:
    """Fast states' new values expanded; slow states and counters frozen."""
    expand: dict = {}
    for st in model.statements:
        if st.role != "state":
            continue
        if classes[st.target] == FAST:
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


def linear_map(model: StepModel, classes: dict[str, str]) -> LinearMap:
    fast = [s for s in model.states if classes[s] == FAST]
    for s in fast:
        if model.scalar[s]:
            raise model.error(
                f"scalar state `{s}` responds linearly to g; flowgen's stability analysis "
                "supports per-coordinate fast states only",
                model.assign_node.get(s),
            )
    expand = _frozen_substitution(model, classes)
    fsyms = [sp.Symbol(f, real=True) for f in fast]
    w_new = _freeze_reductions(model, model.w_new.xreplace(expand), fsyms)
    f_new = [_freeze_reductions(model, expand[new_symbol(f)], fsyms) for f in fast]
    at0 = {G: 0, W: 0, **{f: 0 for f in fsyms}}

    def d(e, v):
        return simp(sp.diff(e, v).subs(at0))

    outs = [w_new, *f_new]
    ins = [W, *fsyms]
    J = sp.zeros(len(outs), len(ins))
    for i, out in enumerate(outs):
        for j, var in enumerate(ins):
            direct = d(out, var)
            via_g = d(out, G) * LAM if var is W else 0
            J[i, j] = simp(direct + via_g)
    for e in J:
        if e.has(sp.zoo, sp.oo, sp.nan):
            raise model.error(
                "the update is not differentiable at g = 0 (a division by a vanishing quantity), "
                "so it has no linear stability analysis",
                model.assign_node.get("w"),
            )

    # effective step size: gain from a constant g at the fast fixed point
    dw = w_new - W
    a_g = d(dw, G)
    a_f = sp.Matrix([[d(dw, f) for f in fsyms]])
    if fast:
        Af = sp.Matrix([[d(fn, f) for f in fsyms] for fn in f_new])
        bf = sp.Matrix([d(fn, G) for fn in f_new])
        try:
            fstar = (sp.eye(len(fast)) - Af).LUsolve(bf)
        except (ValueError, ZeroDivisionError):
            fstar = None
        gain = None if fstar is None else simp(a_g + (a_f * fstar)[0, 0])
    else:
        gain = a_g
    p: sp.Expr | None = None
    ratios: dict[str, sp.Expr] = {}
    frozen = {sp.Symbol(s, real=True) for s in model.states if classes[s] != FAST} | {T}
    if gain is not None and gain != 0:
        cand = simp(-gain)
        coeffs = {"g": a_g, **{f: a_f[0, i] for i, f in enumerate(fast)}}
        ratios = {k: simp(v / -cand) for k, v in coeffs.items()}
        if all(not (r.free_symbols & frozen) for r in ratios.values()):
            p = cand
    return LinearMap(("w", *fast), J, p, ratios)


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


def analyse(model: StepModel, classes: dict[str, str]) -> Stability:
    lm = linear_map(model, classes)
    n = lm.J.shape[0]
    chi = simp((MU * sp.eye(n) - lm.J).det(method="berkowitz"))
    vals = sample_values(model)
    Jsample = _numeric(lm.J, vals)
    if any(e.has(sp.zoo, sp.nan, sp.oo) for e in Jsample):
        raise model.error(
            "the linearised update is singular at the sampled state values; "
            "flowgen cannot locate its stability threshold",
            model.assign_node.get("w"),
        )
    Jn = sp.lambdify(LAM, Jsample, "numpy")

    def Jnum(x):
        return np.array(Jn(x), dtype=complex).reshape(n, n)

    lam_c, kind = _find_crossing(Jnum)
    if lam_c is None:
        note = {
            "stable": "the linearised map is stable for every curvature λ > 0",
            "unstable everywhere": "the linearised map is unstable at every curvature λ > 0",
        }.get(kind, "the linearised map is unstable already at vanishing curvature")
        return Stability(NONE, chi, None, lm.p, None, None, {}, note)

    p = None if lm.p is None else tidy_signs(sp.factor(lm.p))
    # in the dimensionless curvature a = λ·p the polynomial is free of the frozen states
    var, chi_v, target = (LAM, chi, lam_c)
    if p is not None:
        chi_a = sp.collect(sp.expand(simp(chi.subs(LAM, A / p))), MU)
        p_num = complex(sp.N(_numeric(p, vals))).real
        var, chi_v, target = A, chi_a, lam_c * p_num
    chi_poly = sp.Poly(chi_v, MU)
    chi_v = sp.collect(sp.expand(simp(chi_poly.as_expr() / chi_poly.LC())), MU)
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
    if p is not None:
        threshold = tidy(root)
        value = _threshold_value(threshold, vals)
        lam_star = tidy_signs(threshold / p)
        chi = chi_v
    else:
        lam_star = tidy_signs(root)
    kappa = _kappa(lm, lam_star) if kind == FLIP else {}
    note = (
        "a complex pair leaves the unit circle first: the oscillation is quasi-periodic, "
        "and central flows of the period-2 kind do not apply"
        if kind == NS
        else ""
    )
    return Stability(kind, chi, lam_star, p, threshold, value, kappa, note)


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
    with ``v_w = 1`` solves ``(J_ff + I) v_f = −J_fw``; ``κ = v_f / λ*``."""
    if len(lm.variables) == 1:
        return {}
    M = (lm.J + sp.eye(lm.J.shape[0])).subs(LAM, lam_star).applyfunc(simp)
    Jff, Jfw = M[1:, 1:], M[1:, 0]
    try:
        vf = Jff.LUsolve(-Jfw)
    except (ValueError, ZeroDivisionError):
        return {}
    if any(e.has(sp.zoo, sp.nan) for e in vf):
        return {}
    return {f: tidy(vf[i] / lam_star) for i, f in enumerate(lm.variables[1:])}
