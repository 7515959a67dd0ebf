"""Rules with a delay state (the previous gradient) validated on digits-mlp: optimistic GD
and Adan, restarted at the edge of stability (`pytest -m slow`; ~15 min each on 2 cores).

Measured (examples/figures/ogd, examples/figures/adan): ogd at lr 0.2 central 0.026 vs
stable 0.235 of the distance travelled, loss error 9.1 %; adan at lr 1e-3 central 0.018 vs
stable 0.282, loss error 1.3 %.
"""

import pytest
from conftest import ROOT

import flowgen

pytestmark = pytest.mark.slow

CASES = [
    # file, hyperparameters, steps
    ("ogd", dict(lr=0.2), 1000),
    ("adan", dict(lr=1e-3), 1500),
]


@pytest.mark.parametrize("name, hyper, steps", CASES, ids=[c[0] for c in CASES])
def test_delay_state_rules_pass_at_eos(name, hyper, steps):
    opt = flowgen.load(ROOT / "optimizers" / f"{name}.opt")
    res = opt.validate("digits-mlp", steps=steps, restart_at="auto", **hyper)
    sm = res.summary
    assert res.eos_start is not None and res.restart_at == res.eos_start + 100
    assert steps - res.start >= 500
    assert sm["verdict"] == "pass", sm
    assert sm["central_distance_rel"] <= 0.05
    assert sm["stable_distance_rel"] >= 5 * sm["central_distance_rel"]
    assert sm["sharpness_rel_err"] <= 0.10
