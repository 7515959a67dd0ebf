"""The built-in architectures: values, derivatives to third order, determinism, data, layers,
options and the ``flowgen problems`` listing. Tiny sizes: the whole file runs in well under
a minute."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from jax.flatten_util import ravel_pytree

from flowgen.cli import main
from flowgen.errors import ProblemError
from flowgen.problems import REGISTRY, builtin_names, data, get_problem, losses, nn
from flowgen.problems.zoo.lstm import lstm_layer
from flowgen.problems.zoo.mamba import selective_scan
from flowgen.runtime.derivatives import third_contractions

ARCHITECTURES = ("mlp", "cnn", "resnet", "vit", "lstm", "transformer", "mamba")

#: Tiny options per architecture (a few hundred parameters, a handful of examples).
TINY = {
    "mlp": {"n": 12, "width": 5, "depth": 2},
    "cnn": {"n": 12, "channels": 3, "depth": 2},
    "resnet": {"n": 12, "channels": 4, "depth": 1, "groups": 2},
    "vit": {"n": 12, "width": 4, "depth": 1, "heads": 2},
    "lstm": {"n": 6, "length": 3, "width": 4, "depth": 2},
    "transformer": {"n": 6, "length": 3, "width": 4, "depth": 1, "heads": 2},
    "mamba": {"n": 6, "length": 3, "width": 4, "depth": 1, "state": 2},
}

CASES = [(name, crit) for name in ARCHITECTURES for crit in ("mse", "ce")]


def _directions(n: int, k: int, seed: int) -> jax.Array:
    """``k`` random unit vectors, (n, k)."""
    u = np.random.default_rng(seed).standard_normal((n, k))
    return jnp.asarray(u / np.linalg.norm(u, axis=0))


EPS_GRAD = 1e-5  # central differences of the loss for the gradient
EPS_THIRD = 4e-3  # third differences of the loss, with Richardson extrapolation (ε, ε/2)
SIGNS3 = np.array([[a, b, c] for a in (1, -1) for b in (1, -1) for c in (1, -1)])  # (8, 3)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _third_difference(values: jax.Array, eps: float) -> jax.Array:
    """``∂³L[a, b, c] ≈ Σ_s s₁s₂s₃ L(w + ε(s₁a + s₂b + s₃c)) / (8ε³)``, error O(ε²)."""
    return values @ jnp.asarray(SIGNS3.prod(axis=1), dtype=values.dtype) / (8 * eps**3)


def _setup(name: str, crit: str):
    """A tiny problem, a generic point ``w`` near ``w0`` and unit directions ``U``, ``V``."""
    p = get_problem(name, criterion=crit, **TINY[name])
    w = p.w0 + 0.1 * jnp.asarray(np.random.default_rng(1).standard_normal(p.n))
    return p, w, _directions(p.n, 2, seed=2), _directions(p.n, 2, seed=3)  # U, V (n, 2)


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{c}" for a, c in CASES])
def probe(request):
    """Loss and gradient at ``w``, and the loss at ``w ± ε v`` for the two ``v`` in ``V``."""
    p, w, _, V = _setup(*request.param)
    steps = jnp.concatenate([V.T, -V.T])  # (4, n): +v0, +v1, -v0, -v1

    def compute(w):
        return {
            "loss": p.loss(w),
            "grad": jax.grad(p.loss)(w),
            "loss_shifted": jax.vmap(p.loss)(w + EPS_GRAD * steps),  # (4,)
        }

    compiled = jax.jit(compute).lower(w).compile(compiler_options=FAST_COMPILE)
    return p, V, {k: np.asarray(v) for k, v in compiled(w).items()}


#: Third derivatives: every architecture with the default criterion (mse: all of the
#: network's derivatives up to the third enter), and cross-entropy's own third derivative
#: on the mlp. (Each case compiles a third-order graph: ~10 s for a transformer.)
THIRD_CASES = [(name, "mse") for name in ARCHITECTURES] + [("mlp", "ce")]


@pytest.fixture(scope="module", params=THIRD_CASES, ids=[f"{a}-{c}" for a, c in THIRD_CASES])
def probe3(request):
    """flowgen's third-derivative contractions ``G[i, j] = ∇(u_iᵀ H(w) u_j)`` at ``w``, and
    the loss on the stencils of third differences along ``(u_0, u_1, v_0)`` and
    ``(u_1, u_1, v_1)``. Compiled without XLA's expensive optimisations (the test is
    about the maths, and the third-order graph is large)."""
    p, w, U, V = _setup(*request.param)
    triples = [(U[:, 0], U[:, 1], V[:, 0]), (U[:, 1], U[:, 1], V[:, 1])]
    stencil = jnp.stack(  # (2 triples, 8, n): s₁a + s₂b + s₃c
        [jnp.asarray(SIGNS3, dtype=jnp.float64) @ jnp.stack(t) for t in triples]
    )

    def compute(w):
        on_stencil = jax.vmap(jax.vmap(p.loss))
        return {
            "third": third_contractions(p.loss, w, U),  # (2, 2, n)
            "stencil": on_stencil(w + EPS_THIRD * stencil),  # (2, 8)
            "stencil_half": on_stencil(w + 0.5 * EPS_THIRD * stencil),  # (2, 8)
        }

    compiled = jax.jit(compute).lower(w).compile(compiler_options=FAST_COMPILE)
    return p, V, {k: np.asarray(v) for k, v in compiled(w).items()}


def test_float64_finite_and_recorded(probe):
    p, _, out = probe
    assert p.w0.dtype == jnp.float64 and p.w0.ndim == 1
    assert out["loss"].dtype == np.float64 and out["loss"].shape == ()
    assert np.isfinite(out["loss"]) and out["loss"] > 0
    assert np.all(np.isfinite(out["grad"]))
    assert p.info["n_params"] == p.n
    assert p.info["options"]["criterion"] in ("mse", "ce")
    assert p.info["loss"] == losses.FORMULAS[p.info["options"]["criterion"]]
    assert p.info["data"] in ("digits", "sorting")


def test_gradient_matches_finite_differences(probe):
    _, V, out = probe
    fd = (out["loss_shifted"][:2] - out["loss_shifted"][2:]) / (2 * EPS_GRAD)  # (2,)
    np.testing.assert_allclose(out["grad"] @ np.asarray(V), fd, rtol=1e-6, atol=1e-9)


def test_third_derivative_matches_finite_differences(probe3):
    """``G[i, j]·v = ∇³L[u_i, u_j, v]`` against third differences of the loss itself
    (Richardson-extrapolated: error O(ε⁴)); and ``G`` is symmetric in ``(i, j)``."""
    _, V, out = probe3
    G = out["third"]  # (2, 2, n)
    assert np.all(np.isfinite(G))
    np.testing.assert_allclose(G[0, 1], G[1, 0], rtol=0, atol=1e-12 * np.abs(G).max())
    coarse = _third_difference(out["stencil"], EPS_THIRD)  # (2,)
    fine = _third_difference(out["stencil_half"], 0.5 * EPS_THIRD)
    fd = (4 * fine - coarse) / 3
    got = np.array([G[0, 1] @ np.asarray(V[:, 0]), G[1, 1] @ np.asarray(V[:, 1])])
    scale = np.abs(G).sum(axis=2).max()
    np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_deterministic_from_seed(name):
    a = get_problem(name, **TINY[name])
    b = get_problem(name, **TINY[name])
    np.testing.assert_array_equal(np.asarray(a.w0), np.asarray(b.w0))
    assert float(a.loss(a.w0)) == float(b.loss(b.w0))
    c = get_problem(name, seed=1, **TINY[name])
    assert c.n == a.n
    assert not np.allclose(np.asarray(c.w0), np.asarray(a.w0))
    assert float(c.loss(c.w0)) != float(a.loss(a.w0))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_zero_readout_gives_closed_form_losses(name):
    """With the last layer zeroed every logit is 0: MSE = ½‖e_y‖² = ½, CE = log C."""
    for crit, expected in (("mse", 0.5), ("ce", None)):
        p = get_problem(name, criterion=crit, **TINY[name])
        tree = p.unravel(p.w0)
        last = tree[-1] if isinstance(tree, list) else tree["readout"]
        classes = last["W"].shape[1]
        zeroed = jax.tree_util.tree_map(jnp.zeros_like, last)
        if isinstance(tree, list):
            tree = [*tree[:-1], zeroed]
        else:
            tree = {**tree, "readout": zeroed}
        w = ravel_pytree(tree)[0]
        want = expected if expected is not None else np.log(classes)
        assert float(p.loss(w)) == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- #
# data and losses
# --------------------------------------------------------------------------- #


def test_sorting_task():
    task = data.sorting(50, vocab=4, length=8, seed=0)
    assert task.tokens.shape == (50, 15) and task.targets.shape == (50, 8)
    unsorted = task.tokens[:, :8]
    np.testing.assert_array_equal(task.targets, np.sort(unsorted, axis=1))
    # the input's second half is the sorted sequence shifted by one (teacher forcing)
    np.testing.assert_array_equal(task.tokens[:, 8:], task.targets[:, :-1])
    assert task.tokens.min() >= 0 and task.tokens.max() <= 3
    assert task.predicted == slice(7, 15)
    again = data.sorting(50, vocab=4, length=8, seed=0)
    np.testing.assert_array_equal(again.tokens, task.tokens)
    assert not np.array_equal(data.sorting(50, seed=1).tokens, task.tokens)


def test_digits_images_are_the_standardised_digits():
    flat, labels, _ = data.digits(100, 3, keep_constant=True)
    images, labels2 = data.digits_images(100, 3)
    assert images.shape == (100, 8, 8, 1)
    np.testing.assert_array_equal(images.reshape(100, 64), flat)
    np.testing.assert_array_equal(labels, labels2)
    assert set(np.unique(labels)) == {0, 1, 2}
    kept = flat[:, flat.std(axis=0) > 0]
    np.testing.assert_allclose(kept.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(kept.std(axis=0), 1, rtol=1e-12)


def test_criteria_against_numpy():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((7, 5))
    y = rng.integers(0, 5, 7)
    onehot = data.one_hot(y, 5)
    mse = 0.5 * np.mean(np.sum((f - onehot) ** 2, axis=1))
    ce = np.mean(np.log(np.sum(np.exp(f), axis=1)) - f[np.arange(7), y])
    assert float(losses.mse(jnp.asarray(f), jnp.asarray(onehot))) == pytest.approx(mse, rel=1e-14)
    assert float(losses.ce(jnp.asarray(f), jnp.asarray(onehot))) == pytest.approx(ce, rel=1e-14)


# --------------------------------------------------------------------------- #
# layers
# --------------------------------------------------------------------------- #


def test_conv2d_is_the_convolution():
    rng = np.random.default_rng(0)
    p = nn.conv_init(rng, 3, 5)
    p["b"] = jnp.arange(5.0)
    x = rng.standard_normal((2, 8, 6, 3))
    ref = jax.lax.conv_general_dilated(
        jnp.asarray(x), p["W"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(nn.conv2d(p, jnp.asarray(x)), ref + p["b"], atol=1e-13)
    np.testing.assert_allclose(
        nn.conv2d_patches(p, jnp.asarray(nn.image_patches(x))), ref + p["b"], atol=1e-13
    )


def test_group_norm_is_per_example():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 6)))
    p = nn.norm_init(6)
    full = nn.group_norm(p, x, groups=3)
    np.testing.assert_allclose(nn.group_norm(p, x[1:2], groups=3), full[1:2], atol=1e-14)
    g = np.asarray(full[0]).reshape(4, 4, 3, 2)  # groups of 2 channels
    np.testing.assert_allclose(g.mean(axis=(0, 1, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(g.var(axis=(0, 1, 3)), 1, rtol=1e-4)  # eps = 1e-5


def test_causal_attention_does_not_look_ahead():
    rng = np.random.default_rng(0)
    p = nn.attention_init(rng, 4)
    x = rng.standard_normal((2, 5, 4))
    y = x.copy()
    y[:, 3:] += rng.standard_normal((2, 2, 4))
    a = nn.attention(p, jnp.asarray(x), heads=2, causal=True)
    b = nn.attention(p, jnp.asarray(y), heads=2, causal=True)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-14)
    assert not np.allclose(a[:, 3:], b[:, 3:])
    c = nn.attention(p, jnp.asarray(y), heads=2, causal=False)
    assert not np.allclose(np.asarray(c[:, :3]), np.asarray(b[:, :3]))


def test_selective_scan_against_a_loop():
    rng = np.random.default_rng(0)
    n, t, e, s = 2, 5, 3, 4
    x, delta = rng.standard_normal((n, t, e)), rng.uniform(0.01, 0.5, (n, t, e))
    a = -rng.uniform(0.5, 2.0, (e, s))
    b, c = rng.standard_normal((n, t, s)), rng.standard_normal((n, t, s))
    state = np.zeros((n, e, s))
    want = np.zeros((n, t, e))
    for k in range(t):
        state = (
            np.exp(delta[:, k, :, None] * a) * state
            + (delta[:, k] * x[:, k])[:, :, None] * b[:, k, None, :]
        )
        want[:, k] = np.einsum("nes,ns->ne", state, c[:, k])
    got = selective_scan(*(jnp.asarray(z) for z in (x, delta, a, b, c)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_lstm_layer_against_a_loop():
    rng = np.random.default_rng(0)
    n, t, d, h = 2, 4, 3, 2
    p = {"W": rng.standard_normal((d + h, 4 * h)), "b": rng.standard_normal(4 * h)}
    x = rng.standard_normal((n, t, d))

    def sig(z):
        return 1 / (1 + np.exp(-z))

    hid, cell, want = np.zeros((n, h)), np.zeros((n, h)), np.zeros((n, t, h))
    for k in range(t):
        z = np.concatenate([x[:, k], hid], axis=1) @ p["W"] + p["b"]
        i, f, g, o = np.split(z, 4, axis=1)
        cell = sig(f) * cell + sig(i) * np.tanh(g)
        hid = sig(o) * np.tanh(cell)
        want[:, k] = hid
    got = lstm_layer({k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("cnn", {"depth": 4}, "depth between 1 and 3"),
        ("cnn", {"criterion": "hinge"}, "no criterion 'hinge'"),
        ("cnn", {"activation": "relu"}, "no activation 'relu'"),
        ("cnn", {"init_scale": 0.0}, "init_scale > 0"),
        ("resnet", {"channels": 6, "groups": 4}, "channels to be a multiple of groups"),
        ("vit", {"patch": 3}, "patch in {1, 2, 4, 8}"),
        ("vit", {"width": 6, "heads": 4}, "width to be a multiple of heads"),
        ("lstm", {"vocab": 1}, "vocab >= 2"),
        ("transformer", {"length": 1}, "length >= 2"),
        ("mamba", {"state": 0}, "state >= 1"),
        ("mamba", {"seed": 1.5}, "integer seed"),
        ("mlp", {"criterion": "MSE"}, "no criterion"),
        ("transformer", {"heads": "two"}, "expects an integer"),
    ],
)
def test_bad_options(name, options, fragment):
    with pytest.raises(ProblemError) as info:
        get_problem(name, **options)
    assert fragment in info.value.message, info.value.message
    assert info.value.hint


def test_every_entry_is_complete():
    names = builtin_names()
    assert set(ARCHITECTURES) | {"quadratic", "digits-mlp"} == set(names)
    for name, entry in REGISTRY.items():
        assert entry.description and entry.data in ("digits", "sorting", "none")
        defaults = entry.defaults()
        if entry.data != "none":
            assert {"n", "criterion", "seed"} <= set(defaults)
            assert defaults["criterion"] == "mse"
        if entry.alias_of is None and name != "quadratic":
            # suggestions are measured (benchmarks/problems.py eos): an optimizer is listed
            # only where a setting reaching and holding the edge was found
            sug = entry.suggested
            opts = set(sug) & {"gd", "rmsprop", "adam"}
            assert "gd" in opts and "steps" in sug, name
            assert set(entry.eos_step) == opts, name
            for k in opts:
                assert 0 < entry.eos_step[k] < sug.get(f"steps_{k}", sug["steps"]), (name, k)


def test_digits_mlp_is_mlp_under_its_old_name():
    a, b = get_problem("digits-mlp"), get_problem("mlp")
    np.testing.assert_array_equal(np.asarray(a.w0), np.asarray(b.w0))
    assert float(a.loss(a.w0)) == float(b.loss(b.w0))
    assert a.name == "digits-mlp" and b.name == "mlp" and a.n == 2948
    assert REGISTRY["digits-mlp"].defaults() == REGISTRY["mlp"].defaults()


# --------------------------------------------------------------------------- #
# the `flowgen problems` listing
# --------------------------------------------------------------------------- #


def test_cli_problems_json(capsys):
    assert main(["problems", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    listed = {p["name"]: p for p in out["problems"]}
    assert list(listed) == builtin_names()
    assert listed["digits-mlp"]["n_params"] == 2948 and listed["digits-mlp"]["alias_of"] == "mlp"
    for name in ARCHITECTURES:
        item = listed[name]
        assert item["n_params"] == get_problem(name).n
        assert 500 <= item["n_params"] <= 20000
        assert item["options"]["criterion"] == "mse"
        assert item["data"] in ("digits", "sorting")
        assert "gd" in item["suggested"] and set(item["eos_step"]) <= set(item["suggested"])
    assert "path/to/file.py:function" in out["user_problems"]


def test_cli_problems_table(capsys):
    assert main(["problems"]) == 0
    text = capsys.readouterr().out
    for name in builtin_names():
        assert name in text
    assert "criterion=mse" in text


def test_cli_bad_problem_option_exits_2(capsys):
    gd = str(ROOT / "optimizers" / "gd.opt")
    code = main(["run", gd, "--problem", "vit", "--problem-opt", "patch=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "patch in {1, 2, 4, 8}" in err and "Traceback" not in err
