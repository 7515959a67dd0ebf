"""The stable flow when it is stiff: gradient flow far past the edge of stability.

The problem (tests/rnn_recall.py, 404 parameters) sharpens under gradient flow
to ``lr·λ_max(H) ≈ 370`` at ``lr = 0.1``, 180 × GD's threshold 2, while GD
itself sits at the edge of stability. Explicit Tsit5 would need ~100 steps per
unit of time there; the stable flow switches to the Rosenbrock–Krylov solver.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.errors import SimulationError
from flowgen.problems import Problem, get_problem
from flowgen.runtime.integrators import RA34PW2, _extend, gmres
from flowgen.runtime.processes import DiscreteProcess
from flowgen.runtime.stable import DiffraxStableFlow, StableFlow

RNN = f"{ROOT / 'tests' / 'rnn_recall.py'}:make_problem"
LR = 0.1
CHUNK = 50


_HESSIANS: dict = {}


def sharpness(problem, w) -> float:
    """``λ_max(H)`` by a dense eigensolve (404 parameters)."""
    if problem not in _HESSIANS:
        _HESSIANS[problem] = jax.jit(jax.hessian(problem.loss))
    return float(np.linalg.eigvalsh(np.asarray(_HESSIANS[problem](w)))[-1])


@pytest.fixture(scope="module")
def rnn():
    return flowgen.load(ROOT / "optimizers" / "gd.opt").optimizer(lr=LR), get_problem(RNN)


@pytest.fixture(scope="module")
def flow(rnn):
    """The stable flow from the initialisation to τ = 300, in chunks of 50, with
    snapshots at τ = 100 and 250."""
    opt, prob = rnn
    sf = StableFlow(opt, prob, prob.w0)
    ws, snaps = [], {}
    while sf.t < 300:
        ws.append(np.asarray(sf.advance(CHUNK).w))
        if sf.t in (100, 250):
            snaps[sf.t] = sf.snapshot()
    return sf, np.concatenate(ws), snaps  # ws: (300, n) at τ = 1..300


def test_stiff_flow_sharpens_far_past_the_edge_and_switches_solver(rnn, flow):
    opt, prob = rnn
    sf, ws, _ = flow
    # the discrete run reaches the edge of stability and hovers there ...
    disc = DiscreteProcess(opt, prob, prob.w0).advance(300)
    eff = [LR * sharpness(prob, disc.w[k]) for k in range(199, 300, 20)]
    assert 1.5 < np.median(eff) < 5.0, eff
    # ... while its stable flow sharpens to more than 100 x the threshold
    assert LR * sharpness(prob, jnp.asarray(ws[-1])) > 100 * opt.threshold
    st = sf.stats
    assert [m for _, m in st["switches"]] == ["implicit"]
    assert 60 < st["switches"][0][0] < 150
    assert sf.solver_name == "implicit" and st["steps_implicit"] > 0
    # the implicit phase costs tens of gradients per unit of time, not hundreds
    units = 300 - st["switches"][0][0]
    assert (st["jvps"] + st["f_evals"]) / units < 60


def test_stiff_flow_matches_a_fine_reference(rnn, flow):
    """From τ = 250 (lr·λ_max ≈ 320) for 10 units against Tsit5 at rtol 1e-10 (about
    a hundred steps per unit, stability-limited). Tolerance: 5e-4 of the distance
    travelled in the window itself, 1e-5 of the distance travelled since τ = 0 (the
    validation compares flows at the 1e-2 scale of the latter). Measured: 4.5e-5 and
    1.5e-6."""
    opt, prob = rnn
    _, ws, _ = flow
    w250, window = jnp.asarray(ws[249]), ws[250:260]  # samples at τ = 251..260
    ref = DiffraxStableFlow(opt, prob, w250, t0=250, rtol=1e-10, atol=1e-12, max_steps=10**6)
    wr = np.asarray(ref.advance(10).w)
    travelled_window = np.linalg.norm(wr[-1] - ws[249])
    travelled_total = np.linalg.norm(wr[-1] - np.asarray(prob.w0))
    err = np.linalg.norm(window - wr, axis=1).max()
    assert err < 5e-4 * travelled_window
    assert err < 1e-5 * travelled_total
    # and the reference needed far more gradients for it
    assert ref.n_steps * 6 / 10 > 300


def test_snapshot_restore_continues_exactly(rnn, flow, tmp_path):
    """advance(50) == advance(25); snapshot; restore into a fresh object; advance(25),
    across the switch to the implicit solver (τ ≈ 108) and through an .npz file."""
    opt, prob = rnn
    _, _, snaps = flow

    def fresh():
        sf = StableFlow(opt, prob, prob.w0)
        sf.restore(snaps[100])
        return sf

    a = fresh().advance(50)
    b = fresh()
    b.advance(25)
    path = tmp_path / "snap.npz"
    np.savez(path, **b.snapshot())
    c = StableFlow(opt, prob, prob.w0)
    with np.load(path, allow_pickle=False) as z:
        c.restore(dict(z))
    cc = c.advance(25)
    scale = np.linalg.norm(np.asarray(a.w[-1]))
    assert np.abs(np.asarray(a.w[25:]) - np.asarray(cc.w)).max() <= 1e-10 * scale
    assert c.t == 150 and c.solver_name == "implicit"
    assert [m for _, m in c.stats["switches"]] == ["implicit"]


def test_nonstiff_flow_stays_explicit_and_agrees_with_the_old_solver():
    prob = get_problem("quadratic")
    opt = flowgen.load(ROOT / "optimizers" / "rmsprop.opt").optimizer(lr=3e-3, beta2=0.99)
    d = DiscreteProcess(opt, prob, prob.w0)
    d.advance(30)  # v has settled (from step 1 the flow is briefly stiff: v ≈ g²/100)
    new = StableFlow(opt, prob, d.w, d.state, 30)
    old = DiffraxStableFlow(opt, prob, d.w, d.state, 30)
    wn, wo = np.asarray(new.advance(60).w), np.asarray(old.advance(60).w)
    st = new.stats
    assert st["steps_implicit"] == 0 and st["switches"] == []
    travelled = np.linalg.norm(wo[-1] - np.asarray(d.w))
    assert np.linalg.norm(wn - wo, axis=1).max() < 1e-5 * travelled
    assert np.allclose(np.asarray(new.state["v"]), np.asarray(old.state["v"]), rtol=1e-4)


def _rosenbrock_step(f, dfdy, dfdt, t, y, h):
    """One RA34PW2 step of a scalar ODE with exact linear solves (transformed variables)."""
    tab, g = RA34PW2, RA34PW2.gamma * h
    us = []
    for i in range(4):
        yi = y + sum(tab.a[i, j] * us[j] for j in range(i))
        rhs = f(t + tab.alpha[i] * h, yi) + sum(tab.c[i, j] / h * us[j] for j in range(i))
        rhs += tab.gamma_sum[i] * h * dfdt(t, y)
        us.append(g * rhs / (1.0 - g * dfdy(t, y)))
    us = np.array(us)
    return y + tab.m @ us, abs(tab.m_err @ us)


def test_ra34pw2_is_third_order_l_stable_with_a_local_error_estimate():
    """y' = −2 (y − cos τ) − sin τ + y²/10 (nonlinear, time-dependent): global error
    O(h³), the embedded estimate O(h³) locally; and y' = λy with hλ = −10⁶ is damped
    to zero in one step (L-stable)."""

    def f(t, y):
        return -2.0 * (y - np.cos(t)) - np.sin(t) + 0.1 * y**2

    def solve(h, T=2.0):
        y, t, est = 1.5, 0.0, None
        for _ in range(int(round(T / h))):
            y, e = _rosenbrock_step(
                f, lambda t, y: -2.0 + 0.2 * y, lambda t, y: -2.0 * np.sin(t) - np.cos(t), t, y, h
            )
            est = e if est is None else est
            t += h
        return y, est

    ref, _ = solve(1e-3)
    hs = [0.2, 0.1, 0.05, 0.025]
    out = [solve(h) for h in hs]
    glob = np.array([abs(y - ref) for y, _ in out])
    est = np.array([e for _, e in out])
    assert np.log2(glob[:-1] / glob[1:]) == pytest.approx(3.0, abs=0.25)
    assert np.log2(est[:-1] / est[1:]) == pytest.approx(3.0, abs=0.35)
    lam = -1e6
    y1, _ = _rosenbrock_step(
        lambda t, y: lam * y, lambda t, y: lam, lambda t, y: 0.0, 0.0, 1.0, 1.0
    )
    assert abs(y1) < 1e-5


def test_gmres_shares_its_space_between_right_hand_sides():
    rng = np.random.default_rng(0)
    n = 60
    Q = np.linalg.qr(rng.standard_normal((n, 8)))[0]  # (n, 8) stiff directions
    M = np.eye(n) + Q @ np.diag(np.logspace(1, 3, 8)) @ Q.T + 0.02 * rng.standard_normal((n, n))
    A = jnp.asarray(M)
    mv = lambda v: A @ v  # noqa: E731
    solve = jax.jit(lambda b, tol, P, C: gmres(mv, b, tol, 40, P, C))
    P = C = jnp.zeros((40, n))
    b1 = jnp.asarray(rng.standard_normal(n))
    x1, j1, ok1, V, H = solve(b1, 1e-10, P, C)
    assert bool(ok1) and np.allclose(M @ np.asarray(x1), np.asarray(b1), atol=1e-9)
    P, C, q = jax.jit(_extend)(P, C, 0, V, H, j1)
    assert int(q) == int(j1)
    assert np.allclose(np.asarray(C @ C.T)[: int(q), : int(q)], np.eye(int(q)), atol=1e-10)
    assert np.allclose(np.asarray(A @ P[: int(q)].T), np.asarray(C[: int(q)].T), atol=1e-8)
    # a right-hand side in the explored space needs no new product
    b2 = A @ (P[0] + 2 * P[3])
    x2, j2, ok2, _, _ = solve(b2, 1e-8, P, C)
    assert int(j2) == 0 and bool(ok2)
    assert np.allclose(np.asarray(x2), np.asarray(P[0] + 2 * P[3]), atol=1e-8)


@pytest.mark.slow
def test_stiff_flow_whole_horizon_matches_a_fine_reference(rnn, flow):
    """τ = 0..300 against Tsit5 at rtol 1e-10 (about 10⁵ steps): the error stays below
    1e-4 of the distance travelled."""
    opt, prob = rnn
    _, ws, _ = flow
    ref = DiffraxStableFlow(opt, prob, prob.w0, rtol=1e-10, atol=1e-12, max_steps=10**7)
    wr = np.concatenate([np.asarray(ref.advance(CHUNK).w) for _ in range(300 // CHUNK)])
    travelled = np.linalg.norm(wr - np.asarray(prob.w0), axis=1)
    assert (np.linalg.norm(ws - wr, axis=1) / travelled).max() < 1e-4


def test_a_diverging_flow_stops_with_a_message():
    """Gradient flow of L = −Σ w⁴ from w = 1: w' = 0.4 w³ blows up at τ = 1.25."""
    prob = Problem(name="blow-up", loss=lambda w: -jnp.sum(w**4), w0=jnp.ones(3))
    opt = flowgen.load(ROOT / "optimizers" / "gd.opt").optimizer(lr=0.1)
    sf = StableFlow(opt, prob, prob.w0, max_steps=20_000)
    with pytest.raises(SimulationError) as ei:
        sf.advance(5)
    msg = ei.value.message
    assert msg.startswith("stable flow: ") and "between t=0 and t=5" in msg
    assert any(k in msg for k in ("NaN or infinite", "step size collapsed", "max_steps"))
    assert 1.0 < float(sf.integrator.state.t) < 1.26
