"""Runtime: `flowgen run`, the central flow and `flowgen validate`, end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.cli import main
from flowgen.errors import SimulationError
from flowgen.problems import digits_mlp, get_problem
from flowgen.runtime.central import CentralFlow
from flowgen.runtime.processes import DiscreteProcess, StableFlow
from flowgen.runtime.validate import ValidateConfig, centred_window, first_crossing, validate

OPT = ROOT / "optimizers"
USER = f"{ROOT / 'examples' / 'my_problem.py'}:make_problem"


def test_run_cli_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "run",
            str(OPT / "gd.opt"),
            "--problem",
            "quadratic",
            "--steps",
            "40",
            "--set",
            "lr=0.02",
            "--eig-every",
            "10",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads((out / "run.json").read_text())
    assert data["threshold"] == 2.0 and data["config"]["steps"] == 40
    assert data["provenance"]["sha256"] and data["provenance"]["hyper"]["lr"] == 0.02
    loss = np.array(data["series"]["loss_discrete"], dtype=float)
    assert loss[-1] < loss[0]
    sharp = np.array([np.nan if x is None else x for x in data["series"]["sharpness_discrete"]])
    assert np.isfinite(sharp[10::10]).all()
    assert (out / "run.png").stat().st_size > 10_000 and (out / "run.npz").exists()


@pytest.mark.parametrize("name", ["gd", "momentum"])
def test_stable_flow_is_the_small_step_limit(name):
    """The discrete optimizer is a first-order scheme of its stable flow: halving the
    learning rate (and doubling the steps) halves the gap, relative to the distance."""
    prob = get_problem("quadratic")
    gaps = []
    for lr, K in ((2e-3, 40), (1e-3, 80)):
        opt = flowgen.load(OPT / f"{name}.opt").optimizer(lr=lr)
        cd = DiscreteProcess(opt, prob, prob.w0).advance(K)
        cs = StableFlow(opt, prob, prob.w0, rtol=1e-9, atol=1e-12).advance(K)
        gaps.append(
            float(jnp.linalg.norm(cd.w[-1] - cs.w[-1]) / jnp.linalg.norm(cd.w[-1] - prob.w0))
        )
    assert gaps[1] < 0.05
    assert gaps[0] / gaps[1] == pytest.approx(2.0, rel=0.15)


def test_nan_stops_with_step_and_quantity():
    prob = get_problem("quadratic")
    opt = flowgen.load(OPT / "gd.opt").optimizer(lr=50.0)
    with pytest.raises(SimulationError) as ei:
        DiscreteProcess(opt, prob, prob.w0).advance(200)
    msg = ei.value.message
    assert "NaN or infinite at step" in msg and "discrete optimizer" in msg


def test_central_equals_stable_without_critical_directions():
    """Below the edge (no critical direction) the central flow is the stable flow,
    integrated by Euler substeps: the gap halves when the substeps double."""
    from flowgen.runtime.central import CentralConfig

    prob = get_problem("quadratic")
    opt = flowgen.load(OPT / "gd.opt").optimizer(lr=0.001)
    ref = StableFlow(opt, prob, prob.w0, rtol=1e-10, atol=1e-12).advance(5).w[-1]
    gaps = []
    for sub in (4, 8):
        c = CentralFlow(opt, prob, prob.w0, config=CentralConfig(substeps=sub))
        ch = c.advance(5)
        assert (ch.n_crit == 0).all()
        gaps.append(float(jnp.linalg.norm(c.w - ref) / jnp.linalg.norm(c.w - prob.w0)))
    assert gaps[0] < 1e-2
    assert gaps[0] / gaps[1] == pytest.approx(2.0, rel=0.1)


def test_centred_window_and_first_crossing():
    x = np.arange(30, dtype=float)
    w = centred_window(x, 21)
    assert np.isnan(w[:10]).all() and w[10] == pytest.approx(10.0)
    s = np.array([3.0, 2.5, 1.0, 1.5, 1.95, 2.1])  # warm-up above, then from below
    assert first_crossing(s, 1.9) == 4
    assert first_crossing(np.array([0.1, 0.2]), 1.9) is None
    # without state there is no warm-up: starting above the level and staying there
    # is the edge at step 0 ...
    stays = np.array([2.5, 2.0, np.nan, 1.92, 2.1])
    assert first_crossing(stays, 1.9, warm_up=False) == 0
    assert first_crossing(stays, 1.9) is None
    # ... but a catapult that falls below the level left the edge: it is where the
    # sharpness comes back, and the answer moves from 0 once the fall is measured
    assert first_crossing(s[:2], 1.9, warm_up=False) == 0
    assert first_crossing(s[:3], 1.9, warm_up=False) is None
    assert first_crossing(s, 1.9, warm_up=False) == 4
    assert first_crossing(s[2:], 1.9, warm_up=False) == 2


def test_edge_found_when_crossed_before_the_first_periodic_measurement():
    """Step 0 is measured: GD on digits-mlp crosses 0.95·c near step 20, so with
    eig_every=40 the first periodic measurement is already above the level (the
    10^6-parameter run's `no-eos` verdict came from this)."""
    from flowgen.runtime.loop import Experiment

    opt = flowgen.load(OPT / "gd.opt").optimizer(lr=0.4)
    exp = Experiment(
        opt, get_problem("digits-mlp"), steps=45, start="auto", eos_delay=1, eig_every=40, chunk=45
    ).run()
    s = exp.series["sharpness_discrete"]
    assert s[0] < 0.95 * exp.threshold <= s[40]
    assert exp.eos_start == 40


@pytest.fixture(scope="module")
def small_validation():
    prob = get_problem("quadratic")
    opt = flowgen.load(OPT / "rmsprop.opt").optimizer(lr=3e-3, beta2=0.99)
    return validate(opt, prob, ValidateConfig(steps=260, restart_at="auto", chunk=20))


@pytest.mark.slow  # ~45-90 s of a fast-suite worker; CI runs it with the slow suite
def test_validation_on_small_problem_passes(small_validation):
    """The whole validation on a 21-parameter problem (RMSProp, restarted at EOS)."""
    r = small_validation
    sm = r.summary
    assert r.eos_start is not None and r.restart_at == r.eos_start + 100
    assert sm["verdict"] == "pass"
    assert sm["central_distance_rel"] < 0.05
    assert sm["stable_distance_rel"] > 3 * sm["central_distance_rel"]
    assert sm["loss_pred_rel_err"] < 0.1
    assert sm["sharpness_rel_err"] < 0.1
    # the central flow pins the effective sharpness at the threshold
    sc = r.series["sharpness_central"][r.start + 5 :]
    sc = sc[np.isfinite(sc)]
    assert np.median(np.abs(sc - 2.0)) < 1e-3
    # while the stable flow's keeps rising past it
    assert sm["stable_sharpness_max"] > 2.2


@pytest.mark.slow  # ~45-90 s of a fast-suite worker; CI runs it with the slow suite
def test_validate_cli_user_problem_and_strict(tmp_path):
    out = tmp_path / "val"
    rc = main(
        [
            "validate",
            str(OPT / "gd.opt"),
            "--problem",
            USER,
            "--problem-opt",
            "width=8",
            "--steps",
            "30",
            "--set",
            "lr=0.5",
            "--out",
            str(out),
            "--strict",
        ]
    )
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["summary"]) >= {
        "central_distance_rel",
        "stable_distance_rel",
        "loss_pred_rel_err",
        "sharpness_rel_err",
        "stable_sharpness_max",
        "verdict",
    }
    assert rep["summary"]["verdict"] in ("pass", "fail", "no-eos")
    assert rc == (0 if rep["summary"]["verdict"] == "pass" else 1)
    assert rep["provenance"]["sha256"] and (out / "validate.png").exists()
    assert len(rep["series"]["loss_discrete"]) == 31
    # the central flow's work and its step control (docs/outputs.md)
    counters = rep["timings"]["central_counters"]
    assert counters["units"] == 30 - rep["flow_start"] and counters["refinements"] >= 0
    assert rep["timings"]["central_substeps"] == 2 * 2 ** counters["refinements"]
    assert rep["config"]["central"]["refine_tol"] == 0.02


@pytest.mark.slow  # minutes on 2 shared cores; CI runs it with the slow suite
@pytest.mark.parametrize(
    "name, hyper, start",
    [("adam", dict(lr=1e-2, beta2=0.99), 1), ("rmsprop", dict(lr=3e-3, beta2=0.99), 4)],
)
def test_constant_features_no_nan(name, hyper, start):
    """Dead inputs keep ν = 0 exactly; ∂√ν/∂ν = ∞ times a zero rate must not be NaN."""
    from flowgen.runtime.central import CentralConfig

    prob = digits_mlp(n=100, width=8, keep_constant=True)
    opt = flowgen.load(OPT / f"{name}.opt").optimizer(**hyper)
    d = DiscreteProcess(opt, prob, prob.w0)
    d.advance(start)  # early: the effective sharpness is above the threshold
    assert bool(jnp.any(d.state["v"] == 0.0)), "the problem should have dead coordinates"
    c = CentralFlow(opt, prob, d.w, d.state, start, CentralConfig(k_max=4))
    first = c.observe()  # the start, where the effective sharpness is above the threshold
    ch = c.advance(3)
    assert max(first.n_crit.max(), ch.n_crit.max()) >= 1
    assert np.isfinite(np.asarray(c.w)).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(c.state))
    assert np.isfinite(ch.loss_pred).all()


def test_run_cli_bad_problem_is_clean_error(capsys):
    rc = main(["run", str(OPT / "gd.opt"), "--problem", "no/such/file.py:make", "--steps", "5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no such file" in err.lower() and "Traceback" not in err


def test_api_mirrors_cli():
    of = flowgen.load(OPT / "gd.opt")
    assert of.derive(lr=0.1).threshold == 2.0
    assert "def step(" in of.codegen()
    res = of.run("quadratic", steps=20, lr=0.01, eig_every=10)
    assert res.series["loss_discrete"][20] < res.series["loss_discrete"][0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["validate", "gd.opt", "--substeps", "0"], "--substeps must be a positive integer"),
        (["run", "gd.opt", "--steps", "-3"], "--steps must be a positive integer"),
        (["run", "gd.opt", "--set", "lr=abc"], "`abc` is not a number"),
        (["validate", "gd.opt", "--set", "lrr=1"], "has no hyperparameter `lrr`"),
        (
            ["validate", "gd.opt", "--problem", "quadratic", "--steps", "20", "--restart-at", "x"],
            "--restart-at expects a step number or `auto`",
        ),
        (
            ["validate", "gd.opt", "--problem", "quadratic", "--steps", "20", "--restart-at", "30"],
            "at or after the last step",
        ),
        (["run", "gd.opt", "--problem", "nosuchbuiltin"], "nosuchbuiltin"),
    ],
)
def test_cli_usage_errors(argv, fragment, capsys):
    argv = [str(OPT / a) if a.endswith(".opt") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_signum_runs_discrete_but_has_no_central_flow():
    of = flowgen.load(OPT / "signum.opt")
    res = of.run("quadratic", steps=10, lr=1e-3, eig_every=5)
    assert res.threshold is None and np.isfinite(res.series["loss_discrete"][10])
    with pytest.raises(SimulationError, match="no central flow"):
        CentralFlow(of.optimizer(), get_problem("quadratic"), get_problem("quadratic").w0)


def test_sharpness_meter_two_back_warm_start_and_resume():
    """At the edge the discrete iterate oscillates with period two; the meter warm-starts
    from the last two measurements' top vectors. Its values equal a cold, tight solve;
    a restored meter measures exactly what the original does; the chunk's gradient
    norms are those of its new iterates."""
    from flowgen.runtime import eigen
    from flowgen.runtime.processes import SharpnessMeter

    prob = get_problem("digits-mlp", keep_constant=True)  # at its edge from step 5
    opt = flowgen.load(OPT / "gd.opt").optimizer(lr=0.5)
    d = DiscreteProcess(opt, prob, prob.w0)
    ch = d.advance(60)
    g = jnp.linalg.norm(jax.grad(prob.loss)(d.w))
    assert ch.grad_norm[-1] == pytest.approx(float(g), rel=1e-12)
    meter, vals = SharpnessMeter(opt, prob), []
    for j in range(60):
        vals.append(meter(ch.w[j], d.state, j + 1.0))
        if j == 40:
            twin = SharpnessMeter(opt, prob)
            twin.restore(meter.snapshot())
            assert "before" in meter.snapshot()
    assert twin(ch.w[41], d.state, 42.0) == vals[41]
    assert min(vals[20:]) > 1.8  # at the edge (c = 2), oscillating
    for j in (0, 20, 41, 59):
        p = opt.effective_step(ch.w[j], d.state, 1.0)
        mv = eigen.sym_eff_hessian_matvec(prob.loss, ch.w[j], p)
        ref = eigen.top_eigenpairs(mv, prob.w0.shape[0], 1, tol=1e-10)
        assert vals[j] == pytest.approx(float(ref.vals[0]), rel=1e-6)
