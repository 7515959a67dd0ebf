"""The central flows of GD, RMSProp, scalar RMSProp and Adam validated on digits-mlp
(docs/mathematics.md §5): restarted at the edge of stability, ≥ 400 steps after it.

These take minutes each on 2 cores: `pytest -m slow` (CI runs them after the fast suite).
"""

import pytest
from conftest import ROOT

import flowgen

pytestmark = pytest.mark.slow

CASES = [
    # file, hyperparameters, steps, restart
    ("gd", dict(lr=0.4), 700, 300),
    ("rmsprop", dict(lr=3e-4, beta2=0.99), 1000, "auto"),
    ("scalar_rmsprop", dict(lr=0.01, beta2=0.99), 1100, "auto"),
    ("adam", dict(lr=1e-3, beta1=0.9, beta2=0.99), 1400, "auto"),
]


@pytest.mark.parametrize("name, hyper, steps, restart", CASES, ids=[c[0] for c in CASES])
def test_central_flow_tracks_discrete_at_eos(name, hyper, steps, restart):
    opt = flowgen.load(ROOT / "optimizers" / f"{name}.opt")
    res = opt.validate("digits-mlp", steps=steps, restart_at=restart, **hyper)
    sm = res.summary
    assert res.eos_start is not None
    assert steps - res.start >= 400
    assert sm["verdict"] == "pass", sm
    assert sm["central_distance_rel"] <= 0.10
    assert sm["stable_distance_rel"] >= 3 * sm["central_distance_rel"]
    assert sm["loss_pred_rel_err"] <= 0.10
    assert sm["sharpness_rel_err"] <= 0.10


@pytest.mark.parametrize(
    "name, hyper", [("rmsprop", dict(lr=3e-4, beta2=0.99)), ("adam", dict(lr=3e-3, beta2=0.99))]
)
def test_validate_with_constant_input_features_has_no_nan(name, hyper):
    """digits-mlp keeping the 10 constant pixels: their weights have ν = 0 forever."""
    import numpy as np

    opt = flowgen.load(ROOT / "optimizers" / f"{name}.opt")
    res = opt.validate("digits-mlp", steps=150, problem_options={"keep_constant": True}, **hyper)
    N = 150
    for key in ("loss_pred", "sharpness_central", "n_crit"):  # recorded at start .. N-1
        assert np.isfinite(res.series[key][res.start : N]).all(), key
    assert np.isfinite(res.series["distance_central"][res.start : N + 1]).all()
    assert np.isfinite(res.summary["central_distance_rel"])
