"""flowgen.runtime.eigen against dense numpy.linalg.eigh."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from flowgen.errors import SimulationError
from flowgen.runtime.eigen import (
    EigState,
    hvp,
    refresh,
    sym_eff_hessian_matvec,
    top_eigenpairs,
    top_eigenpairs_with_info,
    track_top,
)

N = 200


def _matmul(M, v):  # one module-level function: every Partial(_matmul, M) shares a compile
    return M @ v


def op_of(M) -> Partial:
    return Partial(_matmul, jnp.asarray(M))


def random_symmetric(top, n=N, bulk=(-3.0, 1.0), seed=0):
    """Random orthogonal eigenbasis, eigenvalues ``top`` then a uniform bulk."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    ev = np.concatenate([np.asarray(top, float), rng.uniform(*bulk, n - len(top))])
    return (Q * ev) @ Q.T


def assert_matches_dense(state: EigState, M, k, rtol=1e-9, align=1e-9):
    ev, V = np.linalg.eigh(M)
    ev, V = ev[::-1][:k], V[:, ::-1][:, :k]
    vals, vecs = np.asarray(state.vals), np.asarray(state.vecs)
    assert vals.shape == (k,) and vecs.shape == (M.shape[0], k)
    assert np.all(np.diff(vals) <= 0), "not sorted descending"
    np.testing.assert_allclose(vals, ev, rtol=rtol, atol=rtol * abs(ev[0]))
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(k), atol=1e-10)
    overlap = np.abs(np.sum(vecs * V, axis=0))  # |⟨v_j, v_j^ref⟩|, simple spectrum
    assert np.all(overlap >= 1 - align), overlap


@pytest.mark.parametrize("k", [1, 3, 5])
def test_random_symmetric_with_gap(k):
    M = random_symmetric([10.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.5])
    assert_matches_dense(top_eigenpairs(op_of(M), N, k), M, k)


def test_largest_algebraic_not_magnitude():
    # a large negative eigenvalue must not be mistaken for the top one
    M = random_symmetric([5.0, 4.0, 3.0], bulk=(-20.0, 2.0), seed=1)
    state = top_eigenpairs(op_of(M), N, 3)
    assert_matches_dense(state, M, 3)


def test_plain_function_and_dense_path():
    M = random_symmetric([3.0, 2.0], n=12, bulk=(-1.0, 1.0), seed=2)
    Mj = jnp.asarray(M)
    state, info = top_eigenpairs_with_info(lambda v: Mj @ v, 12, 2)  # n < 4(k+2): dense
    assert int(info.iterations) == 0
    assert_matches_dense(state, M, 2)


def test_warm_start_needs_fewer_iterations():
    M = random_symmetric([10.0, 9.0, 7.0, 6.0, 5.0])
    rng = np.random.default_rng(3)
    E = rng.normal(size=(N, N)) * 1e-3
    M1 = M + E + E.T
    s0, _ = top_eigenpairs_with_info(op_of(M), N, 3)
    _, cold = top_eigenpairs_with_info(op_of(M1), N, 3)
    s1, warm = top_eigenpairs_with_info(op_of(M1), N, 3, init=s0.vecs)
    assert int(warm.iterations) < int(cold.iterations)
    assert int(warm.matvecs) < int(cold.matvecs)
    assert_matches_dense(s1, M1, 3)


def test_guards_returned_and_a_full_block_warm_start_is_cheaper():
    """``guards=True`` returns the whole block; passed back, it warm-starts every column
    (the sharpness meter's use), so the next solve needs fewer iterations than when
    only the wanted column is warm and the guards start random."""
    M = random_symmetric([10.0, 9.8, 9.6, 6.0, 5.0], seed=4)
    E = np.random.default_rng(5).normal(size=(N, N)) * 1e-4
    M1 = M + E + E.T
    full = top_eigenpairs(op_of(M), N, 1, tol=1e-8, guards=True)
    assert full.vals.shape == (3,) and full.vecs.shape == (N, 3)
    _, part = top_eigenpairs_with_info(op_of(M1), N, 1, init=full.vecs[:, :1], tol=1e-8)
    s1, blk = top_eigenpairs_with_info(op_of(M1), N, 1, init=full.vecs, tol=1e-8)
    assert int(blk.iterations) < int(part.iterations)
    assert_matches_dense(s1, M1, 1)
    tiny = top_eigenpairs(op_of(M[:4, :4]), 4, 1, guards=True)  # dense path: at most n pairs
    assert tiny.vecs.shape == (4, 3)


def test_inside_jit():
    M = random_symmetric([10.0, 9.0, 7.0])
    f = jax.jit(lambda M: top_eigenpairs(Partial(_matmul, M), N, 3, key=jax.random.PRNGKey(4)))
    assert_matches_dense(f(jnp.asarray(M)), M, 3)


def test_nan_raises_simulation_error():
    M = np.eye(N)
    M[0, 0] = np.nan
    with pytest.raises(SimulationError, match="eigensolver"):
        top_eigenpairs(op_of(M), N, 1)


# --- MLP Hessian -----------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    """tanh MLP 12→16→6, 50 examples, MSE: n = 310 parameters."""
    rng = np.random.default_rng(5)
    X = jnp.asarray(rng.normal(size=(50, 12)))
    Y = jnp.asarray(rng.normal(size=(50, 6)))
    params = [
        (jnp.asarray(rng.normal(size=(12, 16)) / np.sqrt(12)), jnp.zeros(16)),
        (jnp.asarray(rng.normal(size=(16, 6)) / np.sqrt(16)), jnp.zeros(6)),
    ]
    w, unravel = ravel_pytree(params)

    def loss(w):
        (W1, b1), (W2, b2) = unravel(w)
        return 0.5 * jnp.mean(jnp.sum((jnp.tanh(X @ W1 + b1) @ W2 + b2 - Y) ** 2, axis=1))

    H = np.asarray(jax.jit(jax.vmap(lambda v: hvp(loss, w, v)))(jnp.eye(w.shape[0])))
    return loss, w, 0.5 * (H + H.T)


def test_hvp_matches_dense_hessian(mlp):
    loss, w, H = mlp
    v = jnp.asarray(np.random.default_rng(6).normal(size=w.shape[0]))
    hv = jax.jit(hvp, static_argnums=0)(loss, w, v)
    np.testing.assert_allclose(hv, H @ np.asarray(v), rtol=1e-10, atol=1e-12)


def test_mlp_hessian_top_eigenpairs(mlp):
    loss, w, H = mlp
    n = w.shape[0]
    p = jnp.asarray(np.random.default_rng(7).uniform(0.5, 2.0, n))  # diagonal P⁻¹
    op = sym_eff_hessian_matvec(loss, w, p)
    sp = np.sqrt(np.asarray(p))
    S = sp[:, None] * H * sp[None, :]
    state = top_eigenpairs(op, n, 3)
    assert_matches_dense(state, S, 3, rtol=1e-9, align=1e-8)
    # eigenvectors of P⁻¹H are sqrt(p) ⊙ those of the symmetrised operator
    u = sp * np.asarray(state.vecs[:, 0])
    np.testing.assert_allclose(np.asarray(p) * (H @ u), state.vals[0] * u, atol=1e-8)
    # scalar p
    v = jnp.asarray(np.random.default_rng(8).normal(size=n))
    Sv = jax.jit(lambda op, v: op(v))(sym_eff_hessian_matvec(loss, w, 0.5), v)
    np.testing.assert_allclose(Sv, 0.5 * (H @ np.asarray(v)), rtol=1e-10, atol=1e-12)


# --- track_top ---------------------------------------------------------------


def test_track_top_grows_until_below_fraction():
    top = [5.0, 4.5, 4.0, 3.0, 2.0]  # 5 eigenvalues above frac·threshold = 1
    M = random_symmetric(top, bulk=(-2.0, 0.8), seed=8)
    state = track_top(op_of(M), N, None, threshold=2.0, frac=0.5)  # k: 1 → 3 → 5 → 7
    vals = np.asarray(state.vals)
    k = vals.shape[0]
    assert k > len(top)
    assert vals[-1] <= 1.0
    assert_matches_dense(state, M, k)
    # restarting from the result keeps k
    again = track_top(op_of(M), N, state, threshold=2.0, frac=0.5)
    assert again.vals.shape == (k,)
    np.testing.assert_allclose(again.vals, state.vals, rtol=1e-12)


def test_track_top_shrinks_when_many_below():
    M = random_symmetric([6.0, 5.0], bulk=(-2.0, 0.8), seed=9)
    prev = top_eigenpairs(op_of(M), N, 7)
    state = track_top(op_of(M), N, prev, threshold=2.0, frac=0.5)
    assert state.vals.shape == (4,)  # 2 above + 2 kept below
    assert_matches_dense(state, M, 4)


def test_track_top_warns_at_k_max():
    M = random_symmetric([9.0, 8.0, 7.0, 6.0, 5.0], bulk=(-1.0, 0.5), seed=10)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        state = track_top(op_of(M), N, None, threshold=2.0, k_max=3)
    assert state.vals.shape == (3,)
    assert any("k_max" in str(r.message) for r in rec)


# --- refresh (the central flow's warm update) ----------------------------------


def _block(M):
    Mj = jnp.asarray(M)
    return lambda Z: Mj @ Z  # (n, b) -> (n, b)


def test_refresh_from_a_warm_start_matches_dense():
    M = random_symmetric([10.0, 9.0, 7.0, 6.0, 5.0], seed=11)
    ev, V = np.linalg.eigh(M)
    V0 = jnp.asarray(V[:, ::-1][:, :4])  # exact top-4 of M
    E = np.random.default_rng(12).normal(size=(N, N)) * 1e-3
    M1 = M + E + E.T
    r = jax.jit(lambda V0: refresh(_block(M1), V0, 3, tol=1e-8))(V0)
    assert bool(r.converged) and float(r.residual) <= 1e-8
    assert_matches_dense(EigState(r.vals[:3], r.vecs[:, :3]), M1, 3, rtol=1e-12, align=1e-12)
    np.testing.assert_allclose(r.images, M1 @ np.asarray(r.vecs), rtol=1e-12, atol=1e-12)
    assert int(r.matvecs) == 4 * (int(r.iterations) + 1)
    # already converged: one block product and a Rayleigh–Ritz step, no iteration
    again = refresh(_block(M1), r.vecs, 3, tol=1e-8)
    assert int(again.iterations) == 0 and int(again.matvecs) == 4
    np.testing.assert_allclose(again.vals[:3], r.vals[:3], rtol=1e-13)


def test_refresh_loose_tolerance_below_level():
    """Wanted columns below ``level`` converge to ``loose`` only; those above to ``tol``."""
    M = random_symmetric([10.0, 9.5, 6.0, 5.9, 5.8], seed=13)
    V0 = jnp.asarray(np.random.default_rng(14).normal(size=(N, 4)))
    tight = refresh(_block(M), V0, 3, tol=1e-9)
    mixed = refresh(_block(M), V0, 3, tol=1e-9, loose=1e-3, level=8.0)
    assert bool(mixed.converged) and int(mixed.iterations) < int(tight.iterations)
    ev = np.linalg.eigvalsh(M)[::-1]
    np.testing.assert_allclose(mixed.vals[:2], ev[:2], rtol=1e-12)  # above the level: tight
    R = np.asarray(mixed.images - mixed.vecs * mixed.vals)
    assert np.linalg.norm(R[:, 2]) <= 1e-3 * float(mixed.vals[0])


def test_refresh_dense_path_for_tiny_problems():
    M = random_symmetric([3.0, 2.0], n=10, bulk=(-1.0, 1.0), seed=15)
    r = refresh(_block(M), jnp.zeros((10, 3)), 2, tol=1e-8)  # n < 4m: eigh of A·I
    assert int(r.matvecs) == 10 and int(r.iterations) == 0
    assert_matches_dense(EigState(r.vals[:2], r.vecs[:, :2]), M, 2)
