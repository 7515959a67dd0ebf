"""``flowgen sweep`` (issue 9, part 3): the JSON, vmap = sequential, resume, bad --set lists.

A small digits MLP (100 examples, width 8: 628 parameters) and a few dozen steps.
"""

import json

import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.cli import main
from flowgen.errors import UsageError
from flowgen.problems import digits_mlp
from flowgen.runtime.loop import Interrupted
from flowgen.runtime.sweep import (
    SweepConfig,
    combinations,
    mean_loss_window,
    parse_sweep_sets,
    sweep,
)

OPT = ROOT / "optimizers"
FILES = [str(OPT / "rmsprop.opt"), str(OPT / "rmsprop_debiased_eps_outside.opt")]
SMALL = ["--problem", "digits-mlp", "--problem-opt", "n=100", "--problem-opt", "width=8"]
FINAL = {"loss", "mean_loss", "sharpness", "effective_sharpness", "harmonic_mean_step"}


@pytest.fixture(scope="module")
def small():
    return digits_mlp(n=100, width=8)


def test_parse_sets_and_grid():
    sets = parse_sweep_sets(["lr=1e-4, 2e-4,5e-4", "beta2=0.99"])
    assert sets == {"lr": [1e-4, 2e-4, 5e-4], "beta2": [0.99]}
    grid = combinations({"lr": [1.0, 2.0], "beta2": [0.9, 0.99]})
    assert grid == [
        {"lr": 1.0, "beta2": 0.9},
        {"lr": 1.0, "beta2": 0.99},
        {"lr": 2.0, "beta2": 0.9},
        {"lr": 2.0, "beta2": 0.99},
    ]
    assert mean_loss_window({"lr": 1e-3, "beta2": 0.99}) == 200
    assert mean_loss_window({"lr": 1e-3, "beta1": 0.9, "beta2": 0.95}) == 40
    assert mean_loss_window({"lr": 0.1}) == 20


@pytest.mark.parametrize(
    "item, words",
    [
        ("lr=1e-4,,2e-4", "value 2 of `1e-4,,2e-4` is empty"),
        ("lr=1e-4,fast", "`fast` is not a number"),
        ("lr", "expects NAME=V1,V2"),
        ("lr=1e-4,1e-4", "listed twice"),
        ("lr=1e-4,inf", "not a finite number"),
        ("lr=", "is empty"),
    ],
)
def test_bad_set_lists_exit_2(item, words, capsys):
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        parse_sweep_sets([item])
    assert main(["sweep", FILES[0], "--set", item, "--steps", "3", *SMALL]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_unknown_hyperparameter_and_bad_flows_exit_2(capsys, tmp_path):
    out = ["--out", str(tmp_path / "s")]
    assert main(["sweep", FILES[0], "--set", "foo=1,2", "--steps", "3", *SMALL, *out]) == 2
    assert "no hyperparameter `foo`" in capsys.readouterr().err
    assert main(["sweep", FILES[0], "--set", "lr=1e-3", "--flows", "fast", *SMALL, *out]) == 2
    assert "`fast` is not" in capsys.readouterr().err


def test_two_files_three_values_write_every_field(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", *FILES, "--set", "lr=1e-3,2e-3,3e-3", "--set", "beta2=0.9"]
    rc = main([*args, "--steps", "30", "--chunk", "10", "--eig-every", "10", *SMALL,
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 10_000
    assert data["swept"] == ["lr"] and data["set"] == {"lr": [1e-3, 2e-3, 3e-3], "beta2": [0.9]}
    assert [b["mode"] for b in data["batching"]] == ["vmap", "vmap"]
    runs = data["runs"]
    assert len(runs) == 6
    assert [r["file"] for r in runs] == [FILES[0]] * 3 + [FILES[1]] * 3
    for r, lr in zip(runs, [1e-3, 2e-3, 3e-3] * 2, strict=True):
        assert r["hyper"] == {"lr": lr, "beta2": 0.9, "eps": 1e-8}  # every hyperparameter
        assert r["swept"] == {"lr": lr}
        assert set(r["final"]) >= FINAL
        assert r["final"]["mean_loss_window"] == 20  # 2⌈1/(1 − 0.9)⌉
        assert isinstance(r["flows"], dict)
        s = r["series"]
        assert set(s) >= {"loss", "sharpness", "effective_sharpness", "hmean"}
        assert (
            len(s["loss"]) == 31 and s["sharpness"][10] is not None and s["sharpness"][11] is None
        )
        f = r["final"]
        assert f["loss"] == s["loss"][30] and f["harmonic_mean_step"] == s["hmean"][30]
        assert f["mean_loss"] == pytest.approx(np.mean(s["loss"][11:31]), rel=1e-12)
        assert f["effective_sharpness"] > 0 and f["sharpness"] > 0
    # the same file, larger lr: larger effective step sizes
    h = [r["final"]["harmonic_mean_step"] for r in runs[:3]]
    assert h[0] < h[1] < h[2]
    assert "lr=0.002" in capsys.readouterr().out.replace(" ", "")


def test_final_values_are_the_runs_own(small):
    """The last-step values equal a direct computation on the discrete run."""
    import jax
    import jax.numpy as jnp

    from flowgen.runtime import eigen
    from flowgen.runtime.processes import DiscreteProcess

    res = sweep([FILES[1]], small, {"lr": [2e-3], "beta2": [0.9]}, SweepConfig(steps=20, chunk=7))
    f = res.runs[0]["final"]
    opt = flowgen.load(FILES[1]).optimizer(lr=2e-3, beta2=0.9)
    d = DiscreteProcess(opt, small, small.w0)
    d.advance(20)
    p = np.asarray(opt.precond(d.w, d.state, 20.0))  # the step-20 preconditioner (t = 20)
    assert f["loss"] == pytest.approx(float(small.loss(d.w)), rel=1e-12)
    assert f["harmonic_mean_step"] == pytest.approx(p.size / np.sum(1 / p), rel=1e-12)
    H = jax.hessian(small.loss)(d.w)
    lam = np.linalg.eigvalsh(np.asarray(H))[-1]
    assert f["sharpness"] == pytest.approx(lam, rel=1e-6)
    sp = np.sqrt(p)
    lam_eff = np.linalg.eigvalsh(sp[:, None] * np.asarray(H) * sp[None, :])[-1]
    assert f["effective_sharpness"] == pytest.approx(lam_eff, rel=1e-6)
    assert eigen is not None and jnp is not None


def test_vmap_equals_sequential(small):
    sets = {"lr": [1e-3, 2e-3, 4e-3], "beta2": [0.9]}
    cfg = SweepConfig(steps=40, chunk=15, eig_every=10)
    a = sweep([FILES[1]], small, sets, cfg)
    b = sweep([FILES[1]], small, sets, SweepConfig(steps=40, chunk=15, eig_every=10,
              batch="sequential"))  # fmt: skip
    assert a.batching[0]["mode"] == "vmap" and b.batching[0]["mode"] == "sequential"
    for ra, rb in zip(a.runs, b.runs, strict=True):
        assert ra["batched"] and not rb["batched"]
        for k in ("loss", "hmean"):
            x, y = np.array(ra["series"][k], float), np.array(rb["series"][k], float)
            m = np.isfinite(y)
            assert np.max(np.abs(x[m] - y[m]) / np.abs(y[m])) < 1e-12, k
        w1, w2 = a.w_final[ra["name"]], b.w_final[rb["name"]]
        assert np.max(np.abs(w1 - w2)) < 1e-12
        for k in ("sharpness", "effective_sharpness"):  # eigensolver: its own tolerance
            assert ra["final"][k] == pytest.approx(rb["final"][k], rel=1e-6)


def test_interrupted_sweep_resumes_to_the_same_result(small, tmp_path):
    sets = {"lr": [1e-3, 3e-3], "beta2": [0.9]}
    cfg = SweepConfig(steps=30, chunk=10, eig_every=5)
    files = [FILES[0], FILES[1]]
    whole = sweep(files, small, sets, cfg, out=tmp_path / "whole")
    calls = {"n": 0}

    def stop_after(k):
        def stop():
            calls["n"] += 1
            return calls["n"] == k

        return stop

    out = tmp_path / "cut"
    with pytest.raises(Interrupted):  # in the first file's batch
        sweep(files, small, sets, cfg, out=out, should_stop=stop_after(2))
    calls["n"] = 0
    with pytest.raises(Interrupted):  # in the second file's batch, the first one done
        sweep(files, small, sets, cfg, out=out, resume=True, should_stop=stop_after(3))
    assert len(list((out / "runs").glob("*.json"))) == 2
    resumed = sweep(files, small, sets, cfg, out=out, resume=True)
    for ra, rb in zip(whole.runs, resumed.runs, strict=True):
        assert ra["final"] == rb["final"]
        assert ra["series"] == rb["series"]
    with pytest.raises(UsageError, match="different run"):  # another config, same --out
        sweep(files, small, sets, SweepConfig(steps=31, chunk=10, eig_every=5), out=out,
              resume=True)  # fmt: skip


def test_api_sweep(small, tmp_path):
    res = flowgen.sweep(FILES[0], small, 10, lr=[1e-3, 2e-3], beta2=0.9, chunk=5,
                        out=tmp_path / "api")  # fmt: skip
    assert [r["swept"] for r in res.runs] == [{"lr": 1e-3}, {"lr": 2e-3}]
    assert (tmp_path / "api" / "sweep.json").exists()


@pytest.mark.slow
def test_sweep_with_the_central_flow():
    """``--flows central``: the central flow beside the discrete run (GD on the 20-parameter
    quadratic); its distance to the discrete run equals the loop's own lane's. ~1 min (two
    central flows compiled)."""
    from flowgen.problems import quadratic
    from flowgen.runtime.central import CentralConfig, CentralFlow
    from flowgen.runtime.loop import Experiment, FlowLane

    quad = quadratic(n=20)
    gd = str(OPT / "gd.opt")
    flows = ("discrete", "central")
    cfg = SweepConfig(steps=12, chunk=6, eig_every=6, flows=flows, flow_start=2)
    res = sweep([gd], quad, {"lr": [0.01]}, cfg)
    for r, lr in zip(res.runs, [0.01], strict=True):
        c = r["flows"]["central"]
        assert c["start"] == 2
        assert c["distance_to_discrete_rel"] == pytest.approx(
            c["distance_to_discrete"] / c["distance_travelled"]
        )
        assert len(r["series"]["distance_central"]) == 13
        opt = flowgen.load(gd).optimizer(lr=lr)
        lane = FlowLane(
            "central",
            lambda w, s, t, opt=opt: CentralFlow(opt, quad, w, s, t, CentralConfig(substeps=4)),
            rename={"loss_pred": "loss_pred", "n_crit": "n_crit"},
        )
        exp = Experiment(opt, quad, steps=12, flows=(lane,), start=2, chunk=6, eig_every=6)
        exp.run()
        assert c["distance_to_discrete"] == pytest.approx(
            float(exp.series["distance_central"][12]), rel=1e-9
        )
        assert c["distance_to_discrete"] > 0
