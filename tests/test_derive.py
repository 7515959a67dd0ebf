"""The symbolic derivation reproduces known closed forms (docs/mathematics.md §3)."""

import json
import subprocess
import sys

import pytest
import sympy as sp
from conftest import OPTIMIZERS, ROOT

from flowgen.errors import DerivationError, UsageError
from flowgen.flow import build_flow
from flowgen.flow.spec import PARSE_LOCALS
from flowgen.language import load_program, parse_text
from flowgen.language.checks import check_program


def derive_text(text, **hyper):
    prog = parse_text(text, "test.opt")
    check_program(prog)
    return build_flow(prog, hyper)


def S(name, **kw):
    return sp.Symbol(name, **kw)


def parse(s):
    """Parse flowgen's own output (never user input) for comparison."""
    names = {
        n: sp.Symbol(n)
        for n in (
            "lr",
            "beta1",
            "beta2",
            "beta",
            "eps",
            "v",
            "m",
            "t",
            "Eg",
            "Vg",
            "g",
            "w",
            "s",
            "weight_decay",
            "a",
            "mu",
        )
    }
    return sp.parse_expr(s, local_dict={**names, **PARSE_LOCALS})


def same(a, b):
    """Symbolic equality of two expressions given as strings or sympy (names only)."""
    ea = parse(a) if isinstance(a, str) else a
    eb = parse(b) if isinstance(b, str) else b
    ea = ea.xreplace({s: sp.Symbol(s.name) for s in ea.free_symbols})
    eb = eb.xreplace({s: sp.Symbol(s.name) for s in eb.free_symbols})
    return sp.simplify(ea - eb) == 0


GD = "optimizer gd\nhyper lr = 0.1\nupdate {\n  w = w - lr * g\n}\n"
RMS = """optimizer rmsprop
hyper lr = 1e-3
hyper beta2 = 0.99
state v = 0
update {
  v = beta2 * v + (1 - beta2) * g^2
  w = w - lr * g / sqrt(v)
}
"""
SRMS = RMS.replace("state v = 0", "state v : scalar = 0").replace("g^2", "sum(g^2)")


def js(spec):
    return json.loads(json.dumps(spec.to_json()))


def test_gd_threshold_two_with_p_lr():
    d = js(derive_text(GD))
    st = d["stability"]
    assert st["bifurcation"] == "flip"
    assert same(st["effective_step"], "lr")
    assert same(st["threshold"], "2") and st["threshold_value"] == 2.0
    assert same(st["critical_curvature"], "2/lr")
    assert same(d["drift"]["w"], "-lr*Eg")


def test_rmsprop_threshold_and_v_drift():
    d = js(derive_text(RMS))
    assert d["states"] == {"v": "slow"}
    st = d["stability"]
    assert same(st["effective_step"], "lr/sqrt(v)")
    assert same(st["threshold"], "2")
    assert same(d["drift"]["v"], "(1-beta2)/beta2*(Eg**2 + Vg - v)")
    assert same(d["drift"]["w"], "-lr*Eg/sqrt(v)")


def test_scalar_rmsprop_uses_sum():
    spec = derive_text(SRMS)
    d = js(spec)
    assert spec.state("v").scalar
    assert same(d["stability"]["threshold"], "2")
    assert same(d["stability"]["effective_step"], "lr/sqrt(v)")
    assert "sum(" in d["drift"]["v"]
    assert same(d["drift"]["v"], "(1-beta2)/beta2*(sum(Eg**2) + sum(Vg) - v)") or same(
        d["drift"]["v"], "(1-beta2)/beta2*(sum(Eg**2 + Vg) - v)"
    )


def test_adam_threshold_fast_m_slow_v():
    spec = build_flow(load_program(str(ROOT / "optimizers" / "adam.opt")))
    d = js(spec)
    assert d["states"] == {"m": "fast", "v": "slow"}
    st = d["stability"]
    assert st["bifurcation"] == "flip"
    assert same(st["threshold"], "2*(1+beta1)/(1-beta1)")
    assert st["threshold_value"] == pytest.approx(38.0)
    assert same(st["effective_step"], "lr/((1-beta1**t)*(sqrt(v/(1-beta2**t)) + eps))")
    assert same(d["drift"]["m"], "(1-beta1)/beta1*(Eg - m)")
    assert same(d["drift"]["v"], "(1-beta2)/beta2*(Eg**2 + Vg - v)")
    # the flip mode: δm = κ δg(w_t), κ = −(1−β1)/(1+β1)
    assert same(d["kappa"]["m"], "-(1-beta1)/(1+beta1)")


@pytest.mark.parametrize("beta1, value", [(0.9, 38.0), (0.5, 6.0), (0.0, 2.0)])
def test_adam_threshold_value_follows_set(beta1, value):
    spec = build_flow(load_program(str(ROOT / "optimizers" / "adam.opt")), {"beta1": beta1})
    assert spec.threshold == pytest.approx(value)


def test_heavy_ball_and_nesterov_thresholds():
    hb = build_flow(load_program(str(ROOT / "optimizers" / "momentum.opt")))
    # m = g + βm, w -= lr m: λ* = 2(1+β)/lr, p = lr/(1−β)
    assert same(hb.stability.critical_curvature, parse("2*(1+beta)/lr"))
    assert same(hb.stability.effective_step, parse("lr/(1-beta)"))
    nest = build_flow(load_program(str(ROOT / "optimizers" / "nesterov.opt")))
    # Nesterov: lr·λ* = 2(1+β)/(1+2β)
    assert same(nest.stability.critical_curvature, parse("2*(1+beta)/(lr*(1+2*beta))"))


def test_adamw_weight_decay_shifts_threshold():
    spec = build_flow(load_program(str(ROOT / "optimizers" / "adamw.opt")))
    assert same(spec.stability.threshold, parse("(1+beta1)*(2 - lr*weight_decay)/(1-beta1)"))


def test_adabelief_mixed_moment_uses_kappa():
    spec = build_flow(load_program(str(ROOT / "optimizers" / "adabelief.opt")))
    assert spec.state("s").kind == "slow" and spec.state("m").kind == "fast"
    # (g − m)² averages to (Eg − m)² + (1 − κ_step)² Vg with κ_step = (1−β1)/(1+β1)
    expect = parse("(1-beta2)/beta2*((Eg-m)**2 + (2*beta1/(1+beta1))**2*Vg + eps/(1-beta2) - s)")
    assert same(spec.state("s").drift, expect)


def test_time_convention_ema_rate():
    spec = derive_text(RMS)
    assert same(spec.state("v").rate, parse("(1-beta2)/beta2*(g**2 - v)"))


def test_counter_state():
    spec = derive_text(
        "optimizer c\nhyper lr = 0.1\nhyper b = 0.9\nstate k = 1\n"
        "update {\n k = b * k\n w = w - lr * g / (1 - k)\n}\n"
    )
    assert spec.state("k").kind == "counter"


@pytest.mark.parametrize(
    "body, fn",
    [
        ("m = beta * m + (1 - beta) * sign(g)\n  w = w - lr * m", "sign(g)"),
        ("m = beta * m + (1 - beta) * g\n  w = w - lr * sign(m)", "sign(m)"),
        ("m = beta * m + (1 - beta) * abs(g)\n  w = w - lr * g", "abs(g)"),
        ("m = beta * m + (1 - beta) * g\n  w = w - lr * max(m, 0)", "max"),
    ],
)
def test_nonsmooth_refused_with_location(body, fn):
    text = f"optimizer x\nhyper lr = 0.1\nhyper beta = 0.9\nstate m = 0\nupdate {{\n  {body}\n}}\n"
    with pytest.raises(DerivationError) as ei:
        derive_text(text)
    msg = ei.value.format()
    assert fn in msg
    assert "test.opt:" in msg and "^" in msg
    # the same file still yields a discrete optimizer
    prog = parse_text(text, "test.opt")
    spec = build_flow(prog, require_central=False)
    assert spec.central_reason and spec.statements


def test_sign_message_matches_issue_wording():
    text = (
        "optimizer x\nhyper lr = 0.1\nhyper beta = 0.9\nstate m = 0\n"
        "update {\n  m = beta * m + (1 - beta) * sign(g)\n  w = w - lr * m\n}\n"
    )
    with pytest.raises(DerivationError) as ei:
        derive_text(text)
    assert "the update of `m` uses sign(g), which has no second-order expansion at 0" in str(
        ei.value.message
    )
    assert ei.value.line == 6


def test_unknown_set_is_usage_error():
    with pytest.raises(UsageError, match="no hyperparameter `lrr`"):
        derive_text(GD, lrr=0.1)


def test_every_library_file_derives_or_refuses_cleanly():
    for f in OPTIMIZERS:
        prog = load_program(str(f))
        spec = build_flow(prog, require_central=False)
        d = spec.to_json()
        assert d["optimizer"] == prog.name
        if spec.has_central:
            assert d["stability"]["bifurcation"] == "flip"
            assert set(d["drift"]) == {"w", *d["flow_states"]}
        assert set(d["flow_states"]) | set(d["delays"]) == set(prog.state_names)


def test_cli_derive_json_no_jax_and_exit_codes(tmp_path):
    code = (
        "import sys, json; from flowgen.cli import main; rc = main(['derive', "
        f"r'{ROOT / 'optimizers' / 'adam.opt'}', '--json']); "
        "assert 'jax' not in sys.modules, 'derive imported jax'; sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["optimizer"] == "adam" and d["stability"]["threshold_value"] == pytest.approx(38)
    bad = tmp_path / "bad.opt"
    bad.write_text("optimizer bad\nupdate {\n  w = w - lr * g\n}\n")
    out = subprocess.run(
        [sys.executable, "-m", "flowgen.cli", "derive", str(bad)], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "bad.opt:3:" in out.stderr


def test_cli_latex_and_report():
    from flowgen.cli import main

    assert main(["derive", str(ROOT / "optimizers" / "rmsprop.opt"), "--latex"]) == 0
    assert main(["derive", str(ROOT / "optimizers" / "adam.opt")]) == 0
