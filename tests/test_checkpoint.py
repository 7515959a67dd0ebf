"""The one process loop: checkpoints, resumption, kills, and one time convention."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.cli import main
from flowgen.errors import UsageError
from flowgen.problems import get_problem
from flowgen.runtime.checkpoint import CHECKPOINT_NAME, CheckpointStore, run_identity
from flowgen.runtime.loop import Interrupted
from flowgen.runtime.validate import ValidateConfig, validate

OPT = ROOT / "optimizers"


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN patterns differ"
    m = np.isfinite(a)
    if not m.any():
        return 0.0
    return float(np.max(np.abs(a[m] - b[m]) / np.maximum(np.abs(a[m]), 1e-300)))


def _series_equal(ref: dict, got: dict, tol=1e-9):
    assert set(ref) == set(got)
    for k in ref:
        if isinstance(ref[k], list):  # JSON: None for NaN
            a = [np.nan if x is None else x for x in ref[k]]
            b = [np.nan if x is None else x for x in got[k]]
        else:
            a, b = ref[k], got[k]
        assert _max_rel(a, b) <= tol, k


@pytest.fixture(scope="module")
def rmsprop_case():
    prob = get_problem("quadratic")
    opt = flowgen.load(OPT / "rmsprop.opt").optimizer(lr=3e-3, beta2=0.99)
    cfg = ValidateConfig(steps=90, restart_at=30, chunk=10)
    return opt, prob, cfg, validate(opt, prob, cfg)


@pytest.mark.slow  # ~45-90 s of a fast-suite worker; CI runs it with the slow suite
def test_interrupted_and_resumed_equals_uninterrupted(rmsprop_case, tmp_path):
    opt, prob, cfg, ref = rmsprop_case
    store = CheckpointStore(tmp_path, run_identity("validate", opt, prob, cfg))
    calls = []
    with pytest.raises(Interrupted) as ei:  # stop after the 5th chunk (step 50: flows running)
        validate(
            opt, prob, cfg, store=store, should_stop=lambda: calls.append(1) or len(calls) == 5
        )
    assert ei.value.step == 50 and ei.value.exit_code == 130
    res = validate(opt, prob, cfg, store=store, resume=True)
    _series_equal(ref.series, res.series)
    assert res.summary == ref.summary
    # the processes recorded on one time axis: every series has a value at the last step
    for key in ("loss_discrete", "loss_stable", "distance_central", "distance_stable"):
        assert np.isfinite(res.series[key][cfg.steps]), key


@pytest.mark.slow  # ~45-90 s of a fast-suite worker; CI runs it with the slow suite
def test_resume_refuses_another_run(rmsprop_case, tmp_path):
    opt, prob, cfg, _ = rmsprop_case
    store = CheckpointStore(tmp_path, run_identity("validate", opt, prob, cfg))
    with pytest.raises(Interrupted):
        validate(opt, prob, cfg, store=store, should_stop=lambda: True)
    other = flowgen.load(OPT / "rmsprop.opt").optimizer(lr=2e-3, beta2=0.99)
    store2 = CheckpointStore(tmp_path, run_identity("validate", other, prob, cfg))
    with pytest.raises(UsageError, match="belongs to a different run.*hyper.lr"):
        validate(other, prob, cfg, store=store2, resume=True)
    # a corrupt or partial checkpoint is a clear error, never a traceback
    path = tmp_path / CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UsageError, match="corrupt or partial"):
        validate(opt, prob, cfg, store=store, resume=True)
    with pytest.raises(UsageError, match="no checkpoint"):
        CheckpointStore(tmp_path / "empty", {}).load()


def test_run_records_the_first_steps_of_stateful_optimizers():
    """`run` used to drop the discrete steps before the stable flow started (loss[1] NaN)."""
    res = flowgen.load(OPT / "rmsprop.opt").run(
        "quadratic", steps=12, lr=3e-3, beta2=0.99, eig_every=4, chunk=5
    )
    s = res.series
    assert np.isfinite(s["loss_discrete"]).all()
    assert np.isnan(s["loss_stable"][0]) and np.isfinite(s["loss_stable"][1:]).all()
    assert s["loss_stable"][1] == s["loss_discrete"][1]  # the flow starts from the iterate
    assert np.isfinite(s["sharpness_discrete"][[4, 8, 12]]).all()


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "flowgen.cli", *map(str, args)], env


VALIDATE = [
    "validate",
    OPT / "rmsprop.opt",
    "--problem",
    "quadratic",
    "--set",
    "lr=3e-3",
    "--set",
    "beta2=0.99",
    "--steps",
    "100",
    "--restart-at",
    "30",
    "--chunk",
    "10",
]


def _wait_for_step(path, step, proc, timeout=240.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read()}")
        if path.exists():
            try:
                with np.load(path) as z:
                    header = json.loads(str(z["__header__"]))
                if header["state"]["t"] >= step:
                    return header["state"]["t"]
            except Exception:  # noqa: BLE001 - being replaced right now
                pass
        time.sleep(0.2)
    raise AssertionError("the checkpoint never reached the step")


@pytest.mark.slow  # minutes on 2 shared cores; CI runs it with the slow suite
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    argv, env = _cli(*VALIDATE, "--out", killed)
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    t_kill = _wait_for_step(killed / CHECKPOINT_NAME, 50, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert t_kill < 100 and not (killed / "report.json").exists()
    assert main([*map(str, VALIDATE), "--out", str(killed), "--resume"]) in (0, 1)
    assert main([*map(str, VALIDATE), "--out", str(whole)]) in (0, 1)
    a = json.loads((whole / "report.json").read_text())
    b = json.loads((killed / "report.json").read_text())
    _series_equal(a["series"], b["series"])
    assert a["summary"] == b["summary"]


@pytest.mark.slow  # ~45-90 s of a fast-suite worker; CI runs it with the slow suite
def test_sigint_writes_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "int"
    argv, env = _cli(*VALIDATE, "--out", out)
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(out / CHECKPOINT_NAME, 20, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    # a mismatched resume from the command line: exit 2 and a clear message
    bad = [*map(str, VALIDATE), "--out", str(out), "--resume"]
    bad[bad.index("lr=3e-3")] = "lr=2e-3"
    assert main(bad) == 2


@pytest.mark.slow
def test_compile_cache_is_used_and_changes_no_output(tmp_path):
    """The CLI keeps compiled code in $FLOWGEN_COMPILE_CACHE; a second run reads it and
    writes the same report (the cache only shortens start-up). Two cold CLI
    processes (35 s on a quiet 2-core machine): slow."""
    cache = tmp_path / "xla"
    reports = []
    for name in ("cold", "warm"):
        argv, env = _cli(*VALIDATE, "--out", tmp_path / name)
        env["FLOWGEN_COMPILE_CACHE"] = str(cache)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        assert proc.returncode in (0, 1), proc.stderr[-2000:]
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
        if name == "cold":
            entries = sorted(p.name for p in cache.iterdir())
            assert entries, "nothing was cached"
    assert set(entries) <= {p.name for p in cache.iterdir()}
    _series_equal(reports[0]["series"], reports[1]["series"], tol=0.0)
    assert reports[0]["summary"] == reports[1]["summary"]
