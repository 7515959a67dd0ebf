"""The stationary flow (issue 9, part 1) and the asymptotic SDP bound (part 2), on small problems.

* the exact stationary flow (Newton on the SDP's KKT system along the way) against a
  brute-force reference: the slow state and Σ relaxed to convergence with ``w̄`` frozen
  at every Euler substep, then a step of ``−P*⁻¹[∇L + ½∇⟨H,Σ*⟩]``;
* the implicit ``∇ tr P*`` against central finite differences of ``tr P*(w)``
  recomputed to a tight KKT residual;
* the asymptotic SDP bound (bias-corrected RMSProp, ε outside the root) where it is
  attained: early in the run, when ``1 − β₂ᵗ`` is far from 1.

The problem is the 20-parameter quadratic of the zoo (its quartic term makes the
Hessian vary, so ``∇⟨H,Σ*⟩ ≠ 0``), at the edge of stability of RMSProp with
``β₂ = 0.5``: the stationary flow does not depend on ``β₂`` (``ν* = E[g]² + Var[g]``),
and ``β₂ = 0.5`` relaxes in a few units, which keeps the reference fast.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.problems import quadratic
from flowgen.runtime.explain import sdp_bound
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter
from flowgen.runtime.stationary import (
    dead_coordinates,
    kkt_polish,
    relax,
    stationary_form,
    stationary_sdp,
    trace_gradient,
)
from flowgen.runtime.stationary_flow import StationaryConfig, StationaryFlow


def load_opt(name, **hyper):
    return flowgen.load(ROOT / "optimizers" / f"{name}.opt").optimizer(**hyper)


@pytest.fixture(scope="module")
def quad():
    return quadratic(n=20)


@pytest.fixture(scope="module")
def eos(quad):
    """RMSProp (lr 3e-3, β₂ 0.5) on the quadratic, run to its edge of stability."""
    opt = load_opt("rmsprop", lr=3e-3, beta2=0.5)
    disc = DiscreteProcess(opt, quad, quad.w0)
    meter = SharpnessMeter(opt, quad)
    for _ in range(50):
        disc.advance(10)
        if meter(disc.w, disc.state, disc.t + 1) >= opt.threshold:
            break
    else:
        pytest.fail("RMSProp never reached the edge of stability on the quadratic")
    return opt, disc.w, disc.state, disc.t


def reference_flow(opt, problem, w, state, t, steps, substeps, relax_substeps):
    """The brute force: relax to convergence at every substep, then an Euler step.

    The relaxation integrates the central flow's rates with ``w̄`` frozen by Euler with
    ``relax_substeps`` per unit; its fixed point carries an O(dt²) bias in Σ* (measured
    on this problem: rate error 2.1e-3 at 4 substeps, 1.1e-4 at 16, 6.8e-6 at 64)."""
    dt = 1.0 / substeps
    w = jnp.asarray(w)
    rels = []
    for j in range(steps * substeps):
        rel = relax(
            opt, problem, w, state, t + j * dt, tol=1e-9, max_units=2000,
            substeps=relax_substeps, eig_tol=1e-7,
        )  # fmt: skip
        assert rel.converged
        rels.append(rel)
        w = w - dt * jnp.asarray(rel.p * rel.Eg)  # −P*⁻¹ [∇L + ½∇⟨H,Σ*⟩]
        state = {k: jnp.asarray(v) for k, v in rel.states.items()}
    return np.asarray(w), rels


@pytest.mark.slow
def test_exact_stationary_flow_matches_relaxation_reference(quad, eos):
    """~2 min: the reference relaxes with 16 Euler substeps per unit at every point."""
    opt, w0, s0, t0 = eos
    steps, S = 1, 2
    flow = StationaryFlow(opt, quad, w0, s0, t0, StationaryConfig(form="exact", substeps=S))
    assert flow.method == "kkt"
    P0 = flow.point().P  # P* at the start (cached: the flow's first substep uses it)
    chunk = flow.advance(steps)
    w_flow = np.asarray(chunk.w[-1])
    w_ref, rels = reference_flow(opt, quad, w0, s0, t0, steps, S, relax_substeps=16)
    moved = np.linalg.norm(w_ref - np.asarray(w0))
    err = np.linalg.norm(w_flow - w_ref) / moved
    # P* and Σ* matter: the stable flow's preconditioner (ν = ∇L², Σ = 0) goes elsewhere
    p_stable = np.asarray(opt.effective_step(w0, {"v": jax.grad(quad.loss)(w0) ** 2}, 1.0))
    w_stable = np.asarray(w0) - steps * p_stable * np.asarray(jax.grad(quad.loss)(w0))
    gap = np.linalg.norm(w_stable - w_ref) / moved
    print(f"binding {chunk.series['n_crit']}, rel err {err:.3g}, stable preconditioner {gap:.3g}")
    assert chunk.series["n_crit"].min() >= 1 and rels[0].X.shape[0] >= 1
    assert np.allclose(chunk.series["sharpness"], opt.threshold, rtol=1e-6)
    assert err < 5e-4
    assert gap > 100 * err
    assert np.max(np.abs(P0 - rels[0].P) / rels[0].P) < 1e-3


def test_stationary_flow_kkt_matches_sdp_every_substep(quad, eos):
    """Newton on the KKT system along the flow against the SDP (cvxpy) solved afresh at
    every substep: two independent computations of P* and ½∇⟨H,Σ*⟩ along 2 steps."""
    opt, w0, s0, t0 = eos
    out = {}
    for method in ("kkt", "sdp"):
        cfg = StationaryConfig(form="exact", method=method, substeps=2, sdp_tol=1e-9)
        flow = StationaryFlow(opt, quad, w0, s0, t0, cfg)
        out[method] = flow.advance(2)
    a, b = out["kkt"], out["sdp"]
    moved = np.linalg.norm(np.asarray(a.w[-1]) - np.asarray(w0))
    err = np.linalg.norm(np.asarray(a.w[-1]) - np.asarray(b.w[-1])) / moved
    print(f"kkt vs sdp: rel err {err:.3g}, binding {a.series['n_crit']}")
    assert a.series["n_crit"].min() >= 1
    assert err < 1e-6
    assert np.max(np.abs(a.P[-1] - b.P[-1]) / b.P[-1]) < 1e-6
    assert np.allclose(a.series["penalty_norm"], b.series["penalty_norm"], rtol=1e-4)
    assert np.all(a.series["penalty_norm"] > 0)


def test_trace_gradient_matches_finite_differences(quad, eos):
    opt, w0, s0, t0 = eos
    flow = StationaryFlow(opt, quad, w0, s0, t0, StationaryConfig(form="simplified"))
    flow.point()
    kp, form = flow._kkt, flow.form
    assert kp.k >= 1
    live = ~dead_coordinates(quad.loss, jnp.asarray(w0))
    gt, _ = trace_gradient(quad.loss, w0, form, kp)

    def trace_at(w):
        k = kkt_polish(quad.loss, w, form, kp.P, kp.V, live, tol=1e-13, max_iter=30)
        assert k.k == kp.k  # the same binding directions on both sides
        return float(np.sum(k.P[live]))

    rng = np.random.default_rng(0)
    h = 1e-5
    for _ in range(3):
        d = rng.standard_normal(w0.shape[0])
        d /= np.linalg.norm(d)
        fd = (trace_at(w0 + h * d) - trace_at(w0 - h * d)) / (2 * h)
        print(f"directional: implicit {gt @ d:.10g}, central differences {fd:.10g}")
        assert abs(gt @ d - fd) <= 1e-5 * np.linalg.norm(gt)
    # and the gradient is not trivially small
    assert np.linalg.norm(gt) > 1e-3 * np.sum(kp.P)


@pytest.mark.slow  # ~45-90 s of a fast-suite worker; CI runs it with the slow suite
def test_asymptotic_sdp_bound_is_attained_early(quad):
    """Bias-corrected RMSProp, ε outside the root, at step 3 with β₂ = 0.7: the bias
    correction 1/√(1 − 0.7⁴) ≈ 1.15 is far from 1, so the SDP of the limit form and the
    optimizer's own stationary point differ, by the bound where the constraint is free."""
    opt = load_opt("rmsprop_debiased_eps_outside", lr=3e-3, beta2=0.7)
    form, why = stationary_form(opt)
    assert form is not None and form.kind == "asymptotic", why
    disc = DiscreteProcess(opt, quad, quad.w0)
    disc.advance(3)
    t = disc.t
    rel = relax(opt, quad, disc.w, disc.state, t, tol=1e-8, max_units=3000, substeps=2)
    assert rel.converged
    sdp = stationary_sdp(
        quad.loss, disc.w, form.lr, eps=form.eps, threshold=opt.threshold, alpha=form.alpha,
        const=form.const, tol=1e-9,
    )  # fmt: skip
    live = ~sdp.dead
    b = sdp_bound(form, rel, sdp, live, t=t + 1)
    print(b)
    assert b["holds"]
    assert b["bound_max"] > 0.1  # far from the limit: a real test of the bound
    assert b["measured_max_rel_err"] >= 0.5 * b["bound_max"]  # tight
    if b["n_free"]:
        assert b["free_max_abs_err_minus_bound"] < 1e-4


def test_active_set_failure_falls_back_to_the_sdp():
    """RMSProp (lr 1e-3, β₂ 0.9) on the 8-parameter quadratic after 600 steps: adding
    binding directions one by one from the start did not settle (λ_max(P⁻¹H) = 2.30 > 2
    after four additions, which used to stop the flow); the SDP solved afresh does."""
    prob = quadratic(n=8)
    opt = load_opt("rmsprop", lr=1e-3, beta2=0.9)
    disc = DiscreteProcess(opt, prob, prob.w0)
    disc.advance(600)
    flow = StationaryFlow(opt, prob, disc.w, disc.state, disc.t, StationaryConfig())
    chunk = flow.advance(2)
    assert chunk.series["n_crit"].min() >= 1
    assert np.allclose(chunk.series["sharpness"], opt.threshold, rtol=1e-6)
    assert flow.stats["sdp"] >= 2  # the cold start and the fallback
