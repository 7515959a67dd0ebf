"""flowgen.runtime.sdcp: closed forms, cvxpy against brute force, failures."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from flowgen.errors import SimulationError
from flowgen.runtime import sdcp
from flowgen.runtime.sdcp import sdcp_problem, solve_sdcp, sym_basis


def psd_project(X):
    mu, V = np.linalg.eigh(0.5 * (X + X.T))
    return (V * np.maximum(mu, 0)) @ V.T


def apply_B(B, X):
    k = X.shape[0]
    A = (B @ X.reshape(-1)).reshape(k, k)
    return 0.5 * (A + A.T)


def random_problem(k, seed, asym=0.0):
    """PSD (plus ``asym`` antisymmetric) B on symmetric matrices; A0 of mixed sign."""
    rng = np.random.default_rng(seed)
    Q = sym_basis(k)
    d = Q.shape[1]
    M = rng.normal(size=(d, d))
    By = M @ M.T / d + 0.3 * np.eye(d)
    E = rng.normal(size=(d, d))
    By = By + asym * (E - E.T)
    V, _ = np.linalg.qr(rng.normal(size=(k, k)))
    ev = rng.normal(size=k) * 2
    ev[0], ev[-1] = -abs(ev[0]) - 0.5, abs(ev[-1]) + 0.5  # at least one of each sign
    A0 = (V * ev) @ V.T
    return A0, Q @ By @ Q.T


def projection_solver(A0, B, iters=200_000, tol=1e-14):
    """Independent solver: X ← Π_PSD(X − α(A₀ + B[X])), a contraction for monotone B."""
    k = A0.shape[0]
    Q = sym_basis(k)
    By = Q.T @ B @ Q
    Bs = 0.5 * (By + By.T)
    mu = np.linalg.eigvalsh(Bs)
    alpha = mu[0] / np.linalg.norm(By, 2) ** 2  # < 2μ/L² for the forward step
    X = np.zeros((k, k))
    for _ in range(iters):
        Xn = psd_project(X - alpha * (A0 + apply_B(B, X)))
        if np.max(np.abs(Xn - X)) < tol:
            return Xn
        X = Xn
    raise AssertionError("projection iteration did not converge")


def cholesky_solver(A0, B, starts=6, seed=0):
    """Independent solver: min ½⟨X,B[X]⟩ + ⟨A0,X⟩ over X = CCᵀ (BFGS, several starts)."""
    k = A0.shape[0]
    rng = np.random.default_rng(seed)
    Bsym = 0.5 * (B + B.T)

    def f(c):
        C = c.reshape(k, k)
        X = C @ C.T
        x = X.reshape(-1)
        GX = (Bsym @ x).reshape(k, k) + A0  # gradient in X
        return 0.5 * x @ Bsym @ x + np.sum(A0 * X), (2 * GX @ C).reshape(-1)

    best = None
    for _ in range(starts):
        r = scipy.optimize.minimize(
            f,
            rng.normal(size=k * k),
            jac=True,
            method="BFGS",
            options={"gtol": 1e-12, "maxiter": 10_000},
        )
        if best is None or r.fun < best.fun:
            best = r
    C = best.x.reshape(k, k)
    return C @ C.T


def check_complementarity(X, A0, B, atol=1e-6):
    A = A0 + apply_B(B, X)
    assert np.linalg.eigvalsh(X)[0] >= -atol
    assert np.linalg.eigvalsh(A)[0] >= -atol
    assert abs(np.sum(X * A)) <= atol


# --- k = 1 --------------------------------------------------------------------


def test_k1_closed_form():
    r = solve_sdcp(np.array([[-0.3]]), np.array([[2.0]]))
    assert r.status == "closed_form" and r.iterations == 0
    np.testing.assert_allclose(r.X, [[0.15]], rtol=1e-15)
    assert r.residual <= 1e-15


@pytest.mark.parametrize("a", [0.0, 0.7])
def test_k1_nonnegative_a_gives_zero(a):
    r = solve_sdcp(np.array([[a]]), np.array([[-1.0]]))  # b irrelevant when a >= 0
    assert r.status == "zero"
    np.testing.assert_array_equal(r.X, [[0.0]])


@pytest.mark.parametrize("b", [0.0, -1.0])
def test_k1_no_stable_covariance(b):
    with pytest.raises(SimulationError, match="no stable covariance"):
        solve_sdcp(np.array([[-1.0]]), np.array([[b]]))


# --- k >= 2 against brute force ---------------------------------------------------


@pytest.mark.parametrize("k,seed", [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)])
def test_matches_brute_force(k, seed):
    A0, B = random_problem(k, seed)
    r = solve_sdcp(A0, B)
    assert r.status in ("optimal", "optimal_inaccurate") and r.solver == "CLARABEL"
    assert r.residual <= 1e-9
    check_complementarity(r.X, A0, B)
    Xp = projection_solver(A0, B)
    check_complementarity(Xp, A0, B, atol=1e-9)
    np.testing.assert_allclose(r.X, Xp, atol=1e-6)
    np.testing.assert_allclose(r.X, cholesky_solver(A0, B), atol=1e-5)


def test_falls_back_to_scs(monkeypatch):
    monkeypatch.setattr(sdcp, "SOLVERS", ("NOT_A_SOLVER", "SCS"))  # first one raises
    A0, B = random_problem(3, 1)
    r = solve_sdcp(A0, B)
    assert r.solver == "SCS"
    assert r.residual <= 1e-6
    np.testing.assert_allclose(r.X, projection_solver(A0, B), atol=1e-6)


def test_psd_A0_fast_path_skips_solver(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("solver called")

    monkeypatch.setattr(sdcp, "_solve_qp", boom)
    A0, B = random_problem(3, 0)
    r = solve_sdcp(A0 @ A0.T, B)
    assert r.status == "zero" and r.iterations == 0
    np.testing.assert_array_equal(r.X, np.zeros((3, 3)))


def test_cached_problem_is_reused():
    first = sdcp_problem(3)
    misses = sdcp_problem.cache_info().misses
    for seed in (3, 4):
        A0, B = random_problem(3, seed)
        r = solve_sdcp(A0, B)
        check_complementarity(r.X, A0, B)
    assert sdcp_problem(3) is first
    assert sdcp_problem.cache_info().misses == misses
    assert first.X.value is not None  # the cached problem is the one that was solved


def test_slightly_nonsymmetric_B_converges():
    A0, B = random_problem(3, 5, asym=0.02)
    r = solve_sdcp(A0, B)
    assert 1 <= r.iterations < sdcp.MAX_FIXED_POINT
    assert r.residual <= 1e-9
    check_complementarity(r.X, A0, B)
    np.testing.assert_allclose(r.X, projection_solver(A0, B), atol=1e-6)


def test_fixed_point_iteration_without_polish(monkeypatch):
    """The antisymmetric part handled by the fixed-point iteration alone."""
    monkeypatch.setattr(sdcp, "_polish", lambda *a: None)
    A0, B = random_problem(3, 5, asym=0.02)
    r = solve_sdcp(A0, B)
    assert 1 < r.iterations <= sdcp.MAX_FIXED_POINT
    assert r.residual <= 1e-6
    np.testing.assert_allclose(r.X, projection_solver(A0, B), atol=1e-5)


def test_scaled_problem():
    """Units of a real substep: A₀ ~ 1e2, B ~ 1e5; the answer scales accordingly."""
    A0, B = random_problem(2, 6)
    r1 = solve_sdcp(A0, B)
    r2 = solve_sdcp(1e2 * A0, 1e5 * B)
    np.testing.assert_allclose(r2.X, 1e-3 * r1.X, rtol=1e-6, atol=1e-12)


# --- failures --------------------------------------------------------------------


def test_mildly_non_monotone_is_solved_by_splitting():
    """B_s with a small negative eigenvalue: the splitting B = B₊ + R still finds X
    satisfying all three complementarity conditions."""
    rng = np.random.default_rng(11)
    k = 3
    Q = sym_basis(k)
    d = Q.shape[1]
    V = np.linalg.qr(rng.standard_normal((d, d)))[0]
    By = V @ np.diag([2.0, 1.5, 1.0, 0.8, 0.5, -0.05]) @ V.T
    A0 = np.diag([-1.0, -0.3, 0.5])
    res = solve_sdcp(A0, Q @ By @ Q.T)
    X = res.X
    A = A0 + (Q @ (By @ (Q.T @ X.reshape(-1)))).reshape(k, k)
    assert np.linalg.eigvalsh(X)[0] > -1e-7
    assert np.linalg.eigvalsh(A)[0] > -1e-7
    assert abs(np.sum(X * A)) < 1e-7
    assert np.trace(X) > 0


def test_no_restoring_curvature_raises():
    A0, B = random_problem(2, 7)
    Q = sym_basis(2)
    with pytest.raises(SimulationError, match="no restoring curvature|no positive"):
        solve_sdcp(A0, -Q @ Q.T)


def test_unbounded_raises_with_status_and_k():
    # no curvature along E_11 where A0 is negative: the QP is unbounded
    Q = sym_basis(2)
    B = Q @ np.diag([1.0, 1.0, 0.0]) @ Q.T
    with pytest.raises(SimulationError, match=r"k=2.*(unbounded|infeasible|error)"):
        solve_sdcp(np.diag([1.0, -1.0]), B)


def test_nan_raises():
    A0, B = random_problem(2, 8)
    B[0, 0] = np.nan
    with pytest.raises(SimulationError, match="NaN"):
        solve_sdcp(A0, B)


# --- the in-JAX path (full-rank faces inside the central flow's jitted call) --------


def full_rank_problem(k, seed, asym=0.0):
    """A monotone problem whose solution is full rank: A0 = −B[X*] for X* ≻ 0."""
    _, B = random_problem(k, seed, asym)
    rng = np.random.default_rng(seed + 100)
    C = rng.normal(size=(k, k))
    Xs = C @ C.T + 0.1 * np.eye(k)
    return -apply_B(B, Xs), B, Xs


@pytest.mark.parametrize("k,seed,asym", [(2, 0, 0.0), (3, 1, 0.0), (4, 2, 0.05), (6, 3, 0.0)])
def test_jax_full_rank_face_matches_cvxpy(k, seed, asym):
    import jax
    import jax.numpy as jnp

    from flowgen.precision import float64

    A0, B, Xs = full_rank_problem(k, seed, asym)
    with float64():
        X, ok = jax.jit(sdcp.solve_sdcp_jax)(jnp.asarray(A0), jnp.asarray(B))
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(X), Xs, rtol=1e-10, atol=1e-12)
    r = solve_sdcp(A0, B)
    np.testing.assert_allclose(np.asarray(X), r.X, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k,seed,asym", [(2, 0, 0.0), (3, 1, 0.0), (3, 2, 0.0), (4, 3, 0.05)])
def test_jax_rank_deficient_faces_match_cvxpy(k, seed, asym):
    """random_problem's solutions are rank-deficient (checked): the semismooth Newton
    finds the same face and X as cvxpy + polish; a PSD A0 gives X = 0."""
    import jax
    import jax.numpy as jnp

    from flowgen.precision import float64

    A0, B = random_problem(k, seed, asym)
    r = solve_sdcp(A0, B)
    mu = np.linalg.eigvalsh(r.X)
    assert mu[0] < 1e-6 * mu[-1]  # the reference solution is rank-deficient
    with float64():
        X, ok = jax.jit(sdcp.solve_sdcp_jax)(jnp.asarray(A0), jnp.asarray(B))
        assert bool(ok)
        np.testing.assert_allclose(np.asarray(X), r.X, atol=1e-9 * np.abs(r.X).max())
        check_complementarity(np.asarray(X), A0, B, atol=1e-12)
        X, ok = sdcp.solve_sdcp_jax(jnp.asarray(np.eye(k)), jnp.asarray(B))
    assert bool(ok) and not np.any(np.asarray(X))


def test_jax_path_declines_non_monotone():
    """B_s indefinite: the solution need not be unique; the JAX path leaves it to cvxpy."""
    import jax.numpy as jnp

    from flowgen.precision import float64

    k = 2
    Q = sym_basis(k)
    By = np.diag([1.0, -0.5, 2.0])
    B = Q @ By @ Q.T
    A0 = -apply_B(B, np.eye(k))  # X = I solves A0 + B[X] = 0 but B is not monotone
    with float64():
        X, ok = sdcp.solve_sdcp_jax(jnp.asarray(A0), jnp.asarray(B))
    assert not bool(ok)
