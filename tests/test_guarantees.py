"""A compiler's guarantees for `.opt` (issue 11): one regression test per class of bug,
each with the reproducer the issue reported, run through the real command or API.

Classes: wrong values; tracebacks; hangs; complex numbers; ``codegen`` refusing
well-formed files; minor (unlocated error, a "fold" at a negative learning rate).
Plus the machinery: the two levels of acceptance, the language limits, the
derivation's budgets (AST limits, CPU time, preemption and its clean-up).
"""

from __future__ import annotations

import ast
import signal
import threading
import time
import traceback

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT

import flowgen
from flowgen.api import OptFile
from flowgen.cli import main
from flowgen.codegen import generate, load_module
from flowgen.errors import DerivationError, FlowgenError, OptCheckError, UsageError
from flowgen.flow import build_flow
from flowgen.flow.discrete import build_discrete
from flowgen.language import check_program, parse_text
from flowgen.language.limits import MAX_DEPTH
from flowgen.symbolic import budget

HEAD = "optimizer x\nhyper lr = 0.1\nstate s : scalar = 0\nstate m = 0\n"


def program(body: str, head: str = HEAD):
    prog = parse_text(head + "update {\n" + body + "\n}\n", "x.opt")
    check_program(prog)
    return prog


def module(body: str, head: str = HEAD, **hyper):
    """The module ``flowgen codegen`` writes (derivation included when it succeeds)."""
    return load_module(OptFile(program(body, head)).codegen(**hyper), "x")


def cli(tmp_path, capsys, text: str, *argv: str) -> tuple[int, str, str]:
    path = tmp_path / "x.opt"
    path.write_text(text)
    capsys.readouterr()
    rc = main([argv[0], str(path), *argv[1:]])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def step_once(mod, n=4, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=n))
    g = jnp.asarray(rng.normal(size=n))
    state = mod.init_state(w)
    return w, g, *mod.step(w, state, g, 1)


# ------------------------------------------------------------------ wrong values


@pytest.mark.parametrize(
    "body, expected",
    [
        ("d = sum(g*0 + 1)\n  w = w - lr * d * g", lambda w, g: w - 0.1 * 4 * g),
        ("d = norm(g*0 + 1)\n  w = w - lr * d * g", lambda w, g: w - 0.1 * 2 * g),
        ("s = sum(g*0 + 1)\n  w = w - lr * s * g", lambda w, g: w - 0.1 * 4 * g),
    ],
)
def test_reduction_of_a_folded_constant_keeps_its_size(body, expected):
    mod = module(body)
    w, g, w1, _ = step_once(mod)
    np.testing.assert_allclose(w1, expected(w, g), rtol=1e-14)


def test_reduction_of_a_constant_in_the_flow_parts_keeps_its_size():
    """sympy folds g*0 + 1 to 1; the rates must still sum n ones."""
    src = OptFile(program("d = sum(g*0 + 1)\n  s = 0.5 * s + d\n  w = w - lr * g / s"))
    src = src.codegen()
    assert "jnp.sum(jnp.full_like(w, 1.0))" in src
    mod = load_module(src, "x")
    assert mod.HAS_FLOW
    w = jnp.ones(5)
    _, rates = mod.rates(w, {"s": jnp.asarray(2.0), "m": w}, w, 3.0)
    # s_new = s/2 + 5, so s_old = 2 (s_new - 5): ds/dt = s_new - s_old = 10 - s
    np.testing.assert_allclose(rates["s"], 10.0 - 2.0, rtol=1e-14)


@pytest.mark.parametrize(
    "body", ["w = w - w", "m = lr\n  w = lr", "m = sum(g)\n  s = 2\n  w = w * 0 + 3"]
)
def test_every_state_and_w_keep_the_shape_of_w(body):
    mod = module(body)
    w, g, w1, s1 = step_once(mod, n=3)
    assert w1.shape == (3,) and w1.dtype == jnp.float64
    assert s1["m"].shape == (3,)
    assert s1["s"].shape == ()


def test_w_minus_w_is_zeros_shaped_like_w():
    mod = module("w = w - w")
    _, _, w1, _ = step_once(mod, n=3)
    np.testing.assert_array_equal(w1, np.zeros(3))


def test_big_literals_are_float_literals(tmp_path, capsys):
    rc, out, _ = cli(
        tmp_path, capsys, HEAD + "update {\n  w = w - lr * 1e20 * g * 1e-20\n}\n", "codegen"
    )
    assert rc == 0
    numbers = [
        n.value
        for n in ast.walk(ast.parse(out))
        if isinstance(n, ast.Constant) and type(n.value) in (int, float)
    ]
    assert 1e20 in numbers and all(type(x) is float for x in numbers)  # no int beyond int64
    mod = load_module(out, "big")
    w, g, w1, _ = step_once(mod)
    np.testing.assert_allclose(w1, w - 0.1 * g, rtol=1e-14)


def test_literals_round_trip_exactly():
    text = "0.1 0.3 1e-8 2.5e-310 123456789.123456789 1e308 0.7000000000000001".split()
    body = "\n".join(f"  a{i} = {x}" for i, x in enumerate(text)) + "\n  w = w"
    src = OptFile(program(body)).codegen()
    tree = ast.parse(src)
    step = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "step")
    values = {
        a.targets[0].id: a.value.value
        for a in step.body
        if isinstance(a, ast.Assign) and isinstance(a.value, ast.Constant)
    }
    for i, x in enumerate(text):
        expected = float(x) if abs(float(x)) >= 2.2250738585072014e-308 else 0.0
        assert values[f"a{i}"] == expected  # subnormals flush to zero, as XLA does


# ------------------------------------------------------------------ tracebacks


@pytest.mark.parametrize("value", ["inf", "-inf", "1e999", "nan"])
@pytest.mark.parametrize("command", ["derive", "codegen"])
def test_non_finite_set_is_refused_with_the_name(tmp_path, capsys, value, command):
    gd = (ROOT / "optimizers" / "gd.opt").read_text()
    rc, out, err = cli(tmp_path, capsys, gd, command, "--set", f"lr={value}")
    assert rc == 2 and out == ""
    assert f"--set lr={value}: the value of `lr` must be a finite number" in err


def test_non_finite_hyper_is_refused_by_the_api():
    gd = flowgen.load(ROOT / "optimizers" / "gd.opt")
    for bad in (float("nan"), float("inf"), "abc", None):
        with pytest.raises(UsageError, match="`lr`|not a number"):
            gd.codegen(lr=bad)
    with pytest.raises(UsageError, match="no hyperparameter `lrr`"):
        gd.optimizer(lrr=0.1)


@pytest.mark.parametrize("value", ["1e308", "1e300", "-1e308", "5e-324"])
def test_huge_learning_rates_derive_without_traceback(tmp_path, capsys, value):
    gd = (ROOT / "optimizers" / "gd.opt").read_text()
    rc, out, err = cli(tmp_path, capsys, gd, "derive", "--json", "--set", f"lr={value}")
    assert rc in (0, 2), err
    assert "LinAlgError" not in err and "internal error" not in err


def test_set_whose_use_overflows_is_refused_with_the_name(tmp_path, capsys):
    text = "optimizer x\nhyper lr = 0.1\nupdate {\n  w = w - lr * 1e10 * g\n}\n"
    rc, _, err = cli(tmp_path, capsys, text, "codegen", "--set", "lr=1e300")
    assert rc == 2
    assert "--set lr=1e+300: `lr * 1e10` overflows float64" in err
    assert "x.opt:4:" in err


@pytest.mark.parametrize(
    "expr, col", [("exp(710)", 16), ("2^1024", 17), ("10^400", 18), ("(1e300 * 1e300)", 23)]
)
def test_overflowing_constants_are_located_errors(tmp_path, capsys, expr, col):
    text = HEAD + f"update {{\n  w = w - lr*g*{expr}\n}}\n"
    for command in ("derive", "codegen"):
        rc, out, err = cli(tmp_path, capsys, text, command)
        assert rc == 2 and out == ""
        assert f"x.opt:6:{col}: error: `" in err and "overflows float64" in err


def test_hyper_default_out_of_range_is_located():
    with pytest.raises(OptCheckError, match="value of hyper `lr` is too large") as info:
        program("w = w - lr * g", head="optimizer x\nhyper lr = 1e999\n")
    assert (info.value.line, info.value.column) == (2, 7)
    with pytest.raises(OptCheckError, match=r"`2 \* lr` overflows float64 with lr = 1e\+308"):
        program("w = w - 2 * lr * g", head="optimizer x\nhyper lr = 1e308\n")


@pytest.mark.parametrize("local", ["1/0", "log(0)", "-1/0", "0/0"])
def test_constant_division_by_zero_in_an_unused_local(tmp_path, capsys, local):
    text = HEAD + f"update {{\n  a = {local}\n  w = w - lr * g\n}}\n"
    rc, out, err = cli(tmp_path, capsys, text, "codegen")
    assert rc == 0 and "ComplexInfinity" not in err
    assert "no flow parts" in err  # the derivation refuses non-finite constants
    w, g, w1, _ = step_once(load_module(out, "x"))
    np.testing.assert_allclose(w1, w - 0.1 * g, rtol=1e-15)
    rc, _, err = cli(tmp_path, capsys, text, "derive")
    assert rc == 2 and "x.opt:6:" in err and "finite real constants" in err


def test_max_of_a_constant_mean_derives():
    spec = build_flow(program("d = max(1, mean(g/g))\n  w = w - lr * g * d"))
    assert spec.threshold == pytest.approx(2.0)
    w, g, w1, _ = step_once(module("d = max(1, mean(g/g))\n  w = w - lr * g * d"))
    np.testing.assert_allclose(w1, w - 0.1 * g, rtol=1e-15)


@pytest.mark.parametrize(
    "body, col",
    [("w = min(1e-30, log(0 - 0.5 - lr))", 16), ("w = w - sqrt(-lr) * g", 9)],
)
def test_values_known_not_real_are_located_refusals_of_the_derivation(body, col):
    """found by the fuzzer: sympy raised "not comparable" inside Min"""
    with pytest.raises(DerivationError, match="is not a real number") as info:
        build_flow(program(body))
    assert (info.value.line, info.value.column) == (6, col)
    _, _, w1, _ = step_once(module(body))
    assert np.all(np.isnan(w1))


@pytest.mark.parametrize("expr", ["exp(" * 200 + "g" + ")" * 200, "g" + "^g" * 200])
def test_deep_nesting_is_a_located_error(tmp_path, capsys, expr):
    text = HEAD + f"update {{\n  w = {expr}\n}}\n"
    for command in ("derive", "codegen"):
        rc, _, err = cli(tmp_path, capsys, text, command)
        assert rc == 2
        assert "x.opt:6:" in err and "nests 200 operations (the limit is 100)" in err


def test_redundant_parentheses_nest_nothing(tmp_path, capsys):
    text = HEAD + "update {\n  w = w - lr * " + "(" * 1000 + "g" + ")" * 1000 + "\n}\n"
    rc, out, _ = cli(tmp_path, capsys, text, "codegen")
    assert rc == 0
    w, g, w1, _ = step_once(load_module(out, "x"))
    np.testing.assert_allclose(w1, w - 0.1 * g, rtol=1e-15)


def test_depth_limit_is_exact():
    ok = "exp(" * (MAX_DEPTH - 2) + "g" + ")" * (MAX_DEPTH - 2)
    mod = module(f"w = w - lr * {ok}")  # depth MAX_DEPTH: accepted, and Python compiles it
    assert not mod.HAS_FLOW  # the derivation's own limit is lower
    w, g, w1, _ = step_once(mod)
    assert w1.shape == w.shape
    too_deep = "exp(" * (MAX_DEPTH - 1) + "g" + ")" * (MAX_DEPTH - 1)
    with pytest.raises(OptCheckError, match=f"nests {MAX_DEPTH + 1} operations"):
        program(f"w = w - lr * {too_deep}")


# ------------------------------------------------------------------ hangs


@pytest.mark.parametrize("expr", ["9^9^9", "2^2^2^2^2^2", "2^2^2^2^2"])
def test_power_towers_are_refused_at_once(tmp_path, capsys, expr):
    text = HEAD + f"update {{\n  w = w - lr*g*{expr}\n}}\n"
    tic = time.perf_counter()
    rc, _, err = cli(tmp_path, capsys, text, "derive")
    assert rc == 2 and "overflows float64" in err and "x.opt:6:" in err
    assert time.perf_counter() - tic < 2


def test_large_constant_exponent_is_refused_by_the_derivation_only():
    prog = program("w = w - lr * g * 1.0001^1000")
    with pytest.raises(DerivationError, match="exponent `1000`.*larger than 64") as info:
        build_flow(prog)
    assert (info.value.line, info.value.column) == (6, 24)
    w, g, w1, _ = step_once(module("w = w - lr * g * 1.0001^1000"))
    np.testing.assert_allclose(w1, w - 0.1 * g * 1.0001**1000, rtol=1e-14)


def test_nested_exponentials_hit_the_time_budget_naming_the_statement(tmp_path, capsys):
    body = "a = m\n  w = w - lr*" + "exp(" * 12 + "g" + ")" * 12
    tic = time.process_time()
    with pytest.raises(budget.BudgetExceeded) as info:
        build_flow(program(body), time_budget=1.0)
    assert time.process_time() - tic < 3.0
    assert info.value.line == 7  # the statement of w
    assert "ran out of its time budget (1 s of CPU) while deriving" in info.value.message
    # codegen still writes the discrete step
    spec = build_flow(program(body), require_flow=False, time_budget=0.5)
    assert not spec.has_flow and "time budget" in spec.flow_reason
    mod = load_module(generate(spec), "x")
    assert not mod.HAS_FLOW and "time budget" in mod.NO_FLOW_REASON


def test_adabelief_with_a_typo_is_refused_within_the_budget():
    text = (ROOT / "optimizers" / "adabelief.opt").read_text().replace("(g - m)^2", "(2 - m)^2")
    prog = parse_text(text, "adabelief.opt")
    check_program(prog)
    tic = time.process_time()
    try:
        build_flow(prog, require_central=False)
    except DerivationError as err:
        assert err.location is not None
    assert time.process_time() - tic < budget.DERIVATION_SECONDS + 1.5


def test_time_budget_preempts_one_long_sympy_call_and_cleans_up():
    import sympy as sp

    prog = program("w = w - lr * g")
    x = sp.symbols("x0:12")
    big = sp.Mul(*[sum(x) + i for i in range(6)])
    assert signal.getsignal(signal.SIGPROF) == signal.SIG_DFL
    tic = time.process_time()
    with pytest.raises(budget.BudgetExceeded), budget.time_budget(prog, 0.3):
        sp.factor(sp.expand(big))  # seconds of work in one call
    assert time.process_time() - tic < 2.0
    assert signal.getsignal(signal.SIGPROF) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_time_budget_in_a_thread_is_cooperative():
    prog = program("w = w - lr * g")
    seen = []

    def work():
        try:
            with budget.time_budget(prog, 0.05):
                end = time.process_time() + 1.0
                while time.process_time() < end:
                    budget.check()
        except budget.BudgetExceeded as err:
            seen.append(err)

    th = threading.Thread(target=work)
    th.start()
    th.join(10)
    assert len(seen) == 1
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


def test_time_budget_leaves_a_finished_derivation_alone():
    spec = build_flow(parse_text((ROOT / "optimizers" / "adam.opt").read_text(), "adam.opt"))
    assert spec.threshold == pytest.approx(38.0)
    assert signal.getsignal(signal.SIGPROF) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_PROF) == (0.0, 0.0)


# ------------------------------------------------------------------ complex numbers


@pytest.mark.parametrize("expr", ["(-8)^(1/3)", "sqrt(-1)", "(lr - 1)^0.5", "log(-lr)"])
def test_non_real_values_are_nan_never_complex(expr):
    mod = module(f"m = m + {expr}\n  w = w - lr * g * {expr}")
    w, g, w1, s1 = step_once(mod)
    for x in (w1, s1["m"]):
        assert x.dtype == jnp.float64 and np.all(np.isnan(x))


@pytest.mark.parametrize("expr", ["(-8)^(1/3)", "sqrt(-1)"])
def test_non_real_constants_are_refused_by_the_derivation_with_location(tmp_path, capsys, expr):
    text = HEAD + f"update {{\n  w = w - lr * {expr} * g\n}}\n"
    rc, _, err = cli(tmp_path, capsys, text, "derive")
    assert rc == 2 and "x.opt:6:" in err
    assert "not a number (nan)" in err and "neimark" not in err.lower()


# ------------------------------------------------------------ codegen refusals

AMSGRAD = """optimizer amsgrad "AMSGrad"
hyper lr = 1e-3
hyper beta1 = 0.9
hyper beta2 = 0.999
hyper eps = 1e-8
state m = 0
state v = 0
state vm = 0
update {
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    vm = max(vm, v)
    w = w - lr * m / (sqrt(vm) + eps)
}
"""


def _amsgrad(w, grads):
    m = v = vm = np.zeros_like(w)
    for g in grads:
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g**2
        vm = np.maximum(vm, v)
        w = w - 1e-3 * m / (np.sqrt(vm) + 1e-8)
    return w


def test_codegen_writes_amsgrad_and_says_why_there_is_no_flow(tmp_path, capsys):
    rc, out, err = cli(tmp_path, capsys, AMSGRAD, "codegen")
    assert rc == 0
    assert "discrete step only" in err and "x.opt:12:5" in err
    mod = load_module(out, "amsgrad")
    assert not mod.HAS_FLOW and "x.opt:12:5: " in mod.NO_FLOW_REASON
    assert "No flow parts" in ast.get_docstring(ast.parse(out))
    rng = np.random.default_rng(3)
    w0, grads = rng.normal(size=5), [rng.normal(size=5) for _ in range(4)]
    w, state = jnp.asarray(w0), mod.init_state(jnp.asarray(w0))
    for t, g in enumerate(grads, start=1):
        w, state = mod.step(w, state, jnp.asarray(g), t)
    np.testing.assert_allclose(w, _amsgrad(w0, grads), rtol=1e-13)
    for fn, args in ((mod.rates, (w, state, w, 1.0)), (mod.drift, (w, state, w, w, 1.0))):
        with pytest.raises(NotImplementedError, match="x.opt:12:5"):
            fn(*args)
    assert mod.precond(w, state, 1.0) is None and mod.threshold() is None


@pytest.mark.parametrize(
    "body, reference",
    [
        ("w = w - lr * g / norm(g)", lambda w, g: w - 0.1 * g / np.linalg.norm(g)),
        ("s = 0.9 * s + sum(g)\n  w = w - lr * g * s", lambda w, g: w - 0.1 * g * np.sum(g)),
        ("d = 2 * g - m\n  m = g\n  w = w - lr * d", lambda w, g: w - 0.1 * 2 * g),
    ],
    ids=["normalised-gd", "scalar-state-of-sum", "previous-gradient"],
)
def test_codegen_accepts_what_the_derivation_refuses(tmp_path, capsys, body, reference):
    text = HEAD + "update {\n  " + body + "\n}\n"
    rc, out, _ = cli(tmp_path, capsys, text, "codegen")
    assert rc == 0
    w, g, w1, _ = step_once(load_module(out, "x"))
    np.testing.assert_allclose(w1, reference(np.asarray(w), np.asarray(g)), rtol=1e-13)


def test_optimizer_and_discrete_process_never_need_the_derivation():
    opt = OptFile(parse_text(AMSGRAD, "amsgrad.opt")).optimizer()
    assert not opt.spec.has_flow and opt.threshold is None and not opt.has_precond
    w = jnp.ones(3)
    w1, _ = opt.step(w, opt.init(w), w, 1.0)
    assert w1.shape == (3,) and np.all(np.isfinite(w1))
    np.testing.assert_array_equal(opt.effective_step(w, opt.init(w), 1.0), np.ones(3))


def test_run_without_a_flow_runs_the_discrete_optimizer_alone():
    res = OptFile(parse_text(AMSGRAD, "amsgrad.opt")).run(
        "quadratic", steps=6, eig_every=3, chunk=3
    )
    s = res.series
    assert np.all(np.isfinite(s["loss_discrete"][2:])) and np.all(np.isnan(s["loss_stable"][2:]))
    assert np.isfinite(s["sharpness_discrete"][3]) and res.threshold is None
    assert "amsgrad.opt:12:5" in res.info["no_flow_reason"]


# ------------------------------------------------------------------ minor


def test_reserved_gradient_moment_name_is_located(tmp_path, capsys):
    text = "optimizer x\nhyper Eg = 0.1\nupdate {\n  w = w - Eg * g\n}\n"
    rc, _, err = cli(tmp_path, capsys, text, "derive")
    assert rc == 2 and "x.opt:2:7: error: `Eg` is reserved" in err
    rc, out, _ = cli(tmp_path, capsys, text, "codegen")
    assert rc == 0
    w, g, w1, _ = step_once(load_module(out, "x"))
    np.testing.assert_allclose(w1, w - 0.1 * g, rtol=1e-15)


def test_negative_learning_rate_is_unstable_at_every_curvature():
    spec = flowgen.load(ROOT / "optimizers" / "gd.opt").derive(require_central=False, lr=-0.1)
    assert spec.stability.bifurcation == "none"
    assert "unstable at every curvature" in spec.stability.note
    assert spec.threshold is None


# ------------------------------------------------------------------ the levels


def test_every_flowgen_error_of_a_generated_module_is_located():
    """Errors raised late (derivation) point back at the statement."""
    with pytest.raises(FlowgenError) as info:
        build_flow(parse_text(AMSGRAD, "amsgrad.opt"))
    assert (info.value.line, info.value.column) == (12, 5)
    text = "".join(traceback.format_exception_only(info.value))
    assert "amsgrad.opt:12:5" in text


def test_discrete_level_does_not_depend_on_the_derivation(monkeypatch):
    """A bare DiscreteSpec prints a module; and a derivation that crashes (an internal
    error) costs the flow parts only, with a located reason."""
    d = build_discrete(parse_text(AMSGRAD, "amsgrad.opt"))
    mod = load_module(generate(d, reason="not derived here"), "amsgrad")
    assert mod.NO_FLOW_REASON == "not derived here" and not mod.HAS_FLOW

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("flowgen.flow.build._stages", boom)
    gd = flowgen.load(ROOT / "optimizers" / "gd.opt")
    mod = load_module(gd.codegen(), "gd")
    assert not mod.HAS_FLOW and "internal error" in mod.NO_FLOW_REASON
    assert "boom" in mod.NO_FLOW_REASON and "gd.opt:" in mod.NO_FLOW_REASON
    with pytest.raises(DerivationError, match="internal error"):
        gd.derive()
