"""flowgen.runtime.derivatives against central finite differences of HVPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from flowgen.runtime.derivatives import hess_times, third_contractions
from flowgen.runtime.eigen import hvp

EPS = 1e-4  # central differences: truncation O(EPS²), round-off O(1e-16 / EPS)


def mlp_problem():
    """tanh MLP 3→5→2, 10 examples, MSE (n = 32)."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(10, 3)))
    Y = jnp.asarray(rng.normal(size=(10, 2)))
    params = [
        (jnp.asarray(rng.normal(size=(3, 5))), jnp.asarray(rng.normal(size=5) * 0.1)),
        (jnp.asarray(rng.normal(size=(5, 2))), jnp.asarray(rng.normal(size=2) * 0.1)),
    ]
    w, unravel = ravel_pytree(params)

    def loss(w):
        (W1, b1), (W2, b2) = unravel(w)
        return 0.5 * jnp.mean(jnp.sum((jnp.tanh(X @ W1 + b1) @ W2 + b2 - Y) ** 2, axis=1))

    return loss, w


def quartic_problem():
    """L(w) = Σ c_i w_i⁴ + (a·w)⁴ + ½ wᵀMw (n = 7); third derivative is linear in w."""
    rng = np.random.default_rng(1)
    n = 7
    c, a = jnp.asarray(rng.uniform(0.5, 2.0, n)), jnp.asarray(rng.normal(size=n))
    M = rng.normal(size=(n, n))
    M = jnp.asarray(M @ M.T)

    def loss(w):
        return jnp.sum(c * w**4) + jnp.dot(a, w) ** 4 + 0.5 * w @ M @ w

    return loss, jnp.asarray(rng.normal(size=n))


PROBLEMS = {"mlp": mlp_problem, "quartic": quartic_problem}


hvp_jit = jax.jit(hvp, static_argnums=0)


def rel_err(x, ref):
    return float(np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref))


@pytest.fixture(params=sorted(PROBLEMS), scope="module")
def problem(request):
    loss, w = PROBLEMS[request.param]()
    U = jnp.asarray(np.random.default_rng(2).normal(size=(w.shape[0], 3)))
    return loss, w, U


def test_third_contractions_vs_finite_differences(problem):
    loss, w, U = problem
    n, k = U.shape
    G = np.asarray(third_contractions(loss, w, U))
    assert G.shape == (k, k, n)
    np.testing.assert_allclose(G, np.swapaxes(G, 0, 1), rtol=0, atol=1e-12)

    # FD[l, i, j] = (u_iᵀ H(w + ε e_l) u_j − u_iᵀ H(w − ε e_l) u_j) / 2ε
    HU = jax.jit(jax.vmap(lambda x: hess_times(loss, x, U)))  # (b, n) -> (b, n, k)
    E = EPS * jnp.eye(n)
    quad = lambda HUx: jnp.einsum("ni,bnj->bij", U, HUx)  # noqa: E731
    FD = (quad(HU(w + E)) - quad(HU(w - E))) / (2 * EPS)  # (n, k, k)
    FD = np.moveaxis(np.asarray(FD), 0, -1)  # (k, k, n)
    assert rel_err(G, FD) <= 1e-6
    for i in range(k):
        for j in range(k):
            assert rel_err(G[i, j], FD[i, j]) <= 1e-6, (i, j)


def test_hess_times_vs_finite_differences(problem):
    loss, w, U = problem
    HU = np.asarray(hess_times(loss, w, U))
    g = jax.jit(jax.vmap(jax.grad(loss)))
    fds = (g(w + EPS * U.T) - g(w - EPS * U.T)) / (2 * EPS)  # (k, n)
    for j in range(U.shape[1]):
        u, fd = U[:, j], fds[j]
        assert rel_err(HU[:, j], np.asarray(fd)) <= 1e-6
        np.testing.assert_allclose(HU[:, j], hvp_jit(loss, w, u), rtol=1e-12, atol=1e-14)
    H = np.asarray(jax.jit(jax.hessian(loss))(w))
    np.testing.assert_allclose(HU, H @ np.asarray(U), rtol=1e-10, atol=1e-12)


def test_jittable_and_curvature_penalty(problem):
    """Inside jit, and ½ Σ X_ij G_ij equals ½ ∇⟨H, U X Uᵀ⟩ (the curvature penalty)."""
    loss, w, U = problem
    k = U.shape[1]
    X = np.random.default_rng(3).normal(size=(k, k))
    X = jnp.asarray(X @ X.T)

    @jax.jit
    def penalty(w, U, X):
        return 0.5 * jnp.einsum("ij,ijn->n", X, third_contractions(loss, w, U))

    def direct(w):  # ⟨H(w), Σ⟩ = Σ_ij X_ij u_iᵀ H u_j
        return 0.5 * jnp.sum(X * (U.T @ hess_times(loss, w, U)))

    np.testing.assert_allclose(
        penalty(w, U, X), jax.jit(jax.grad(direct))(w), rtol=1e-10, atol=1e-12
    )
