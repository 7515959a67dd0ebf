"""The stationary preconditioner (docs/mathematics.md §4): relaxation vs SDP, `flowgen explain`.

Fast tests use a small digits MLP (n=100 examples, width 8, constant pixels kept as
exact zeros: 628 parameters, 112 of them dead); the full-size agreement test on
digits-mlp (2948 parameters, the RMSProp central flow at the edge of stability) is
`@pytest.mark.slow`.
"""

import json

import jax
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.cli import main
from flowgen.problems import digits_mlp, quadratic
from flowgen.runtime.processes import DiscreteProcess, SharpnessMeter
from flowgen.runtime.stationary import (
    compare,
    dead_coordinates,
    relax,
    rmsprop_form,
    sigma_agreement,
    stationary_sdp,
)

RMSPROP = ROOT / "optimizers" / "rmsprop.opt"
SMALL = dict(n=100, width=8, keep_constant=True)


def load_opt(name, **hyper):
    return flowgen.load(ROOT / "optimizers" / f"{name}.opt").optimizer(**hyper)


@pytest.fixture(scope="module")
def small():
    return digits_mlp(**SMALL)


@pytest.fixture(scope="module")
def eos_point(small):
    """RMSProp (lr 1e-3, beta2 0.95) run until its effective sharpness reaches 2."""
    opt = load_opt("rmsprop", lr=1e-3, beta2=0.95)
    disc = DiscreteProcess(opt, small, small.w0)
    meter = SharpnessMeter(opt, small)
    for _ in range(100):
        disc.advance(10)
        if meter(disc.w, disc.state, disc.t + 1) >= opt.threshold:
            break
    else:
        pytest.fail("the discrete RMSProp run never reached the edge of stability")
    return opt, disc.w, disc.state, disc.t


# ----------------------------------------------------------------- the optimizer's form


def test_rmsprop_form_detection():
    """The derivation's classification (FlowSpec.stationary), read by the runtime."""
    form, why = rmsprop_form(load_opt("rmsprop", lr=3e-4, eps=1e-8))
    assert why == "" and form.state == "v" and form.kind == "exact"
    assert form.lr == pytest.approx(3e-4, rel=1e-12) and form.eps == pytest.approx(1e-8, rel=1e-9)
    assert form.threshold == 2.0 and form.shape == "diagonal"
    form, why = rmsprop_form(load_opt("gd"))
    assert form is None and "no slow preconditioner state" in why
    form, why = rmsprop_form(load_opt("scalar_rmsprop"))  # one v for all coordinates
    assert why == "" and form.shape == "scalar" and form.kind == "exact"
    # Adam: eps outside the root and bias correction, so the SDP holds in the limit only
    form, why = rmsprop_form(load_opt("adam", eps=1e-8), t=10)
    assert why == "" and form.kind == "asymptotic" and form.threshold == pytest.approx(38.0)
    assert any("eps" in lim for lim in form.limits)
    assert any("beta2**t" in lim for lim in form.limits)
    lr = 3e-3
    form, why = rmsprop_form(load_opt("adam", eps=0.0, lr=lr, beta1=0.9, beta2=0.99), t=10)
    assert form.kind == "asymptotic" and not any("eps" in lim for lim in form.limits)
    assert form.lr == pytest.approx(lr, rel=1e-12)  # the limit form √ν/η


# ---------------------------------------------------------------- (a) agreement, fast


@pytest.mark.slow  # minutes on 2 shared cores; CI runs it with the slow suite
def test_relaxation_agrees_with_sdp_at_eos(small, eos_point):
    opt, w, state, t = eos_point
    rel = relax(opt, small, w, state, t, moment_form="talk", tol=1e-7)
    assert rel.converged and rel.X.shape[0] >= 1
    form, _ = rmsprop_form(opt)
    sdp = stationary_sdp(small.loss, w, form.lr, eps=form.eps, threshold=opt.threshold)
    assert sdp.verified and abs(sdp.margin) < 1e-4
    assert sdp.kkt_residual < 1e-4
    dead = sdp.dead
    assert dead.sum() > 0  # constant pixels kept as zeros
    cmp = compare(rel.P, sdp.P, mask=~dead)
    assert cmp["n_compared"] == small.n - dead.sum()
    assert cmp["median_rel_err"] <= 1e-3, cmp
    assert cmp["max_rel_err"] <= 1e-2, cmp
    # dead coordinates: nu* = 0 in both, P* = sqrt(eps)/lr exactly
    np.testing.assert_allclose(rel.P[dead], np.sqrt(form.eps) / form.lr, rtol=1e-12)
    np.testing.assert_allclose(sdp.P[dead], np.sqrt(form.eps) / form.lr, rtol=1e-12)
    # the SDP's dual matrix is (c/eta^2) B^T Sigma B: H Sigma H agrees with the relaxation's
    sg = sigma_agreement(rel, sdp)
    assert sg["rel_frobenius"] < 1e-2, sg
    print(f"relaxation ({rel.iterations} units) vs SDP (k={sdp.k}): {cmp}; sigma {sg}")
    # the relaxation sits at the threshold, the SDP solution too
    assert rel.sharpness == pytest.approx(opt.threshold, rel=1e-3)  # Euler dt = 1: ~2e-4 above


# ------------------------------------------------------- (b) the full n×n SDP, directly


def _full_sdp(H, a, c):
    import cvxpy as cp

    n = H.shape[0]
    P = cp.Variable(n)
    prob = cp.Problem(cp.Minimize(cp.sum(P) + a @ cp.inv_pos(P)), [c * cp.diag(P) - H >> 0])
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10)
    assert prob.status == "optimal"
    return np.asarray(P.value)


@pytest.mark.parametrize("basis", ["adaptive", "hessian"])
def test_lmi_sdp_equals_full_sdp(basis):
    prob = quadratic(n=16, seed=1)
    w = prob.w0 + 0.05 * jax.random.normal(jax.random.PRNGKey(3), prob.w0.shape)
    lr, eps, c = 0.01, 1e-8, 2.0
    g = np.asarray(jax.grad(prob.loss)(w))
    H = np.asarray(jax.hessian(prob.loss)(w))
    H = 0.5 * (H + H.T)
    a = (g**2 + eps) / lr**2
    # the constraint is active at the unconstrained optimum P = sqrt(a)
    assert np.linalg.eigvalsh(H / np.sqrt(np.outer(a, a)) ** 0.5)[-1] > c
    if basis == "hessian":  # the top-k factorisation of H keeps its positive part
        assert np.linalg.eigvalsh(H)[0] > 0
    P_full = _full_sdp(H, a, c)
    res = stationary_sdp(prob.loss, w, lr, eps=eps, threshold=c, k=2, k_max=16, basis=basis)
    assert res.verified or basis == "hessian"
    assert res.k < prob.n or basis == "hessian"
    # the objective is flat near the optimum: 1e-12 in it is ~1e-5 in P (solver tolerance)
    np.testing.assert_allclose(res.P, P_full, rtol=1e-4)
    obj_full = np.sum(P_full) + np.sum(a / P_full)
    assert res.objective == pytest.approx(obj_full, rel=1e-9)
    assert res.kkt_residual < 1e-5
    if basis == "adaptive":
        lam_max = np.linalg.eigvalsh(H / np.sqrt(np.outer(res.P, res.P)))[-1]
        assert lam_max == pytest.approx(res.lam_max, abs=1e-8)
        assert res.margin == pytest.approx(c - lam_max, abs=1e-8)


def test_dead_coordinates_and_compare(small):
    w = small.w0
    dead = dead_coordinates(small.loss, w)
    assert 0 < dead.sum() < small.n
    d = compare(np.array([1.0, 2.0, 0.0, 4.0]), np.array([1.0, 1.0, 0.0, 4.0]))
    assert d["n_compared"] == 3 and d["max_rel_err"] == 1.0 and d["median_rel_err"] == 0.0
    d = compare(np.array([1.0, 2.0, 5.0]), np.array([1.0, 1.0, 5.0]), mask=[True, False, True])
    assert d["n_compared"] == 2 and d["max_rel_err"] == 0.0


# --------------------------------------------------------------------- (c) GD explained


@pytest.mark.slow  # minutes on 2 shared cores; CI runs it with the slow suite
def test_gd_explain_says_no_slow_preconditioner(tmp_path):
    from flowgen.report.explain import explain_text

    of = flowgen.load(ROOT / "optimizers" / "gd.opt")
    prob = quadratic(n=12)
    res = of.explain(prob, steps=30, lr=0.01, out=tmp_path)
    assert not res.precond["adaptive"] and res.relax_talk is None and res.sdp is None
    text = dict(explain_text(res))
    assert "no slow preconditioner state" in text["stationary preconditioner"]
    assert "no adaptive preconditioner" in text["stationary preconditioner"]
    for key in ("threshold", "edge of stability", "implicit curvature penalty"):
        assert key in text
    assert "threshold on the effective sharpness" in text["threshold"]
    assert res.point["penalty_fraction"] is not None
    np.testing.assert_allclose(res.series["hmean_discrete"], 0.01, rtol=1e-12)
    assert (tmp_path / "report.json").exists() and (tmp_path / "harmonic_mean.png").exists()


# ---------------------------------------------------------------------- (d) the CLI


@pytest.mark.slow  # minutes on 2 shared cores; CI runs it with the slow suite
def test_cli_explain_writes_report_and_figures(tmp_path, capsys):
    out = tmp_path / "ex"
    rc = main(
        [
            "explain",
            str(RMSPROP),
            "--problem",
            "digits-mlp",
            "--problem-opt",
            "n=100",
            "--problem-opt",
            "width=8",
            "--problem-opt",
            "keep_constant=true",
            "--steps",
            "200",
            "--restart-at",
            "190",
            "--set",
            "lr=1e-3",
            "--set",
            "beta2=0.9",
            "--relax-tol",
            "1e-6",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "stationary preconditioner" in printed and "threshold" in printed
    data = json.loads((out / "report.json").read_text())
    assert data["preconditioner"]["adaptive"] and data["preconditioner"]["sdp_applicable"]
    assert data["sdp"]["verified"]
    assert data["comparisons"]["relax_talk_vs_sdp"]["median_rel_err"] <= 1e-3
    assert "relax_default_vs_talk" in data["comparisons"]
    assert data["flow_start"] == 190
    for name in ("harmonic_mean.png", "stationary_preconditioner.png", "explain.npz"):
        assert (out / name).stat().st_size > 0
    npz = np.load(out / "explain.npz")
    assert npz["P_sdp"].shape == (628,)


# ------------------------------------------------------------- (a) agreement, full size


@pytest.mark.slow
def test_agreement_on_digits_mlp_at_eos_full_size():
    """RMSProp (lr 3e-4, beta2 0.99) central flow from the common start to step 600 (the
    discrete run reaches the edge of stability around steps 370–490), then the relaxation
    (talk's ν-rate) and the SDP at w̄(600): median relative error ≤ 1e-3 per coordinate."""
    of = flowgen.load(RMSPROP)
    res = of.explain("digits-mlp", steps=600, lr=3e-4, beta2=0.99)
    assert res.point["at_eos"] and res.point["n_crit"] >= 1
    assert res.relax_talk.converged
    assert res.sdp.verified
    cm = res.comparisons
    assert cm["relax_talk_vs_sdp"]["n_compared"] == 2948
    assert cm["relax_talk_vs_sdp"]["median_rel_err"] <= 1e-3, cm
    assert cm["sigma_relax_vs_sdp_dual"]["rel_frobenius"] < 1e-2, cm
    assert cm["discrete_vs_sdp"]["corr_log"] > 0.5, cm
    # the default ν-rate's fixed point: reported, and close to the talk's
    assert cm["relax_default_vs_talk"]["median_rel_err"] < 0.05, cm
