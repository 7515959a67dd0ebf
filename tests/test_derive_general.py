"""Issue 10: general effective steps, delay states, the moment and bifurcation tables, and
output that never confuses flowgen's symbols with the file's names."""

import json
import textwrap

import numpy as np
import pytest
import sympy as sp
from conftest import ROOT

import flowgen
from flowgen.cli import main
from flowgen.errors import DerivationError
from flowgen.flow import build_flow
from flowgen.flow.spec import PARSE_LOCALS
from flowgen.language import check_program, parse_text
from flowgen.report.derive import derive_latex
from flowgen.symbolic.moments import MOMENT_NAMES, MOMENTS, runtime_table
from flowgen.symbolic.stability import Bifurcation


def derive(text, require_central=True, **hyper):
    prog = parse_text(textwrap.dedent(text), "test.opt")
    check_program(prog)
    return build_flow(prog, hyper, require_central=require_central)


def parse(s, names):
    """Parse flowgen's JSON output back with the file's names as plain symbols."""
    local = {n: sp.Symbol(n) for n in names} | {"μ": sp.Symbol("μ"), "α": sp.Symbol("α")}
    return sp.parse_expr(s, local_dict={**local, **PARSE_LOCALS})


def plain(e):
    e = sp.sympify(e)
    return e.xreplace({s: sp.Symbol(s.name) for s in e.free_symbols})


def same(a, b):
    return sp.simplify(plain(a) - plain(b)) == 0


S = sp.Symbol

# ------------------------------------------------------------------ effective step p


TF_RMSPROP_MOMENTUM = """\
    optimizer tfrm "RMSProp with momentum on the preconditioned step (the issue's form)"
    hyper lr = 1e-3
    hyper b2 = 0.9
    hyper mu = 0.9
    hyper eps = 1e-7
    state v = 0
    state m = 0
    update {
        v = b2 * v + (1 - b2) * g^2
        m = mu * m + g / (sqrt(v) + eps)
        w = w - lr * m
    }
"""


@pytest.mark.parametrize("mu", [0.5, 0.9])
def test_tf_rmsprop_momentum_effective_step_and_threshold(mu):
    spec = derive(TF_RMSPROP_MOMENTUM, mu=mu)
    st = spec.stability
    lr, v, eps, m = S("lr"), S("v"), S("eps"), S("mu")
    assert st.bifurcation is Bifurcation.FLIP
    assert same(st.effective_step, lr / ((1 - m) * (sp.sqrt(v) + eps)))
    assert same(st.threshold, 2 * (1 + m) / (1 - m))
    assert st.threshold_value == pytest.approx(2 * (1 + mu) / (1 - mu))
    assert same(st.critical_curvature, 2 * (1 + m) * (sp.sqrt(v) + eps) / lr)
    assert spec.has_central and not st.step_note


def test_keras_rmsprop_momentum_library_file():
    spec = flowgen.load(ROOT / "optimizers" / "rmsprop_momentum.opt").derive()
    lr, v, eps, m = S("lr"), S("v"), S("eps"), S("mu")
    assert same(spec.stability.effective_step, lr / ((1 - m) * sp.sqrt(v + eps)))
    assert same(spec.stability.threshold, 2 * (1 + m) / (1 - m))
    assert spec.threshold == pytest.approx(38.0)


def test_preconditioned_nesterov_combination():
    """Nesterov on an RMSProp-preconditioned gradient: the update does not factor, yet
    p = lr/((1-mu)√v) and c is Nesterov's 2(1+mu)/((1+2mu)(1-mu))."""
    spec = derive(
        """\
        optimizer pn "preconditioned Nesterov"
        hyper lr = 0.01
        hyper mu = 0.8
        hyper b2 = 0.99
        state v = 1
        state m = 0
        update {
            v = b2 * v + (1 - b2) * g^2
            q = g / sqrt(v)
            m = mu * m + q
            w = w - lr * (q + mu * m)
        }
        """
    )
    lr, v, m = S("lr"), S("v"), S("mu")
    assert same(spec.stability.effective_step, lr / ((1 - m) * sp.sqrt(v)))
    assert same(spec.stability.threshold, 2 * (1 + m) / ((1 + 2 * m) * (1 - m)))


def test_heavy_ball_written_with_the_previous_iterate():
    """Polyak's w ← w − lr·g + β(w − w_prev): a delay state of w gives heavy ball's p and c."""
    spec = derive(
        """\
        optimizer polyak "heavy ball, Polyak's form"
        hyper lr = 0.01
        hyper beta = 0.9
        state wp = 0
        update {
            v = w - wp
            wp = w
            w = w - lr * g + beta * v
        }
        """
    )
    lr, b = S("lr"), S("beta")
    st = spec.stability
    assert spec.state("wp").kind == "delay" and [s.name for s in spec.flow_states] == []
    assert same(st.effective_step, lr / (1 - b))
    assert same(st.threshold, 2 * (1 + b) / (1 - b))
    assert sp.Poly(plain(st.char_poly), S("μ")).degree() == 2


def test_no_effective_step_says_why():
    spec = derive(
        """\
        optimizer integ "momentum without decay: no fixed point"
        hyper lr = 0.01
        state m = 0
        update {
            m = m + g
            w = w - lr * m
        }
        """,
        require_central=False,
    )
    assert spec.stability.effective_step is None
    assert "grows without bound" in spec.stability.step_note
    assert spec.to_json()["stability"]["effective_step_note"] == spec.stability.step_note


# ------------------------------------------------------------------------ delay states

OGD = ROOT / "optimizers" / "ogd.opt"


@pytest.mark.parametrize("lr", [0.1, 0.3])
def test_optimistic_gd(lr):
    spec = flowgen.load(OGD).derive(lr=lr)
    st = spec.stability
    assert st.bifurcation is Bifurcation.FLIP
    assert same(st.critical_curvature, sp.Rational(2, 3) / S("lr"))
    assert same(st.effective_step, S("lr"))
    assert same(st.threshold, sp.Rational(2, 3))
    assert spec.threshold == pytest.approx(2 / 3)
    gp = spec.state("gp")
    assert gp.kind == "delay" and gp.rate is None and gp.drift is None
    assert same(gp.argument, S("g")) and same(gp.kappa, -1)
    assert spec.flow_states == ()
    assert same(spec.w_drift, -S("lr") * S("Eg"))
    d = spec.to_json()
    assert d["states"] == {"gp": "delay"} and d["delays"] == {"gp": "g"}
    assert d["flow_states"] == [] and set(d["drift"]) == {"w"}


def adan_map(lam, lr, b1, b2, s, wd=0.0):
    """Adan's linearised map on (w, m, d, gp) at curvature lam, by hand (late training:
    bias corrections 1; s = sqrt(n) + eps frozen)."""
    J = np.zeros((4, 4))
    # new values as rows in the old (w, m, d, gp); g = lam * w
    m_new = np.array([(1 - b1) * lam, b1, 0, 0])
    d_new = np.array([(1 - b2) * lam, 0, b2, -(1 - b2)])
    gp_new = np.array([lam, 0, 0, 0])
    w_new = (np.array([1.0, 0, 0, 0]) - lr / s * (m_new + b2 * d_new)) / (1 + lr * wd)
    J[0], J[1], J[2], J[3] = w_new, m_new, d_new, gp_new
    return J


def bisect_critical(J_of, lo=1e-6, hi=1e6):
    """Smallest curvature at which the spectral radius reaches 1 (log grid, then bisection)."""
    grid = np.logspace(np.log10(lo), np.log10(hi), 4001)
    rho = [np.max(np.abs(np.linalg.eigvals(J_of(x)))) for x in grid]
    i = next(k for k, r in enumerate(rho) if r > 1 + 1e-12)
    a, b = grid[i - 1], grid[i]
    for _ in range(200):
        c = 0.5 * (a + b)
        if np.max(np.abs(np.linalg.eigvals(J_of(c)))) > 1 + 1e-12:
            b = c
        else:
            a = c
    return 0.5 * (a + b)


@pytest.mark.parametrize("name", ["adan", "adan_nobc"])
@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 1e-3, "beta1": 0.98, "beta2": 0.92},
        {"lr": 2e-3, "beta1": 0.9, "beta2": 0.5, "weight_decay": 0.1},
    ],
)
def test_adan_threshold_against_a_numerical_bisection(name, hyper):
    spec = flowgen.load(ROOT / "optimizers" / f"{name}.opt").derive(**hyper)
    h = spec.hyper
    n_val, t_val = 0.25, 10_000  # a frozen second moment; late training
    s = np.sqrt(n_val) + h["eps"]
    lam_num = bisect_critical(
        lambda x: adan_map(x, h["lr"], h["beta1"], h["beta2"], s, h["weight_decay"])
    )
    subs = {S(k): v for k, v in h.items()} | {S("n"): n_val, S("t"): t_val}
    lam_sym = float(plain(spec.stability.critical_curvature).xreplace(subs))
    assert lam_sym == pytest.approx(lam_num, rel=1e-9)
    p = float(plain(spec.stability.effective_step).xreplace(subs))
    assert spec.threshold == pytest.approx(lam_num * p, rel=1e-9)
    assert spec.stability.bifurcation is Bifurcation.FLIP
    assert [s.kind for s in spec.states] == ["fast", "fast", "slow", "delay"]
    # the Nesterov term oscillates with the flip: E[(g + b2 (g - gp))^2] = Eg^2 + (1+2b2)^2 Vg
    b3, b2 = S("beta3"), S("beta2")
    expected = (1 - b3) / b3 * (S("Eg") ** 2 + (1 + 2 * b2) ** 2 * S("Vg") - S("n"))
    assert same(spec.state("n").drift, expected)


def test_adan_bias_correction_gives_the_late_training_threshold():
    spec = flowgen.load(ROOT / "optimizers" / "adan.opt").derive()
    assert "late-training" in spec.stability.step_note
    nobc = flowgen.load(ROOT / "optimizers" / "adan_nobc.opt").derive()
    assert spec.threshold == pytest.approx(nobc.threshold)
    assert not nobc.stability.step_note


DELAY_MOMENTS = """\
    optimizer dm "second moments of differences with delayed values"
    hyper lr = 0.01
    hyper beta = 0.9
    state v = 1
    state u = 1
    state s = 1
    state gp = 0
    state wp = 0
    update {
        v = beta * v + (1 - beta) * (g - gp)^2
        u = beta * u + (1 - beta) * (g + gp)^2
        s = beta * s + (1 - beta) * (w - wp)^2
        gp = g
        wp = w
        w = w - lr * g / sqrt(v)
    }
"""


def test_delay_states_average_with_the_flip_phase():
    """On the flip mode a delayed value oscillates against the current one: g − gp carries
    twice the oscillation and no mean, g + gp twice the mean and no oscillation."""
    spec = derive(DELAY_MOMENTS)
    b, Eg, Vg = S("beta"), S("Eg"), S("Vg")
    lam = plain(spec.stability.critical_curvature)
    assert same(spec.state("v").drift, (1 - b) / b * (4 * Vg - S("v")))
    assert same(spec.state("u").drift, (1 - b) / b * (4 * Eg**2 - S("u")))
    assert same(spec.state("s").drift, (1 - b) / b * (4 * Vg / lam**2 - S("s")))
    assert [s.name for s in spec.flow_states] == ["v", "u", "s"]


def test_a_state_that_nothing_reads_is_a_local():
    with pytest.raises(DerivationError) as info:
        derive(
            """\
            optimizer loc "a state whose previous value nobody reads"
            hyper lr = 0.1
            state s = 0
            update {
                s = g^2
                w = w - lr * g / sqrt(s + 1)
            }
            """
        )
    err = info.value
    assert "no statement reads that value" in err.message
    assert "drop the `state` declaration of `s`" in err.hint and "delay state" in err.hint
    assert err.line == 5


# ---------------------------------------------------------------------- tables


def test_bifurcation_enum_keeps_the_json_values():
    assert [b.value for b in Bifurcation] == ["flip", "fold", "neimark-sacker", "none"]
    assert json.dumps(Bifurcation.FLIP) == '"flip"'
    spec = flowgen.load(ROOT / "optimizers" / "adam.opt").derive()
    assert spec.stability.bifurcation is Bifurcation.FLIP
    assert spec.to_json()["stability"]["bifurcation"] == "flip"
    assert Bifurcation.FLIP.has_central_flow and not Bifurcation.FOLD.has_central_flow


def test_the_moment_table_drives_codegen_and_the_runtime():
    import jax.numpy as jnp

    spec = flowgen.load(ROOT / "optimizers" / "adam.opt").derive()
    assert spec.moments == runtime_table() and spec.moment_names == MOMENT_NAMES
    opt = flowgen.load(ROOT / "optimizers" / "adam.opt").optimizer()
    assert opt.moment_names == MOMENT_NAMES == ("Eg", "Vg")
    src = opt.source
    assert f"def drift(w, state, {', '.join(MOMENT_NAMES)}, t, hyper=HYPER):" in src
    rng = np.random.default_rng(0)
    n, k = 7, 2
    grad = jnp.asarray(rng.normal(size=n))
    G = jnp.asarray(rng.normal(size=(k, k, n)))
    HU = jnp.asarray(rng.normal(size=(n, k)))
    A = rng.normal(size=(k, k))
    X = jnp.asarray(A @ A.T)
    Eg, Vg = opt.moments(grad, G, HU, X)
    np.testing.assert_allclose(Eg, grad + 0.5 * np.einsum("ij,ijn->n", X, G), rtol=1e-13)
    np.testing.assert_allclose(Vg, np.diag(HU @ X @ HU.T), rtol=1e-13)
    Eg0, Vg0 = opt.moments(grad)  # Σ = 0: the stable flow
    np.testing.assert_array_equal(Eg0, grad)
    np.testing.assert_array_equal(Vg0, np.zeros(n))
    assert {m.name for m in MOMENTS} == set(spec.to_json()["notation"]) & set(MOMENT_NAMES)


# ------------------------------------------------------------- unambiguous output

NAMES = """\
    optimizer names "heavy ball whose hyperparameters look like flowgen's own symbols"
    hyper p   = 0.05    # the learning rate
    hyper mu  = 0.9     # momentum
    hyper a   = 2       # gradient scale
    hyper lam = 0.01    # decoupled weight decay
    hyper c   = 0.5     # step multiplier
    state m = 0
    update {
        m = mu * m + a * g
        w = w - p * c * m - p * lam * w
    }
"""


def test_names_like_internal_symbols_parse_back(tmp_path, capsys):
    f = tmp_path / "names.opt"
    f.write_text(textwrap.dedent(NAMES))
    assert main(["derive", str(f), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    names = ["p", "mu", "a", "lam", "c", "m", "w", "Eg", "Vg"]
    p, mu, a, lam, c = (S(n) for n in ("p", "mu", "a", "lam", "c"))
    st = d["stability"]
    assert same(parse(st["effective_step"], names), a * c * p / (1 - mu))
    assert same(parse(st["threshold"], names), (1 + mu) * (2 - lam * p) / (1 - mu))
    assert same(parse(st["critical_curvature"], names), (1 + mu) * (2 - lam * p) / (a * c * p))
    chi = parse(st["characteristic_polynomial"], names)
    x, al = S("μ"), S("α")
    expected = x**2 - x * (1 + mu - lam * p - al * (1 - mu)) + mu * (1 - lam * p)
    assert same(chi, expected)
    assert same(parse(d["drift"]["w"], names), -p * c * S("m") - p * lam * S("w"))
    assert same(parse(d["drift"]["m"], names), (a * S("Eg") - (1 - mu) * S("m")) / mu)
    assert same(parse(d["kappa"]["m"], names), -a / (1 + mu))

    # the terminal report names the effective step and the threshold apart from p and c
    assert main(["derive", str(f)]) == 0
    text = capsys.readouterr().out
    assert "effective step p̂" in text and "threshold ĉ = λ*·p̂" in text
    assert "effective step p " not in text
    # LaTeX: the file's p, c and mu are upright, flowgen's own p̂, ĉ, λ*
    tex = derive_latex(flowgen.load(f).derive())
    assert r"\hat p = " in tex and r"\mathrm{p}" in tex and r"\mathrm{mu}" in tex
    assert r"\mu" not in tex.replace(r"\mathrm{mu}", "")


def test_lr_and_eta_do_not_both_print_as_eta():
    spec = derive(
        """\
        optimizer two "two step sizes"
        hyper lr = 0.1
        hyper eta = 0.5
        update {
            w = w - lr * eta * g
        }
        """
    )
    p_line = next(ln for ln in derive_latex(spec).splitlines() if ln.startswith("p = "))
    assert p_line.count(r"\eta") == 1 and "lr" in p_line
