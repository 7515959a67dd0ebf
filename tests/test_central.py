"""flowgen.runtime.central: the process interface (time convention, snapshots) and the
jitted analysis against independent computations."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.errors import SimulationError
from flowgen.problems import QUADRATIC_EOS_LR, get_problem
from flowgen.runtime.central import SERIES, CentralConfig, CentralFlow
from flowgen.runtime.processes import DiscreteProcess
from flowgen.runtime.sdcp import solve_sdcp

OPT = ROOT / "optimizers"
START = 300  # the discrete GD run on `quadratic` is at the edge of stability by then


@pytest.fixture(scope="module")
def at_eos():
    """GD (lr 0.01) on the quadratic, restarted at step 300: one critical direction."""
    prob = get_problem("quadratic")
    opt = flowgen.load(OPT / "gd.opt").optimizer(lr=QUADRATIC_EOS_LR)
    d = DiscreteProcess(opt, prob, prob.w0)
    d.advance(START)
    return opt, prob, d.w, d.state


def flow(at_eos, **cfg) -> CentralFlow:
    opt, prob, w, s = at_eos
    return CentralFlow(opt, prob, w, s, START, CentralConfig(**cfg))


def assert_same_chunk(a, b, rtol=1e-12):
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_allclose(np.asarray(a.w), np.asarray(b.w), rtol=rtol, atol=0)
    for name in SERIES:
        np.testing.assert_allclose(a.series[name], b.series[name], rtol=rtol, atol=0)
    for x, y in zip(a.X, b.X, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-300)


def test_records_at_t_plus_one_to_t_plus_k(at_eos):
    cf = flow(at_eos)
    start = cf.observe()
    assert list(start.steps) == [START]
    ch = cf.advance(5)
    assert list(ch.steps) == list(range(START + 1, START + 6))
    assert ch.w.shape == (5, cf.n) and ch.q1.shape == (5, cf.n) and ch.p.shape == (5, cf.n)
    assert all(ch.series[name].shape == (5,) for name in SERIES)
    assert len(ch.X) == 5
    assert ch.series["n_crit"].max() >= 1, "the restart should be at the edge of stability"
    # the record at t+K is the value at the current time
    now = cf.observe()
    assert list(now.steps) == [START + 5]
    np.testing.assert_array_equal(np.asarray(now.w[0]), np.asarray(ch.w[-1]))
    np.testing.assert_array_equal(np.asarray(now.w[0]), np.asarray(cf.w))
    for name in SERIES:
        np.testing.assert_array_equal(now.series[name][0], ch.series[name][-1])
    for name, v in cf.state.items():  # the state at t+K goes with w̄ there
        np.testing.assert_array_equal(np.asarray(ch.states[name][-1]), np.asarray(v))


def test_snapshot_restore_is_exact(at_eos, tmp_path):
    ref = flow(at_eos)
    whole = ref.advance(50)

    first = flow(at_eos)
    a = first.advance(25)
    snap = first.snapshot()
    assert all(isinstance(v, np.ndarray) for v in snap.values())
    np.savez(tmp_path / "snap.npz", **snap)  # a flat dict of arrays: no pickles
    loaded = dict(np.load(tmp_path / "snap.npz", allow_pickle=False))
    second = flow(at_eos)
    second.restore(loaded)
    assert second.t == START + 25
    b = second.advance(25)

    assert_same_chunk(whole, _concat(a, b))
    np.testing.assert_allclose(np.asarray(second.w), np.asarray(ref.w), rtol=1e-12, atol=0)
    assert second.counters["substeps"] == ref.counters["substeps"]
    assert second.counters["hvps"] == ref.counters["hvps"]


def _concat(a, b):
    from flowgen.runtime.central import CentralChunk

    return CentralChunk(
        steps=np.concatenate([a.steps, b.steps]),
        w=jnp.concatenate([a.w, b.w]),
        states=jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y]), a.states, b.states),
        series={k: np.concatenate([a.series[k], b.series[k]]) for k in a.series},
        q1=np.concatenate([a.q1, b.q1]),
        p=np.concatenate([a.p, b.p]),
        X=a.X + b.X,
    )


def test_substeps_and_advance_agree(at_eos):
    """advance(K) (the jitted loop) equals K·S single substeps."""
    one = flow(at_eos, substeps=2)
    ch = one.advance(3)
    other = flow(at_eos, substeps=2)
    for _ in range(6):
        other.substep()
    np.testing.assert_allclose(np.asarray(other.w), np.asarray(ch.w[-1]), rtol=1e-12, atol=0)
    assert other.counters["substeps"] == one.counters["substeps"] == 6


def test_jitted_k1_closed_form_matches_python_sdcp_and_staged_path(at_eos):
    """At a point with one critical direction, the fused jitted analysis gives the X of
    sdcp.solve_sdcp on its own A₀, B, and the same A₀, B, X as the stages run as
    separate jitted calls (the profiled path)."""
    fused = flow(at_eos, substeps=2)
    fused.advance(3)
    snap = fused.snapshot()
    a = fused._analysis()
    assert a.k == 1
    X_py = solve_sdcp(np.asarray(a.A0), np.asarray(a.B)).X
    np.testing.assert_allclose(np.asarray(a.X), X_py, rtol=1e-10, atol=0)
    assert X_py[0, 0] > 0, "the critical direction should carry a covariance here"

    staged = flow(at_eos, substeps=2, profile=True)
    staged.restore(snap)
    staged._a = None  # recompute the analysis of the same point with the staged path
    staged._V = jnp.asarray(snap["analysis.vecs"])
    b = staged._analysis()
    np.testing.assert_allclose(np.asarray(b.vals[:1]), np.asarray(a.vals[:1]), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(b.A0), np.asarray(a.A0), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(b.B), np.asarray(a.B), rtol=1e-8)
    np.testing.assert_allclose(np.asarray(b.X), np.asarray(a.X), rtol=1e-8)
    # one more substep each: the same point
    fused.substep()
    staged.substep()
    np.testing.assert_allclose(np.asarray(staged.w), np.asarray(fused.w), rtol=1e-10)


def test_linearised_constraint_against_finite_differences(at_eos):
    """B = ∂F/∂X from forward mode equals central differences of the constraint F(X) at
    the end of a substep, computed from the generated drift directly."""
    cf = flow(at_eos, substeps=2)
    cf.advance(2)
    a = cf._analysis()
    opt, c, dt = cf.opt, cf.c, cf.dt
    t = cf._kern.t_rate(cf._unit, cf._sub, cf.S, cf.t0)
    Q, lam = a.vecs[:, :1], a.vals[:1]

    def F(x):
        X = jnp.array([[x]])
        Eg = a.g0 + 0.5 * jnp.einsum("ij,ijn->n", X, a.G)
        Vg = jnp.sum((a.HU @ X) * a.HU, axis=1)
        _, ds = opt.drift(cf.w, cf.state, Eg, Vg, t)
        s1 = jax.tree_util.tree_map(lambda u, v: u + dt * v, cf.state, ds)
        dw, _ = opt.drift(cf.w, s1, Eg, Vg, t)
        w1 = cf.w + dt * dw
        p1 = jnp.broadcast_to(opt.effective_step(w1, s1, t + dt), w1.shape)
        F = c * (Q.T * (a.p / p1)) @ Q - jnp.diag(lam) - a.G @ (w1 - cf.w)
        return float(F[0, 0])

    h = 1e-4 * max(abs(float(a.X[0, 0])), 1e-6)
    fd = (F(h) - F(-h)) / (2 * h)
    np.testing.assert_allclose(float(a.A0[0, 0]), F(0.0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(float(a.B[0, 0]), fd, rtol=1e-6)


def test_counters_and_tracking(at_eos):
    cf = flow(at_eos, substeps=2)
    ch = cf.advance(10)
    cnt = cf.counters
    assert cnt["units"] == 10 and cnt["substeps"] == 20
    assert cnt["analyses"] >= 21  # the start, then one per substep
    assert cnt["contractions"] >= int(ch.series["n_crit"].sum())
    m = cf.eig.vecs.shape[1]
    assert cnt["hvps"] >= m * cnt["analyses"] - m  # one block product per analysis at least
    # the critical eigenvalue is pinned at the threshold
    np.testing.assert_allclose(ch.series["sharpness"][-5:], cf.c, rtol=1e-3)


def test_point_is_the_analysis_substep_starts_from(at_eos):
    """``point()`` reads the current analysis without stepping; ``substep()`` returns the
    same and then moves."""
    cf = flow(at_eos)
    L0, rec0, info0 = cf.point()
    L1, rec1, info1 = cf.point()  # cached, no step
    assert cf.t == START and L0 == L1 and info0["sharpness"] == info1["sharpness"]
    L2, rec2, info2 = cf.substep()
    assert L2 == L0 and rec2.n_crit == rec0.n_crit
    np.testing.assert_array_equal(np.asarray(info2["p"]), np.asarray(info0["p"]))
    np.testing.assert_array_equal(info2["X"], info0["X"])
    assert cf.t == START + cf.dt and cf.point()[0] != L0


def test_clear_caches_empties_compiled_code(at_eos):
    """Compiled kernels are cached per (optimizer, loss), the least recently used
    dropped beyond CACHE_SIZE; ``flowgen.clear_caches()`` empties every cache, and a flow
    built after it compiles again and gives the same values."""
    from flowgen.runtime import caches, central

    lru = caches.OwnedCache(size=2)
    a, b, c = object(), object(), object()
    lru.put(1, (a,), "A")
    lru.put(2, (b,), "B")
    assert lru.get(1, (a,)) == "A"  # 1 is now the most recent
    lru.put(3, (c,), "C")  # drops 2
    assert lru.get(2, (b,)) is None and lru.get(1, (a,)) == "A" and len(lru) == 2
    assert lru.get(1, (b,)) is None  # a key whose owner is another object misses
    n_live = len(caches._CACHES)
    caches.OwnedCache()  # a throwaway cache is not kept alive by the registry
    gc.collect()
    assert len(caches._CACHES) == n_live

    first = flow(at_eos).advance(2)
    assert 1 <= len(central._KERNELS) <= caches.CACHE_SIZE
    flowgen.clear_caches()
    assert len(central._KERNELS) == 0 and len(lru) == 0
    again = flow(at_eos).advance(2)
    np.testing.assert_allclose(np.asarray(again.w), np.asarray(first.w), rtol=1e-12)


def test_carried_contractions_are_the_rotated_ones():
    """G is multilinear in U: for U' = U R (same span) the fresh contractions equal the
    carried ones, G'_ab = Σ R_ia R_jb G_ij, which is what the substep without fresh
    contractions uses (``CentralConfig.third_every``)."""
    from flowgen.precision import float64
    from flowgen.runtime import derivatives

    with float64():
        prob = get_problem("digits-mlp", width=8)
        n = prob.w0.shape[0]
        U = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
        R, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (3, 3)))
        G = derivatives.third_contractions(prob.loss, prob.w0, U)
        fresh = derivatives.third_contractions(prob.loss, prob.w0, U @ R)
        carried = jnp.einsum("ia,jb,ijn->abn", R, R, G)
    assert float(jnp.abs(G).max()) > 0
    np.testing.assert_allclose(
        np.asarray(carried), np.asarray(fresh), rtol=0, atol=1e-12 * float(jnp.abs(G).max())
    )


@pytest.mark.slow
def test_third_every_halves_contractions_and_keeps_the_flow():
    """GD on the tanh MLP at its edge (G ≠ 0, unlike the quadratic's): with fresh
    contractions at every second substep the flow spends about half the contractions
    and stays within 1e-3 of the travelled distance of the every-substep flow."""
    from flowgen.precision import float64

    with float64():
        prob = get_problem("digits-mlp")  # at its edge from step 16 (README)
        opt = flowgen.load(OPT / "gd.opt").optimizer(lr=0.4)
        d = DiscreteProcess(opt, prob, prob.w0)
        d.advance(200)
        flows = {
            e: CentralFlow(opt, prob, d.w, d.state, 200, CentralConfig(third_every=e))
            for e in (1, 2)
        }
        chunks = {e: f.advance(30) for e, f in flows.items()}
    ks = chunks[1].series["n_crit"]
    assert ks.min() >= 1, "the restart should be at the edge of stability"
    c1, c2 = (flows[e].counters["contractions"] for e in (1, 2))
    assert c2 <= 0.6 * c1
    w0 = np.asarray(d.w)
    w1, w2 = (np.asarray(flows[e].w) for e in (1, 2))
    travelled = np.linalg.norm(w1 - w0)
    assert travelled > 0
    assert np.linalg.norm(w2 - w1) <= 1e-3 * travelled
    np.testing.assert_allclose(
        chunks[2].series["sharpness"], chunks[1].series["sharpness"], rtol=1e-3
    )


def test_step_control_rejects_overshoots_and_refines(at_eos, tmp_path):
    """A substep that pushes λ_max past max(c, λ before)·(1 + refine_tol) is rejected and
    the substeps per unit are doubled (up to max_substeps): time and records stay those
    of the unit grid, and a snapshot taken after a refinement restores exactly."""
    tight = dict(refine_tol=1e-13, max_substeps=8)  # any rise of λ above c is an overshoot
    ref = flow(at_eos, **tight)
    whole = ref.advance(12)
    assert list(whole.steps) == list(range(START + 1, START + 13))  # none lost or repeated
    assert ref.counters["refinements"] >= 1
    assert ref.S == 2 * 2 ** ref.counters["refinements"] <= 8
    assert ref.counters["substeps"] < 12 * ref.S  # the first units ran at the coarser step
    np.testing.assert_allclose(whole.series["sharpness"][-3:], ref.c, rtol=1e-6)

    # the default tolerance does not refine a flow that stays on its manifold
    plain = flow(at_eos)
    plain.advance(12)
    assert plain.counters["refinements"] == 0 and plain.S == 2
    # off: never
    off = flow(at_eos, refine_tol=0.0)
    off.advance(12)
    assert off.counters["refinements"] == 0 and off.S == 2

    first = flow(at_eos, **tight)
    a = first.advance(6)
    np.savez(tmp_path / "snap.npz", **first.snapshot())
    loaded = dict(np.load(tmp_path / "snap.npz", allow_pickle=False))
    second = flow(at_eos, **tight)
    second.restore(loaded)
    assert second.S == first.S
    assert_same_chunk(whole, _concat(a, second.advance(6)))
    # a snapshot whose substeps are no refinement of this flow's is refused
    with pytest.raises(SimulationError, match="substeps"):
        flow(at_eos, substeps=3).restore(loaded)


def test_step_control_coarsens_after_calm_units(at_eos, tmp_path):
    """After ``coarsen_after`` units without a rejection the substeps are halved again
    (never below the configured number); records stay on the unit grid and a snapshot
    taken after a coarsening restores exactly."""
    cfg = dict(refine_tol=1e-13, max_substeps=8, coarsen_after=2)
    ref = flow(at_eos, **cfg)
    whole = ref.advance(12)
    assert list(whole.steps) == list(range(START + 1, START + 13))
    assert ref.counters["refinements"] >= 1 and ref.counters["coarsenings"] >= 1
    assert 2 <= ref.S <= 8
    never = flow(at_eos, **{**cfg, "coarsen_after": 0})
    never.advance(12)
    assert never.counters["coarsenings"] == 0
    assert never.counters["substeps"] > ref.counters["substeps"]  # coarsening saves work

    first = flow(at_eos, **cfg)
    a = first.advance(7)
    snap = first.snapshot()
    second = flow(at_eos, **cfg)
    second.restore(snap)
    assert_same_chunk(whole, _concat(a, second.advance(5)))
    with pytest.raises(ValueError, match="coarsen_after"):
        flow(at_eos, coarsen_after=-1)


def test_refine_tol_on_the_command_line(capsys, monkeypatch, tmp_path):
    """`--refine-tol` (validate, explain, sweep) reaches the central flow's configuration;
    a negative or nan one is a usage error (exit 2, a message, no traceback). The report's
    fields are checked by tests/test_runtime.py's validate run."""
    import argparse

    import flowgen.runtime.explain
    import flowgen.runtime.sweep
    from flowgen.cli import _central_config, main

    base = [str(OPT / "gd.opt"), "--problem", "quadratic", "--steps", "40"]
    sweep = ["sweep", str(OPT / "gd.opt"), "--set", "lr=0.1", "--problem", "quadratic"]
    sweep += ["--steps", "20", "--flows", "discrete,central"]
    for argv in (["validate", *base], ["explain", *base], sweep):
        for bad in ("-1", "nan"):
            assert main([*argv, "--refine-tol", bad]) == 2
            err = capsys.readouterr().err
            assert "--refine-tol" in err and "Traceback" not in err

    class Seen(Exception):
        pass

    def seen(*args, **kwargs):
        raise Seen(args[3] if len(args) > 3 else args[2])  # the command's config

    for mod, name, argv in ((flowgen.runtime.explain, "explain", ["explain", *base]),
                            (flowgen.runtime.sweep, "sweep", sweep)):  # fmt: skip
        monkeypatch.setattr(mod, name, seen)
        with pytest.raises(Seen) as ei:
            main([*argv, "--refine-tol", "0.05", "--out", str(tmp_path / name)])
        assert ei.value.args[0].refine_tol == 0.05
        assert flowgen.runtime.central.CentralConfig.given(refine_tol=None).refine_tol == 0.02
    ns = argparse.Namespace(substeps=None, refine_tol=0.0)
    assert _central_config(ns).refine_tol == 0.0
    ns = argparse.Namespace(substeps=4, refine_tol=None)
    assert _central_config(ns) == CentralConfig(substeps=4)
