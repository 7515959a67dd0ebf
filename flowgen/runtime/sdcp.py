"""The semidefinite complementarity problem (SDCP) of one central-flow substep.

Over an Euler substep the projected stability constraint is affine in the
covariance coordinates ``X`` (k×k, ``Σ = U X Uᵀ``): ``A(X) = A₀ + B[X]``
(``docs/mathematics.md`` §2). The substep solves

    0 ⪯ X ⟂ A₀ + B[X] ⪰ 0,

i.e. ``X ⪰ 0``, ``A₀ + B[X] ⪰ 0`` and ``⟨X, A₀ + B[X]⟩ = 0``.

``B`` is given as a ``(k², k²)`` matrix acting on ``vec(X)`` (row-major
flatten). On the symmetric subspace (orthonormal basis ``E_ii``,
``(E_ij + E_ji)/√2``; coordinates ``y``) it is the ``d×d`` matrix
``B_y = Qᵀ B Q``, ``d = k(k+1)/2``, split as ``B_s + B_a`` (symmetric +
antisymmetric part; the adjoint ``B*`` is the transpose in these coordinates).

* ``A₀ ⪰ 0``: ``X = 0`` (no solver call).
* ``k = 1``: ``X = max(0, −a/b)``; ``a < 0`` needs ``b > 0``.
* ``k ≥ 2``: for ``B`` symmetric PSD the SDCP is the KKT system of the convex
  QP ``min_X ½⟨X, B_s[X]⟩ + ⟨A₀, X⟩  s.t.  X ⪰ 0`` (the multiplier of
  ``X ⪰ 0`` is ``A₀ + B_s[X]``). It is solved by cvxpy with one DPP
  problem per ``k`` (built once, cached): the quadratic is
  ``½‖L vec(X)‖²`` with ``L = diag(√μ₊) Vᵀ Qᵀ`` from ``eigh(B_s) = V diag μ Vᵀ``.
  Clarabel first, SCS if Clarabel fails. The antisymmetric remainder is
  handled by the fixed-point iteration ``Xₜ₊₁ = QP(A₀ + B_a[Xₜ])`` (at a fixed
  point the KKT conditions are exactly the SDCP).
* In JAX, before any of this (:func:`solve_sdcp_jax`, called inside the
  central flow's jitted substep): semismooth Newton on
  ``X = Π_PSD(X − A₀ − B[X])``. When ``B_s ≻ 0`` the SDCP has one solution,
  so a point with a rounding-level residual *is* it; otherwise (not
  monotone, or Newton did not converge) the caller falls back to cvxpy.
* Polish: interior-point solutions are only ``O(√gap)`` accurate on degenerate
  faces (measured: 1e-5 errors in X at a 1e-9 gap). Each QP solution is
  refined on its face (``X = C Cᵀ``, Levenberg–Marquardt on
  ``(A₀ + B[C Cᵀ]) C = 0`` with the full ``B``); the candidate with the smallest
  complementarity residual is kept. When the first QP identifies the right
  face, this also solves the non-symmetric problem without further iterations.

The data are rescaled before solving (``A₀/‖A₀‖``, ``B/‖B_s‖``, and
``X = ‖A₀‖/‖B_s‖ · X̃``) so solver tolerances are relative.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import cvxpy as cp
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from flowgen.errors import SimulationError

__all__ = [
    "SDCPResult",
    "SDCPProblem",
    "sdcp_problem",
    "solve_sdcp",
    "solve_sdcp_jax",
    "sym_basis",
]

NEG_TOL = 1e-8  # relative size below which an eigenvalue of B_s counts as zero
ACCEPT = 1e-5  # largest accepted residual of the rescaled problem
MAX_FIXED_POINT = 30  # iterations for the part of B outside its PSD symmetric part
SOLVERS = ("CLARABEL", "SCS")
MAX_NEWTON = 30  # solve_sdcp_jax: semismooth Newton steps at most
NEWTON_STOP = 1e-13  # solve_sdcp_jax: stop when the natural residual (rescaled) is below
NEWTON_ACCEPT = 1e-11  # solve_sdcp_jax: largest accepted complementarity residual (rescaled)
POLISH_RANK = 1e-6  # eigenvalues of X̃ above this (relative) span the face used by _polish


class SDCPResult(NamedTuple):
    """Solution of ``0 ⪯ X ⟂ A₀ + B[X] ⪰ 0``."""

    X: np.ndarray  # (k, k) symmetric PSD
    residual: float  # max(−λ_min(X), −λ_min(A), |⟨X, A⟩|, 0), A = A₀ + B[X], absolute
    iterations: int  # QP solves (fixed-point iterations); 0 for the closed forms
    status: str  # "zero" | "closed_form" | cvxpy status of the last solve
    solver: str = ""  # cvxpy solver used for the last solve, "" when none


@dataclass(frozen=True)
class SDCPProblem:
    """The cached parametrised QP for one ``k`` (DPP-compliant)."""

    k: int
    problem: cp.Problem
    X: cp.Variable  # (k, k) symmetric
    L: cp.Parameter  # (d, k²) factor: ½⟨X, B_s[X]⟩ = ½‖L vec(X)‖²
    A: cp.Parameter  # (k, k) symmetric linear term


@functools.cache
def sym_basis(k: int) -> np.ndarray:
    """Orthonormal basis ``Q`` (k², d) of symmetric k×k matrices in row-major vec."""
    d = k * (k + 1) // 2
    Q = np.zeros((k * k, d))
    c = 0
    for i in range(k):
        for j in range(i, k):
            if i == j:
                Q[i * k + i, c] = 1.0
            else:
                Q[i * k + j, c] = Q[j * k + i, c] = 1.0 / math.sqrt(2.0)
            c += 1
    Q.setflags(write=False)
    return Q


@functools.cache
def sdcp_problem(k: int) -> SDCPProblem:
    """The parametrised QP ``min ½‖L vec X‖² + ⟨A, X⟩, X ⪰ 0`` for size ``k`` (cached)."""
    d = k * (k + 1) // 2
    X = cp.Variable((k, k), symmetric=True)
    L = cp.Parameter((d, k * k))
    A = cp.Parameter((k, k), symmetric=True)
    objective = 0.5 * cp.sum_squares(L @ cp.vec(X, order="C")) + cp.trace(A @ X)
    problem = cp.Problem(cp.Minimize(objective), [X >> 0])
    assert problem.is_dcp(dpp=True)
    return SDCPProblem(k=k, problem=problem, X=X, L=L, A=A)


def _sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + M.T)


def _residual(X: np.ndarray, A: np.ndarray) -> float:
    """max(−λ_min(X), −λ_min(A), |⟨X, A⟩|, 0)."""
    return float(
        max(
            0.0,
            -np.linalg.eigvalsh(X)[0],
            -np.linalg.eigvalsh(A)[0],
            abs(np.sum(X * A)),
        )
    )


def _psd_part(X: np.ndarray) -> np.ndarray:
    mu, V = np.linalg.eigh(_sym(X))
    return _sym((V * np.maximum(mu, 0.0)) @ V.T)


def _polish(X: np.ndarray, A0: np.ndarray, By: np.ndarray) -> np.ndarray | None:
    """Refine an approximate solution on its face of the PSD cone, or None.

    Interior-point solutions are only ``O(√gap)`` accurate when strict
    complementarity is weak, and the face (range of ``X``) is then off too. With
    ``r`` the numerical rank of ``X`` and ``X = C Cᵀ`` (C: k×r), solve
    ``(A₀ + B[C Cᵀ]) C = 0`` — i.e. ``A(X) X = 0`` — by Levenberg–Marquardt from
    ``C₀ = V √Λ``; this uses the full, possibly non-symmetric ``B``. The caller
    keeps the result only if its complementarity residual is smaller.
    """
    k = X.shape[0]
    mu, U = np.linalg.eigh(X)
    face = mu > POLISH_RANK * max(1.0, mu[-1])
    r = int(np.sum(face))
    if r == 0:
        return None
    Q = sym_basis(k)
    Bfull = Q @ By @ Q.T  # (k², k²) acting on vec(X), output symmetrised
    C0 = U[:, face] * np.sqrt(mu[face])  # (k, r)
    I = np.eye(k)

    def F(c):
        C = c.reshape(k, r)
        A = A0 + (Bfull @ (C @ C.T).reshape(-1)).reshape(k, k)
        return (A @ C).reshape(-1)

    def J(c):  # d vec(A C) / d vec(C), row-major
        C = c.reshape(k, r)
        A = A0 + (Bfull @ (C @ C.T).reshape(-1)).reshape(k, k)
        # vec(E Cᵀ + C Eᵀ) for E = e_a e_bᵀ: entry (i, j) is δ_ia C_jb + C_ib δ_ja
        dX = (np.einsum("ia,jb->ijab", I, C) + np.einsum("ib,ja->ijab", C, I)).reshape(k * k, k * r)
        dA = Bfull @ dX  # (k², k r)
        # vec(dA · C) = (I ⊗ Cᵀ) vec(dA) row-major; vec(A dC) = (A ⊗ I_r) vec(dC)
        return np.kron(I, C.T) @ dA + np.kron(A, np.eye(r))

    try:
        sol = scipy.optimize.least_squares(
            F, C0.reshape(-1), jac=J, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
    except (ValueError, np.linalg.LinAlgError):
        return None
    if not np.all(np.isfinite(sol.x)):
        return None
    C = sol.x.reshape(k, r)
    return _sym(C @ C.T)


def _solve_qp(prob: SDCPProblem, L: np.ndarray, A: np.ndarray, tol: float):
    """One solve of the cached QP; Clarabel, then SCS. Returns (X, status, solver)."""
    prob.L.value = L
    prob.A.value = _sym(A)
    statuses = []
    for solver in SOLVERS:
        opts = (
            {"tol_gap_abs": tol, "tol_gap_rel": tol, "tol_feas": tol}
            if solver == "CLARABEL"
            else {"eps_abs": max(tol, 1e-10), "eps_rel": max(tol, 1e-10), "max_iters": 100_000}
        )
        try:
            # no warm start: a solve must not depend on the previous one (resumed runs
            # reproduce uninterrupted ones exactly)
            prob.problem.solve(solver=solver, warm_start=False, **opts)
            status = prob.problem.status
        except cp.error.SolverError as e:
            status = f"solver error: {e}"
        statuses.append(f"{solver}: {status}")
        if status in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) and prob.X.value is not None:
            return _sym(np.asarray(prob.X.value)), status, solver
    raise SimulationError(
        f"SDCP solver failed (k={prob.k}): " + "; ".join(statuses),
        hint="an unbounded QP means no stable covariance exists along some direction "
        "(B gives no restoring curvature where A₀ is negative)",
    )


def solve_sdcp(A0: np.ndarray, B: np.ndarray, *, tol: float = 1e-9) -> SDCPResult:
    """Solve ``0 ⪯ X ⟂ A₀ + B[X] ⪰ 0``.

    Args:
      A0: (k, k) symmetric (symmetrised here).
      B: (k², k²) linear map on ``vec(X)`` (row-major); need not be symmetric.
      tol: solver tolerance (Clarabel gap/feasibility, rescaled problem); the
        fixed-point iteration stops when ``‖ΔX̃‖_F ≤ 100·tol·(1 + ‖X̃‖_F)``.

    Returns:
      :class:`SDCPResult`.

    Raises:
      SimulationError: non-finite data; ``k = 1`` with ``a < 0`` and ``b ≤ 0``; ``B_s``
        significantly indefinite (not monotone); solver failure or a final
        rescaled residual above ``ACCEPT`` — never a silent zero.
    """
    A0 = np.asarray(A0, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if A0.ndim != 2 or A0.shape[0] != A0.shape[1]:
        raise ValueError(f"A0 must be square, got shape {A0.shape}")
    k = A0.shape[0]
    if B.shape != (k * k, k * k):
        raise ValueError(f"B must have shape {(k * k, k * k)} for k={k}, got {B.shape}")
    if not (np.all(np.isfinite(A0)) and np.all(np.isfinite(B))):
        raise SimulationError(f"SDCP (k={k}): A0 or B contains NaN/inf")
    A0 = _sym(A0)

    if np.linalg.eigvalsh(A0)[0] >= 0.0:
        return SDCPResult(np.zeros((k, k)), 0.0, 0, "zero")

    Q = sym_basis(k)
    By = Q.T @ B @ Q  # (d, d) on symmetric coordinates

    def apply_B(M: np.ndarray, X: np.ndarray) -> np.ndarray:  # M (d, d), X (k, k)
        return (Q @ (M @ (Q.T @ X.reshape(-1)))).reshape(k, k)

    if k == 1:
        a, b = float(A0[0, 0]), float(By[0, 0])
        if b <= 0.0:
            raise SimulationError(
                f"no stable covariance: k=1 with a={a:.6g} < 0 but b={b:.6g} <= 0 "
                "(the constraint does not recover as X grows)"
            )
        X = np.array([[-a / b]])
        return SDCPResult(X, _residual(X, A0 + apply_B(By, X)), 0, "closed_form")

    Bs = _sym(By)
    mu, V = np.linalg.eigh(Bs)
    sB = float(np.max(np.abs(mu)))
    if sB == 0.0 or mu[-1] <= NEG_TOL * sB:
        raise SimulationError(
            f"SDCP without restoring curvature (k={k}): the symmetric part of B has no positive "
            f"eigenvalue (largest {mu[-1]:.6g}); no covariance can restore stability here"
        )
    # splitting B = B₊ + R with B₊ the PSD part of B_s: the QP uses B₊, the remainder R
    # (antisymmetric part, and the negative part of B_s when the SDCP is not monotone)
    # goes to the fixed-point iteration; a fixed point satisfies the SDCP exactly.
    Bplus = (V * np.maximum(mu, 0.0)) @ V.T
    R = By - Bplus
    sA = float(np.max(np.abs(np.linalg.eigvalsh(A0))))
    A0n, Bn, Ban = A0 / sA, By / sB, R / sB  # rescaled data, X = (sA/sB)·X̃
    L = (np.sqrt(np.maximum(mu / sB, 0.0))[:, None] * V.T) @ Q.T  # (d, k²)
    antisym = np.max(np.abs(Ban)) > 1e-14

    prob = sdcp_problem(k)
    Xn = np.zeros((k, k))
    best, best_r = None, np.inf
    status, solver, it = "", "", 0
    while it < MAX_FIXED_POINT:
        it += 1
        lin = A0n + apply_B(Ban, Xn) if antisym else A0n
        Xnew, status, solver = _solve_qp(prob, L, lin, tol)
        change = np.linalg.norm(Xnew - Xn)
        Xn = Xnew
        for cand in (_psd_part(Xn), _polish(Xn, A0n, Bn)):
            if cand is not None:
                r = _residual(cand, A0n + apply_B(Bn, cand))
                if r < best_r:
                    best, best_r = cand, r
        if best_r <= tol or not antisym:
            break
        if change <= 100 * tol * (1.0 + np.linalg.norm(Xn)):
            break
    Xn, rn = best, best_r
    if not rn <= ACCEPT:
        raise SimulationError(
            f"SDCP solution rejected (k={k}): rescaled complementarity residual {rn:.3g} > "
            f"{ACCEPT:g} after {it} QP solve(s); last status {status} ({solver})",
            hint="a strongly non-symmetric B can make the fixed-point iteration diverge",
        )
    X = (sA / sB) * Xn
    return SDCPResult(X, _residual(X, A0 + apply_B(By, X)), it, status, solver)


def solve_sdcp_jax(A0, B, *, max_iter: int = MAX_NEWTON):
    """The SDCP by semismooth Newton in JAX (jit-able); ``(X, ok)``.

    On the rescaled data (``Ã₀ = A₀/‖A₀‖``, ``B̃ = B/‖B_s‖``) it solves the
    natural equation ``F(X) = X − Π(X − Ã₀ − B̃[X]) = 0`` (``Π``: projection
    on the PSD cone, whose zeros are exactly the SDCP's solutions) from the
    projected full-rank candidate ``Π(−B̃_y⁻¹ Ã₀)``. The Newton matrix uses
    the derivative of ``Π`` at ``Z = V diag μ Vᵀ``: ``H ↦ V (Ω ∘ Vᵀ H V) Vᵀ``,
    ``Ω_ij = (μᵢ⁺ − μⱼ⁺)/(μᵢ − μⱼ)`` (``1``/``0`` on ties of positive/non-positive
    eigenvalues). Newton converges in a few steps and the solution's face is
    exact (zero eigenvalues of X are rounding zeros).

    ``ok`` when ``A₀ ⪰ 0`` (``X = 0``), or when ``B_s ≻ 0`` (strictly
    monotone: the solution is unique, so the one found is the cvxpy path's)
    and the complementarity residual of the rescaled problem is at most
    ``NEWTON_ACCEPT``. Otherwise ``X`` is zeros and the caller solves with
    :func:`solve_sdcp` (``tests/test_sdcp.py`` compares the two).
    """
    dtype = A0.dtype
    k = A0.shape[0]
    Q = jnp.asarray(sym_basis(k), dtype)  # (k², d)
    d = Q.shape[1]
    A0 = 0.5 * (A0 + A0.T)
    By = Q.T @ B @ Q  # (d, d)
    muB = jnp.linalg.eigvalsh(0.5 * (By + By.T))
    sB = jnp.max(jnp.abs(muB))
    sA = jnp.max(jnp.abs(jnp.linalg.eigvalsh(A0)))
    monotone = muB[0] > NEG_TOL * sB
    safe = lambda x: jnp.where(x > 0, x, 1.0)  # noqa: E731
    a = Q.T @ A0.reshape(-1) / safe(sA)  # Ã₀ in symmetric coordinates
    Bn = By / safe(sB)
    mat = lambda y: (Q @ y).reshape(k, k)  # noqa: E731

    def proj(y):  # Π in coordinates, with the eigen data of the argument
        mu, V = jnp.linalg.eigh(mat(y))
        return Q.T @ ((V * jnp.maximum(mu, 0.0)) @ V.T).reshape(-1), mu, V

    def residual(y):
        z = y - a - Bn @ y
        p, mu, V = proj(z)
        return y - p, mu, V

    def newton(c):
        i, y, _ = c
        F, mu, V = residual(y)
        mp = jnp.maximum(mu, 0.0)
        dmu = mu[:, None] - mu[None, :]
        tie = jnp.abs(dmu) <= 1e-14 * (1.0 + jnp.max(jnp.abs(mu)))
        pos = (mu[:, None] > 0) & (mu[None, :] > 0)
        Om = jnp.where(
            tie, pos.astype(dtype), (mp[:, None] - mp[None, :]) / jnp.where(tie, 1.0, dmu)
        )
        E = Q.T.reshape(d, k, k)  # basis matrices

        def dproj(H):  # DΠ_Z[H] in coordinates
            return Q.T @ (V @ (Om * (V.T @ H @ V)) @ V.T).reshape(-1)

        J = jnp.eye(d, dtype=dtype) - jax.vmap(dproj, out_axes=1)(E - jax.vmap(mat)(Bn.T))
        y = y + jnp.linalg.solve(J, -F)
        return i + 1, y, jnp.linalg.norm(F)

    y0 = jnp.linalg.solve(Bn, -a)
    y0 = jnp.where(jnp.all(jnp.isfinite(y0)), y0, 0.0)
    y0, _, _ = proj(y0)
    _, y, _ = jax.lax.while_loop(
        lambda c: (c[0] < max_iter) & (c[2] > NEWTON_STOP),
        newton,
        (jnp.asarray(0), y0, jnp.asarray(jnp.inf, dtype)),
    )
    Xn = mat(y)
    Xn = 0.5 * (Xn + Xn.T)
    An = mat(a + Bn @ y)
    r = jnp.max(
        jnp.stack(
            [
                jnp.zeros((), dtype),
                -jnp.linalg.eigvalsh(Xn)[0],
                -jnp.linalg.eigvalsh(An)[0],
                jnp.abs(jnp.sum(Xn * An)),
            ]
        )
    )
    solved = monotone & (r <= NEWTON_ACCEPT) & jnp.all(jnp.isfinite(Xn))
    zero = jnp.linalg.eigvalsh(A0)[0] >= 0.0
    X = jnp.where(solved & ~zero, (sA / safe(sB)) * Xn, 0.0)
    return X, zero | solved
