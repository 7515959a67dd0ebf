"""flowgen.runtime.expansion: the time-averaged gradient against its Taylor expansion,
checked on losses whose expansion is known in closed form."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.errors import SimulationError, UsageError
from flowgen.problems import QUADRATIC_EOS_LR, get_problem
from flowgen.runtime.expansion import expansion_check
from flowgen.runtime.validate import ValidateConfig, validate

EXAMPLE = ROOT / "examples" / "expansion_check.py"


def test_sixth_power_residual_is_the_closed_form():
    """L = Σ w⁶/6 with a period-two window w̄ ± δ: mean ∇L = w̄⁵ + 10 w̄³δ² + 5 w̄δ⁴.
    The second-order term is 10 w̄³δ², the residual 5 w̄δ⁴, which the fourth-order
    term (1/24)·120 w̄δ⁴ removes (the odd third-order term averages to zero)."""
    wbar = np.array([0.7, -0.4, 1.1])
    delta = np.array([0.3, 0.2, -0.25])
    window = np.stack([wbar + delta, wbar - delta] * 3)
    check = expansion_check(lambda w: jnp.sum(w**6) / 6, window, order=5)
    assert check.width == 6
    assert check.rms == pytest.approx(np.linalg.norm(delta), rel=1e-12)
    assert check.mean_grad == pytest.approx(
        np.linalg.norm(wbar**5 + 10 * wbar**3 * delta**2 + 5 * wbar * delta**4), rel=1e-12
    )
    assert check.grad_at_mean == pytest.approx(np.linalg.norm(wbar**5), rel=1e-12)
    second, third, fourth, fifth = check.terms
    assert second == pytest.approx(np.linalg.norm(10 * wbar**3 * delta**2), rel=1e-12)
    assert third < 1e-14
    assert fourth == pytest.approx(np.linalg.norm(5 * wbar * delta**4), rel=1e-12)
    assert fifth < 1e-14
    r2, r3, r4, r5 = check.residual
    assert r2 == pytest.approx(np.linalg.norm(5 * wbar * delta**4), rel=1e-10)
    assert r3 == pytest.approx(r2, rel=1e-10)
    assert r4 < 1e-14 and r5 < 1e-14
    assert check.relative == pytest.approx(r2 / check.mean_grad)
    assert check.as_dict()["relative"] == check.relative


def test_cubic_loss_is_exactly_second_order():
    """A quadratic plus cubic loss has a quadratic gradient: the second-order average
    is exact for any window with mean δ = 0, however wide."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 5))
    h = a @ a.T
    t = rng.standard_normal((5, 5, 5))

    def loss(w):
        return 0.5 * w @ h @ w + jnp.einsum("ijk,i,j,k->", t, w, w, w) / 6

    window = rng.standard_normal((8, 5))
    check = expansion_check(loss, window)
    assert check.terms[0] > 1.0  # the implicit term is large here
    assert check.relative < 1e-13


def test_bad_windows_are_refused_with_a_message():
    loss = lambda w: jnp.sum(w**2)  # noqa: E731
    with pytest.raises(UsageError, match="array of iterates"):
        expansion_check(loss, np.zeros(4))
    with pytest.raises(UsageError, match="order"):
        expansion_check(loss, np.zeros((2, 4)), order=7)
    bad = np.zeros((2, 4))
    bad[1, 2] = np.nan
    with pytest.raises(SimulationError, match="NaN"):
        expansion_check(loss, bad)


def test_example_script_measures_a_small_oscillation_and_refuses_bad_input(capsys):
    """`examples/expansion_check.py` on GD at the edge of the quadratic problem (a
    cubic correction to a quadratic: the second-order average is nearly exact)."""
    spec = importlib.util.spec_from_file_location("expansion_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--problem", "quadratic", "--set", "lr=0.01", "--steps", "400", "--at", "350"]
    assert module.main([*argv, "--order", "3", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["t"] == 350 and row["width"] == 20 and len(row["terms"]) == 2
    assert row["rms"] > 1e-3  # it oscillates …
    assert row["relative"] < 1e-5  # … and the flow's average is the run's
    assert module.main(["--problem", "nosuch"]) == 2
    assert "unknown built-in problem" in capsys.readouterr().err


def test_validate_checks_the_expansion_without_changing_the_flows():
    """``check_expansion``: at the end of every chunk once the flows run, the error of the
    second-order average over the chunk's last discrete iterates; nothing else changes."""
    prob = get_problem("quadratic")
    opt = flowgen.load(ROOT / "optimizers" / "gd.opt").optimizer(lr=QUADRATIC_EOS_LR)
    cfg = ValidateConfig(steps=330, restart_at=300, chunk=10)
    plain = validate(opt, prob, cfg)
    checked = validate(opt, prob, replace(cfg, check_expansion=True))
    err = checked.series["expansion_error"]
    assert np.flatnonzero(np.isfinite(err)).tolist() == [310, 320, 330]
    assert np.all(err[[310, 320, 330]] < 1e-4)  # a cubic correction: the expansion holds
    assert np.all(checked.series["oscillation_rms"][[310, 320, 330]] > 1e-3)
    sm = checked.summary
    assert sm["expansion_error_median"] == pytest.approx(np.median(err[[310, 320, 330]]))
    assert sm["expansion_error_max"] == pytest.approx(np.max(err[[310, 320, 330]]))
    assert sm["expansion_holds"] is True
    assert plain.summary["expansion_error_median"] is None
    assert plain.summary["expansion_holds"] is None
    assert np.all(np.isnan(plain.series["expansion_error"]))
    for key, values in plain.series.items():
        if key in ("expansion_error", "oscillation_rms"):
            continue
        np.testing.assert_array_equal(checked.series[key], values, err_msg=key)
    assert {k: v for k, v in sm.items() if not k.startswith("expansion")} == {
        k: v for k, v in plain.summary.items() if not k.startswith("expansion")
    }
