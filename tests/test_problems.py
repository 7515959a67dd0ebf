"""Problems: built-ins, user files and modules, and every bad-specification error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowgen.errors import ProblemError
from flowgen.problems import (
    BUILTIN,
    QUADRATIC_EOS_LR,
    Problem,
    digits_mlp,
    get_problem,
    parse_problem_options,
    quadratic,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_problem.py"


@pytest.fixture(scope="module")
def digits() -> Problem:
    return digits_mlp()


def top_eigenvalue(loss, w, k: int = 30) -> float:
    """Largest Hessian eigenvalue by Lanczos (full reorthogonalisation) on HVPs."""
    hvp = _hvp(loss)
    n = w.shape[0]
    basis = np.zeros((k, n))
    alpha, beta = [], []
    v = np.random.default_rng(0).standard_normal(n)
    v /= np.linalg.norm(v)
    for j in range(k):
        basis[j] = v
        u = np.asarray(hvp(w, jnp.asarray(v)))
        alpha.append(u @ v)
        for _ in range(2):
            u = u - basis[: j + 1].T @ (basis[: j + 1] @ u)
        beta.append(np.linalg.norm(u))
        v = u / beta[-1]
    t = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    return float(np.linalg.eigvalsh(t)[-1])


_HVP_CACHE: dict = {}


def _hvp(loss):
    if loss not in _HVP_CACHE:
        _HVP_CACHE[loss] = jax.jit(lambda w, v: jax.jvp(jax.grad(loss), (w,), (v,))[1])
    return _HVP_CACHE[loss]


def gd(loss, lr: float, steps: int):
    """``steps`` GD steps as one jitted scan: ``w -> w_steps``."""
    grad = jax.grad(loss)

    @jax.jit
    def run(w):
        return jax.lax.scan(lambda w, _: (w - lr * grad(w), None), w, None, length=steps)[0]

    return run


def write(tmp_path: Path, source: str, name: str = "prob.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def expect_error(spec: str, fragment: str, **options) -> ProblemError:
    with pytest.raises(ProblemError) as info:
        get_problem(spec, **options)
    err = info.value
    assert fragment in err.message, err.format()
    assert err.hint, "every ProblemError carries a hint"
    assert "\n" not in err.message
    return err


# --------------------------------------------------------------------------- #
# digits-mlp
# --------------------------------------------------------------------------- #


def test_digits_shapes(digits):
    assert isinstance(digits, Problem)
    assert digits.n == 54 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4 == 2948
    assert digits.info["n_params"] == 2948
    assert digits.info["n_inputs"] == 54
    assert len(digits.info["dropped_pixels"]) == 10
    assert digits.w0.dtype == jnp.float64
    layers = digits.unravel(digits.w0)
    assert [layer["W"].shape for layer in layers] == [(54, 32), (32, 32), (32, 4)]
    assert all(float(jnp.abs(layer["b"]).max()) == 0.0 for layer in layers)
    # LeCun normal times the layer scales (0.2, 1, 0.1)
    stds = [float(jnp.std(layer["W"]) * np.sqrt(layer["W"].shape[0])) for layer in layers]
    assert stds == pytest.approx([0.2, 1.0, 0.1], rel=0.15)
    value = float(digits.loss(digits.w0))
    assert np.isfinite(value) and 0.3 < value < 0.7  # ≈ ½·‖y‖² = 0.5 for a small output layer


def test_digits_deterministic(digits):
    again = digits_mlp()
    np.testing.assert_array_equal(np.asarray(again.w0), np.asarray(digits.w0))
    assert float(again.loss(again.w0)) == float(digits.loss(digits.w0))
    other = digits_mlp(seed=1)
    assert not np.allclose(np.asarray(other.w0), np.asarray(digits.w0))


def test_digits_options():
    p = get_problem("digits-mlp", n=200, classes=3, width=8, depth=1, init_scales=(0.5, 0.5))
    assert p.info["n_inputs"] + len(p.info["dropped_pixels"]) == 64
    assert p.n == p.info["n_inputs"] * 8 + 8 + 8 * 3 + 3
    assert np.isfinite(float(p.loss(p.w0)))


def test_digits_keep_constant_gives_zero_gradients():
    p = digits_mlp(keep_constant=True)
    assert p.info["n_inputs"] == 64
    assert p.n == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4
    grad = p.unravel(jax.grad(p.loss)(p.w0))
    rows = np.abs(np.asarray(grad[0]["W"])).sum(axis=1)  # (64,) one per input pixel
    assert int(np.sum(rows == 0.0)) == 10
    assert np.all(np.isfinite(rows))


def test_digits_gd_sharpens_to_edge_of_stability(digits):
    """GD lr 0.4: sharpness 2.67 at step 0, reaches 2/lr = 5 at step 20, then hovers.

    Measured (Lanczos, 30 HVPs): 2.672 (step 0), 4.96 (19), 5.01 (20), peak
    5.41 (40), 5.02 (100), within [4.85, 5.16] over steps 100-300.
    """
    lr = 0.4
    threshold = 2 / lr
    sharp0 = top_eigenvalue(digits.loss, digits.w0)
    assert sharp0 == pytest.approx(2.672, abs=0.01)
    assert sharp0 < 0.6 * threshold
    step = gd(digits.loss, lr, 2)
    w, t, crossed = digits.w0, 0, None
    history = []
    while t < 100:
        w, t = step(w), t + 2
        history.append((t, top_eigenvalue(digits.loss, w, k=20)))
        if crossed is None and history[-1][1] >= threshold:
            crossed = t
        if crossed is not None and t >= crossed + 20:
            break
    assert crossed is not None and 10 <= crossed <= 40, history
    after = [s for t, s in history if t >= crossed]
    assert max(after) < 1.2 * threshold, history  # at the edge, not blowing up
    assert np.isfinite(float(digits.loss(w)))


# --------------------------------------------------------------------------- #
# quadratic
# --------------------------------------------------------------------------- #


def test_quadratic_basics():
    p = quadratic()
    assert p.n == 20 and p.w0.shape == (20,) and p.w0.dtype == jnp.float64
    assert p.unravel is None
    assert p.info["eos_lr"] == QUADRATIC_EOS_LR == 0.01
    again = quadratic()
    np.testing.assert_array_equal(np.asarray(again.w0), np.asarray(p.w0))
    assert np.all(np.isfinite(np.asarray(jax.grad(p.loss)(p.w0))))
    assert float(p.loss(quadratic(quartic=0.0).w0)) == pytest.approx(float(p.loss(p.w0)), rel=0.1)


def test_quadratic_gd_sharpens_past_threshold_and_stays():
    """GD lr 0.01: sharpness 65 → crosses 200 by step ~270 → hovers in [198, 203]."""
    p = quadratic()
    lr = QUADRATIC_EOS_LR
    threshold = 2 / lr
    hessian = jax.jit(jax.hessian(p.loss))

    def sharpness(w):
        return float(np.linalg.eigvalsh(np.asarray(hessian(w)))[-1])

    assert sharpness(p.w0) < 0.4 * threshold
    step = gd(p.loss, lr, 10)
    w, crossed = p.w0, None
    for t in range(10, 501, 10):
        w = step(w)
        if sharpness(w) >= threshold:
            crossed = t
            break
    assert crossed is not None and crossed <= 400
    w = gd(p.loss, lr, 2000 - crossed)(w)
    one = gd(p.loss, lr, 1)
    late = []
    for _ in range(10):
        late.append(sharpness(w))
        w = one(w)
    assert min(late) > 0.93 * threshold and max(late) < 1.07 * threshold, late
    assert np.isfinite(float(p.loss(w)))


def test_quadratic_bad_options():
    expect_error("quadratic", "n >= 2", n=1)
    expect_error("quadratic", "cond >= 1", cond=0.5)
    expect_error("quadratic", "quartic >= 0", quartic=-1.0)


# --------------------------------------------------------------------------- #
# options
# --------------------------------------------------------------------------- #


def test_parse_builtin_options():
    opts = parse_problem_options(
        ["n=200", "init_scales=0.2,1,0.1", "keep_constant=true", "activation=gelu"], "digits-mlp"
    )
    assert opts == {
        "n": 200,
        "init_scales": (0.2, 1.0, 0.1),
        "keep_constant": True,
        "activation": "gelu",
    }
    assert isinstance(opts["n"], int)
    assert parse_problem_options(["cond=1e3", "seed=3"], "quadratic") == {"cond": 1000.0, "seed": 3}


def test_parse_literal_options():
    opts = parse_problem_options(["width=8", "lr=0.1", "flag=false", "pair=1,2", "name=x"])
    assert opts == {"width": 8, "lr": 0.1, "flag": False, "pair": (1, 2), "name": "x"}


def test_parse_unknown_builtin_option_lists_valid():
    with pytest.raises(ProblemError) as info:
        parse_problem_options(["widht=8"], "digits-mlp")
    assert "has no option `widht`" in info.value.message
    assert "did you mean `width`" in info.value.hint
    assert "init_scales" in info.value.hint


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["n200"], "key=value"),
        (["n=abc"], "expects an integer"),
        (["keep_constant=maybe"], "true or false"),
        (["init_scales=0.2,x"], "comma-separated numbers"),
        (["n=1", "n=2"], "given twice"),
    ],
)
def test_parse_bad_options(items, fragment):
    with pytest.raises(ProblemError) as info:
        parse_problem_options(items, "digits-mlp")
    assert fragment in info.value.message


def test_builtin_options_as_strings_are_converted():
    p = get_problem("quadratic", n="10", cond="50")
    assert p.n == 10 and p.info["options"]["cond"] == 50.0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"widht": 8}, "has no option `widht`"),
        ({"classes": 11}, "classes between 2 and 10"),
        ({"activation": "relu6"}, "no activation"),
        ({"init_scales": (0.2, 1.0)}, "3 numbers in init_scales"),
        ({"n": 5000}, "only 720 examples"),
        ({"width": 0}, "width >= 1"),
    ],
)
def test_digits_bad_options(options, fragment):
    expect_error("digits-mlp", fragment, **options)


# --------------------------------------------------------------------------- #
# user problems
# --------------------------------------------------------------------------- #


def test_example_file_with_pytree_w0():
    spec = f"{EXAMPLE}:make_problem"
    p = get_problem(spec)
    tree = p.unravel(p.w0)
    assert set(tree) == {"W1", "b1", "W2", "b2"}
    assert tree["W1"].shape == (8, 16)
    assert p.n == 8 * 16 + 16 + 16 + 1 == p.info["n_params"]
    assert p.w0.dtype == jnp.float64 and p.info["pytree"] is True
    assert p.name == "my_problem.make_problem"
    value = float(p.loss(p.w0))
    assert np.isfinite(value) and value > 0
    g = jax.grad(p.loss)(p.w0)
    assert g.shape == (p.n,) and np.all(np.isfinite(np.asarray(g)))
    # options reach the user's function
    small = get_problem(spec, width=4)
    assert small.unravel(small.w0)["W1"].shape == (8, 4)
    # the same file twice gives the same problem
    np.testing.assert_array_equal(np.asarray(get_problem(spec).w0), np.asarray(p.w0))


def test_example_file_relative_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    p = get_problem("examples/my_problem.py:make_problem", **parse_problem_options(["width=4"]))
    assert p.info["options"] == {"width": 4}


def test_user_flat_w0_and_float32_loss(tmp_path):
    spec = write(
        tmp_path,
        """
        import jax.numpy as jnp
        import numpy as np

        def make():  # integer w0, float32 loss: both become float64
            return (lambda w: jnp.sum(w.astype(jnp.float32) ** 2)), np.array([1, 2, 3])

        def flat():
            return (lambda w: jnp.sum(w ** 2)), jnp.ones(4, dtype=jnp.float32)
        """,
    )
    p = get_problem(f"{spec}:make")
    assert p.n == 3 and p.w0.dtype == jnp.float64 and p.unravel is None
    assert p.loss(p.w0).dtype == jnp.float64 and float(p.loss(p.w0)) == 14.0
    q = get_problem(f"{spec}:flat")
    assert q.unravel is None and q.w0.dtype == jnp.float64


def test_user_module_spec(tmp_path, monkeypatch):
    write(
        tmp_path,
        """
        import jax.numpy as jnp

        def make(scale=1.0):
            return (lambda w: scale * jnp.sum(w ** 2)), jnp.ones(3)
        """,
        name="flowgen_test_usermod.py",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    p = get_problem("flowgen_test_usermod:make", scale=2.0)
    assert float(p.loss(p.w0)) == 6.0
    assert p.name == "flowgen_test_usermod.make"


# --------------------------------------------------------------------------- #
# bad specifications: one test per case
# --------------------------------------------------------------------------- #

GOOD = """
import jax.numpy as jnp

def make():
    return (lambda w: jnp.sum(w ** 2)), jnp.ones(3)
"""


def test_unknown_builtin_suggests_closest():
    err = expect_error("digits_mlp", "unknown built-in problem `digits_mlp`")
    assert "did you mean `digits-mlp`" in err.hint
    for name in BUILTIN:
        assert name in err.hint


def test_empty_spec():
    expect_error("  ", "non-empty string")


def test_missing_file(tmp_path):
    expect_error(f"{tmp_path}/nope.py:make", "no such file")


def test_file_without_function_name(tmp_path):
    spec = write(tmp_path, GOOD)
    err = expect_error(spec, "does not name a function")
    assert ":make_problem" in err.hint


def test_directory_instead_of_file(tmp_path):
    expect_error(f"{tmp_path}:make", "is a directory")


def test_missing_function_lists_callables(tmp_path):
    spec = write(tmp_path, GOOD + "\ndef helper():\n    pass\n\nVALUE = 3\n")
    err = expect_error(f"{spec}:mkae", "does not define a function `mkae`")
    assert "did you mean `make`" in err.hint
    assert "`helper`" in err.hint and "`make`" in err.hint
    assert "VALUE" not in err.hint and "jnp" not in err.hint


def test_not_a_function(tmp_path):
    spec = write(tmp_path, GOOD + "\nmake2 = 3\n")
    expect_error(f"{spec}:make2", "is not a function")


def test_module_raises_on_import(tmp_path):
    spec = write(tmp_path, "x = 1\nraise RuntimeError('boom at import')\n")
    err = expect_error(f"{spec}:make", "raised RuntimeError: boom at import")
    assert err.line == 2
    assert "raise RuntimeError" in err.format()


def test_module_syntax_error(tmp_path):
    spec = write(tmp_path, "def make(:\n    pass\n")
    err = expect_error(f"{spec}:make", "syntax error")
    assert err.line == 1


def test_missing_module():
    expect_error("flowgen_no_such_module_xyz:make", "no module named `flowgen_no_such_module_xyz`")


def test_function_raises(tmp_path):
    spec = write(
        tmp_path,
        """
        def make():
            data = [1, 2]
            return data[5]
        """,
    )
    err = expect_error(f"{spec}:make", "raised IndexError: list index out of range")
    assert err.line == 4


def test_unaccepted_option(tmp_path):
    spec = write(tmp_path, GOOD)
    err = expect_error(f"{spec}:make", "does not accept the option `width`", width=3)
    assert "no options" in err.hint


def test_not_a_pair(tmp_path):
    spec = write(
        tmp_path,
        """
        import jax.numpy as jnp

        def three():
            return (lambda w: jnp.sum(w)), jnp.ones(2), 3

        def single():
            return jnp.ones(2)
        """,
    )
    expect_error(f"{spec}:three", "must return (loss_fn, w0), got a 3-tuple")
    expect_error(f"{spec}:single", "must return (loss_fn, w0), got a ArrayImpl")


def test_loss_not_callable(tmp_path):
    spec = write(tmp_path, "import numpy as np\n\ndef make():\n    return np.ones(2), np.ones(2)\n")
    expect_error(f"{spec}:make", "must be the loss function")


def test_w0_empty(tmp_path):
    spec = write(
        tmp_path,
        """
        import jax.numpy as jnp

        def no_leaves():
            return (lambda w: 0.0), {}

        def zero_size():
            return (lambda w: jnp.sum(w)), jnp.zeros(0)
        """,
    )
    expect_error(f"{spec}:no_leaves", "is empty")
    expect_error(f"{spec}:zero_size", "has no parameters")


def test_w0_non_numeric(tmp_path):
    spec = write(tmp_path, "def make():\n    return (lambda w: 0.0), {'a': 'hello'}\n")
    expect_error(f"{spec}:make", "non-numeric")


def test_loss_not_scalar(tmp_path):
    spec = write(
        tmp_path,
        "import jax.numpy as jnp\n\ndef make():\n    return (lambda w: w ** 2), jnp.ones(3)\n",
    )
    err = expect_error(f"{spec}:make", "must return a scalar, got an array of shape (3,)")
    assert "jnp.sum" in err.hint


def test_loss_not_float(tmp_path):
    spec = write(
        tmp_path,
        "import jax.numpy as jnp\n\ndef make():\n"
        "    return (lambda w: jnp.sum(w > 0)), jnp.ones(3)\n",
    )
    expect_error(f"{spec}:make", "must return a real float")


def test_loss_uses_numpy(tmp_path):
    spec = write(
        tmp_path,
        """
        import jax.numpy as jnp
        import numpy as np

        def make():
            return (lambda w: jnp.asarray(np.sum(np.asarray(w) ** 2))), jnp.ones(3)
        """,
    )
    err = expect_error(f"{spec}:make", "cannot be traced by JAX")
    assert "the loss must be written with jax.numpy so it can be differentiated" in err.hint
    assert err.line == 6


def test_loss_uses_python_if(tmp_path):
    spec = write(
        tmp_path,
        """
        import jax.numpy as jnp

        def loss(w):
            if w[0] > 0:
                return jnp.sum(w ** 2)
            return jnp.sum(w)

        def make():
            return loss, jnp.ones(3)
        """,
    )
    err = expect_error(f"{spec}:make", "cannot be traced by JAX")
    assert "jnp.where" in err.hint


def test_loss_raises(tmp_path):
    spec = write(
        tmp_path,
        """
        import jax.numpy as jnp

        def loss(params):
            return jnp.sum(params["missing"] ** 2)

        def make():
            return loss, {"w": jnp.ones(3)}
        """,
    )
    err = expect_error(f"{spec}:make", "raised KeyError")
    assert err.line == 5


@pytest.mark.parametrize(("expr", "shown"), [("jnp.nan", "nan"), ("jnp.inf", "inf")])
def test_loss_not_finite_at_w0(tmp_path, expr, shown):
    spec = write(
        tmp_path,
        f"import jax.numpy as jnp\n\ndef make():\n"
        f"    return (lambda w: jnp.sum(w) * {expr}), jnp.ones(3)\n",
    )
    expect_error(f"{spec}:make", f"is {shown} at w0")


def test_gradient_not_finite_at_w0(tmp_path):
    spec = write(
        tmp_path,
        "import jax.numpy as jnp\n\ndef make():\n"
        "    return (lambda w: jnp.sum(jnp.sqrt(w))), jnp.zeros(3)\n",
    )
    expect_error(f"{spec}:make", "gradient of the loss")


def test_errors_format_without_traceback(tmp_path):
    spec = write(tmp_path, "raise ValueError('bad\\nmultiline')\n")
    err = expect_error(f"{spec}:make", "raised ValueError: bad")
    text = err.format()
    assert "Traceback" not in text
    assert text.splitlines()[0].endswith("raised ValueError: bad")
    assert text.splitlines()[-1].startswith("hint: ")
