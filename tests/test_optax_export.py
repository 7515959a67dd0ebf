"""Generated optimizers as optax transformations (``flowgen codegen --optax``, ``.optax()``).

The library optimizers that mirror optax (sgd, momentum, nesterov, rmsprop, adam,
adamw) are run for 200 steps on a two-leaf pytree in float64, once as the
generated transformation and once as optax's own, in the same jitted training
loop: the parameters agree to ``1e-12`` relative at every step. Then: reductions
span the whole pytree (the transformation equals flowgen's own step on the
flattened vector), the transformation jits and chains, float32 stays float32
without x64, Adan matches a hand-written numpy Adan, the CLI writes the same
module, and every generated module is already in ruff's format.
"""

import functools
import importlib.util
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import OPTIMIZERS, ROOT
from jax.flatten_util import ravel_pytree

import flowgen
from flowgen.cli import main
from flowgen.errors import UsageError
from flowgen.language import check_program, parse_text

STEPS = 200
RTOL = 1e-12
OPT = {p.stem: p for p in OPTIMIZERS}

# name -> (hyperparameters, optax's own optimizer). The runs move the parameters by 10-100 %
# but stay off the edge of stability: there (e.g. rmsprop at lr 2e-3, beta2 0.95) the 1-ulp
# difference between optax's rsqrt and 1/sqrt doubles every few steps (chaos, not a slip).
CASES = {
    "sgd": ({"lr": 0.05}, lambda h: optax.sgd(h["lr"])),
    "momentum": ({"lr": 0.05, "beta": 0.8}, lambda h: optax.sgd(h["lr"], momentum=h["beta"])),
    "nesterov": (
        {"lr": 0.03, "beta": 0.85},
        lambda h: optax.sgd(h["lr"], momentum=h["beta"], nesterov=True),
    ),
    "rmsprop": (
        {"lr": 1e-3, "beta2": 0.95, "eps": 1e-7},
        lambda h: optax.rmsprop(h["lr"], decay=h["beta2"], eps=h["eps"]),
    ),
    "adam": (
        {"lr": 1e-3, "beta1": 0.85, "beta2": 0.99, "eps": 1e-7},
        lambda h: optax.adam(h["lr"], h["beta1"], h["beta2"], h["eps"]),
    ),
    "adamw": (
        {"lr": 1e-3, "beta1": 0.8, "beta2": 0.995, "eps": 1e-6, "weight_decay": 0.05},
        lambda h: optax.adamw(
            h["lr"], h["beta1"], h["beta2"], h["eps"], weight_decay=h["weight_decay"]
        ),
    ),
}


def two_leaf_problem(dtype=jnp.float64):
    """A small regression with a (5, 3) weight matrix and a (3,) bias: a two-leaf pytree."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(40, 5)), dtype)
    Y = jnp.asarray(np.tanh(rng.normal(size=(40, 3))), dtype)
    params = {
        "W": jnp.asarray(0.3 * rng.normal(size=(5, 3)), dtype),
        "b": jnp.asarray(0.1 * rng.normal(size=3), dtype),
    }

    def loss(p):
        return jnp.mean((jnp.tanh(X @ p["W"] + p["b"]) - Y) ** 2)

    return loss, params


def trajectory(tx, loss, params, steps=STEPS):
    """Flattened parameters after each of ``steps`` optax steps (jitted scan)."""
    grad = jax.grad(loss)

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(grad(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), ravel_pytree(p)[0]

        return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[1]

    return np.asarray(run(params))


@functools.cache
def source(name, **hyper):
    return flowgen.load(OPT[name]).optax_source(**hyper)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_optax_on_a_two_leaf_pytree(name):
    hyper, make = CASES[name]
    loss, params = two_leaf_problem()
    ours = trajectory(flowgen.load(OPT[name]).optax(**hyper), loss, params)
    ref = trajectory(make(hyper), loss, params)
    p0 = np.asarray(ravel_pytree(params)[0])
    moved = np.linalg.norm(ref[-1] - p0) / np.linalg.norm(p0)
    assert moved > 0.05, f"{name}: the parameters moved by only {moved:.3g}"
    assert float(loss(params)) > 1.2 * float(
        loss(jax.tree.map(jnp.asarray, _unravel(params, ref[-1])))
    )
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    print(f"{name}: max rel err {rel.max():.2e}, moved {moved:.3f}")
    assert rel.max() <= RTOL, f"{name}: rel err {rel.max():.3e} at step {int(rel.argmax()) + 1}"


def _unravel(like, flat):
    return ravel_pytree(like)[1](jnp.asarray(flat))


def test_state_holds_the_step_counter_and_the_files_states():
    tx = flowgen.load(OPT["adam"]).optax()
    loss, params = two_leaf_problem()
    state = tx.init(params)
    assert int(state.count) == 0 and state.count.dtype == jnp.int32
    assert set(state.states) == {"m", "v"}
    assert jax.tree.structure(state.states["m"]) == jax.tree.structure(params)
    _, state = tx.update(jax.grad(loss)(params), state, params)
    _, state = tx.update(jax.grad(loss)(params), state, params)
    assert int(state.count) == 2


REDUCE_OPT = """\
optimizer reduce "every reduction, over the whole pytree"
hyper lr = 0.05
hyper beta = 0.9
state v : scalar = 1
state m = 0
update {
    v = beta * v + (1 - beta) * (mean(g^2) + 0.1 * norm(g))
    m = beta * m + (1 - beta) * g * (1 + sum(g * w))
    w = w - lr * m / sqrt(v)
}
"""


def _file(tmp_path, text, name):
    path = tmp_path / f"{name}.opt"
    path.write_text(textwrap.dedent(text))
    return flowgen.load(path)


def test_reductions_span_the_whole_pytree():
    """scalar_rmsprop on a two-leaf pytree equals flowgen's own step on the flattened
    parameter vector, where sum runs over all coordinates."""
    of = flowgen.load(OPT["scalar_rmsprop"])
    opt = of.optimizer(lr=0.02)
    loss, params = two_leaf_problem()
    flat0, unravel = ravel_pytree(params)
    grad_flat = jax.jit(jax.grad(lambda x: loss(unravel(x))))
    w, s = flat0, opt.init(flat0)
    ours = trajectory(of.optax(lr=0.02), loss, params, steps=30)
    for t in range(1, 31):
        w, s = opt.step(w, s, grad_flat(w), float(t))
        np.testing.assert_allclose(ours[t - 1], np.asarray(w), rtol=1e-13, atol=1e-15)
    assert np.linalg.norm(np.asarray(w) - np.asarray(flat0)) > 1e-2


def test_mean_norm_and_sum_against_numpy(tmp_path):
    """mean divides by the number of coordinates of all leaves; norm and sum run over all."""
    of = _file(tmp_path, REDUCE_OPT, "reduce")
    loss, params = two_leaf_problem()
    flat0, unravel = ravel_pytree(params)
    grad_flat = jax.grad(lambda x: loss(unravel(x)))
    ours = trajectory(of.optax(), loss, params, steps=20)
    w, v, m = np.asarray(flat0), 1.0, np.zeros(flat0.size)
    for t in range(20):
        g = np.asarray(grad_flat(jnp.asarray(w)))
        v = 0.9 * v + 0.1 * (np.mean(g**2) + 0.1 * np.linalg.norm(g))
        m = 0.9 * m + 0.1 * g * (1 + np.sum(g * w))
        w = w - 0.05 * m / np.sqrt(v)
        np.testing.assert_allclose(ours[t], w, rtol=1e-13)


def test_jit_and_chain():
    loss, params = two_leaf_problem()
    g = jax.grad(loss)(params)
    tx = flowgen.load(OPT["adamw"]).optax(lr=1e-2)
    s = tx.init(params)
    u_eager, _ = tx.update(g, s, params)
    u_jit, _ = jax.jit(tx.update)(g, s, params)
    for a, b in zip(jax.tree.leaves(u_eager), jax.tree.leaves(u_jit), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    chained = optax.chain(optax.clip_by_global_norm(1e-3), tx)
    uc, sc = chained.update(g, chained.init(params), params)
    gc = jax.tree.map(lambda x: x * 1e-3 / optax.tree.norm(g), g)
    u_ref, _ = tx.update(gc, tx.init(params), params)
    for a, b in zip(jax.tree.leaves(uc), jax.tree.leaves(u_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert int(sc[1].count) == 1


def test_parameters_required_when_the_rule_reads_w():
    loss, params = two_leaf_problem()
    tx = flowgen.load(OPT["adamw"]).optax()
    with pytest.raises(ValueError, match="pass params"):
        tx.update(jax.grad(loss)(params), tx.init(params))
    sgd = flowgen.load(OPT["sgd"]).optax(lr=0.1)  # does not read w
    u, _ = sgd.update(jax.grad(loss)(params), sgd.init(params))
    np.testing.assert_allclose(u["b"], -0.1 * jax.grad(loss)(params)["b"], rtol=1e-15)


def test_float32_stays_float32_without_x64():
    code = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp, numpy as np, flowgen
        assert not jax.config.jax_enable_x64
        params = {{"W": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}}
        for name in ("adam", "adan", "scalar_rmsprop"):
            tx = flowgen.load(r"{ROOT}/optimizers/" + name + ".opt").optax()
            s = tx.init(params)
            g = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
            u, s = jax.jit(tx.update)(g, s, params)
            u, s = jax.jit(tx.update)(g, s, params)
            leaves = jax.tree.leaves((u, s.states))
            assert all(x.dtype == jnp.float32 for x in leaves), [x.dtype for x in leaves]
            assert s.count.dtype == jnp.int32
        assert not jax.config.jax_enable_x64
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("ok")


def numpy_adan(params, grads, lr, beta1, beta2, beta3, eps, bias_correction=True):
    """Adan by hand (Xie et al., 2022; the previous gradient starts at 0)."""
    b1, b2, b3 = beta1, beta2, beta3
    keys = list(params)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    d = {k: np.zeros_like(v) for k, v in params.items()}
    n = {k: np.zeros_like(v) for k, v in params.items()}
    gp = {k: np.zeros_like(v) for k, v in params.items()}
    p = {k: v.copy() for k, v in params.items()}
    for t, g in enumerate(grads, start=1):
        for k in keys:
            diff = g[k] - gp[k]
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            d[k] = b2 * d[k] + (1 - b2) * diff
            n[k] = b3 * n[k] + (1 - b3) * (g[k] + b2 * diff) ** 2
            if bias_correction:
                c1, c2, c3 = 1 - b1**t, 1 - b2**t, 1 - b3**t
            else:
                c1 = c2 = c3 = 1.0
            p[k] = p[k] - lr * (m[k] / c1 + b2 * d[k] / c2) / (np.sqrt(n[k] / c3) + eps)
            gp[k] = g[k]
    return p


@pytest.mark.parametrize("name", ["adan", "adan_nobc"])
def test_adan_matches_numpy_by_hand(name):
    hyper = {"lr": 0.01, "beta1": 0.9, "beta2": 0.8, "beta3": 0.95, "eps": 1e-3}
    tx = flowgen.load(OPT[name]).optax(**hyper)
    rng = np.random.default_rng(4)
    params = {"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(6)]
    p = {k: jnp.asarray(v) for k, v in params.items()}
    s = tx.init(p)
    for g in grads:
        u, s = tx.update({k: jnp.asarray(v) for k, v in g.items()}, s, p)
        p = optax.apply_updates(p, u)
    ref = numpy_adan(params, grads, **hyper, bias_correction=(name == "adan"))
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-13)


def test_unknown_hyperparameter_is_a_usage_error():
    with pytest.raises(UsageError, match="no hyperparameter `lrr`"):
        flowgen.load(OPT["adam"]).optax(lrr=0.1)


def import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_codegen_optax(tmp_path):
    out = tmp_path / "adan_tx.py"
    assert main(["codegen", str(OPT["adan"]), "--optax", "--set", "lr=0.02", "-o", str(out)]) == 0
    assert out.read_text() == flowgen.load(OPT["adan"]).optax_source(lr=0.02)
    mod = import_file(out, "adan_tx")
    assert mod.HYPER["lr"] == 0.02
    tx = mod.transformation(beta1=0.5)
    loss, params = two_leaf_problem()
    u, s = tx.update(jax.grad(loss)(params), tx.init(params), params)
    assert set(s.states) == {"m", "d", "n", "gp"}
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        mod.transformation(nope=1.0)


def test_every_library_file_exports_and_is_ruff_formatted(tmp_path):
    """Every library file (signum too: no derivation is needed) gives a module that runs
    one step and that ruff would leave unchanged."""
    loss, params = two_leaf_problem()
    g = jax.grad(loss)(params)
    for path in OPTIMIZERS:
        of = flowgen.load(path)
        src = of.optax_source()
        f = tmp_path / f"{path.stem}_optax.py"
        f.write_text(src)
        res = subprocess.run(
            [sys.executable, "-m", "ruff", "format", "--isolated", "--line-length", "100"]
            + ["--check", str(f)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, path.stem + res.stdout + res.stderr
        res = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--config"]
            + [str(ROOT / "pyproject.toml"), "--ignore", "E501", str(f)],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, path.stem + res.stdout + res.stderr
        tx = of.optax()
        u, _ = tx.update(g, tx.init(params), params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u)), path.stem


def test_names_of_the_generated_module_are_escaped():
    prog = parse_text(
        textwrap.dedent(
            """\
            optimizer clash "names the optax module uses"
            hyper optax = 0.1
            hyper count = 0.5
            state states = 0
            update {
                states = count * states + g
                jax = optax * states
                w = w - jax
            }
            """
        ),
        "clash.opt",
    )
    check_program(prog)
    from flowgen.codegen import load_module
    from flowgen.codegen.optaxgen import generate_optax

    mod = load_module(generate_optax(prog), "clash_optax")
    tx = mod.transformation()
    params = {"a": jnp.ones(3)}
    g = {"a": jnp.full(3, 2.0)}
    u, s = tx.update(g, tx.init(params), params)
    u, s = tx.update(g, s, params)
    # states: 2, then 0.5*2 + 2 = 3; step -0.1*states
    np.testing.assert_allclose(u["a"], -0.1 * 3.0 * np.ones(3), rtol=1e-15)
    np.testing.assert_allclose(s.states["states"]["a"], 3.0 * np.ones(3), rtol=1e-15)


def test_user_training_loop_example_trains():
    """examples/train_with_adan.py: minibatch Adan (from its .opt file) inside optax.chain,
    in float32, reaches a useful accuracy quickly."""
    example = import_file(ROOT / "examples" / "train_with_adan.py", "train_with_adan")
    lines = []
    acc = example.train(steps=200, log=lines.append)
    assert acc > 0.9, lines
    assert lines[0].startswith("step    1") and "test accuracy" in lines[-1]
