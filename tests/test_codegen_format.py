"""Generated code is formatted by flowgen itself: its bytes do not depend on ruff.

``flowgen.codegen.pyfmt`` writes expressions in ruff's style and the generator
keeps every line within 100 columns (temporaries, exploded containers), so
``ruff format`` has nothing to change. Checked here: the same bytes with and
without ruff available; ruff leaves random printed expressions and very long
update rules unchanged; the formatter never changes the syntax tree (so the
floating-point evaluation order); long rules still compute the right values.
"""

import ast
import hashlib
import os
import random
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import sympy as sp
from conftest import OPTIMIZERS, ROOT

import flowgen
from flowgen.codegen import generate, load_module, pyfmt
from flowgen.codegen.jaxgen import _printer, pycode
from flowgen.flow import build_flow
from flowgen.language import check_program, parse_text
from flowgen.symbolic.model import rmean, rsum


def ruff_format(text: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--isolated", "--line-length", "100", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def hashes_script() -> str:
    return (
        "import hashlib, json, sys\n"
        "import flowgen\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    of = flowgen.load(p)\n"
        "    out[p] = [hashlib.sha256(s.encode()).hexdigest()\n"
        "              for s in (of.codegen(), of.optax_source())]\n"
        "print(json.dumps(out))\n"
    )


def test_codegen_bytes_do_not_depend_on_ruff(tmp_path, monkeypatch):
    """The same bytes in this interpreter (ruff installed) and in one where ruff can be
    neither found on PATH nor imported, nor run as a subprocess."""
    import json

    paths = [str(p) for p in OPTIMIZERS]
    ours = {
        p: [
            hashlib.sha256(s.encode()).hexdigest()
            for s in (flowgen.load(p).codegen(), flowgen.load(p).optax_source())
        ]
        for p in paths
    }
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import subprocess, sys\n"
        "sys.modules['ruff'] = None\n"
        "def _no(*a, **k):\n"
        "    raise RuntimeError('no subprocess while generating code')\n"
        "subprocess.run = subprocess.Popen = _no\n"
    )
    env = {
        **os.environ,
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "JAX_PLATFORMS": "cpu",
    }
    res = subprocess.run(
        [sys.executable, "-c", hashes_script(), *paths],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ours


# ----------------------------------------------------------- random expressions

NAMES = [sp.Symbol(n, real=True) for n in ("lr", "beta1", "g", "m", "v", "t", "w")]
POS = [sp.Symbol(n, positive=True) for n in ("eps", "beta2")]


def random_expr(rng: random.Random, depth: int = 0) -> sp.Expr:
    atoms = [
        *NAMES,
        *POS,
        sp.Integer(rng.randint(1, 9)),
        sp.Rational(rng.randint(1, 9), rng.randint(2, 11)),
        sp.Float(rng.choice(["1e-8", "0.5", "2.5e3", "3.14159"])),
    ]
    if depth > 3 or rng.random() < 0.25:
        return rng.choice(atoms)
    a, b = random_expr(rng, depth + 1), random_expr(rng, depth + 1)
    op = rng.randrange(12)
    if op == 0:
        return a + b
    if op == 1:
        return a - b
    if op == 2:
        return a * b
    if op == 3:
        return a / b
    if op == 4:
        return a ** rng.choice([2, 3, -1, -2, sp.Rational(1, 2), sp.Rational(3, 2)])
    if op == 5:
        return sp.Pow(rng.choice(POS), a)
    if op == 6:
        return -a
    if op == 7:
        return sp.sqrt(sp.Abs(a) + rng.choice(POS))
    if op == 8:
        return sp.exp(a) + sp.log(rng.choice(POS) + b**2)
    if op == 9:
        return sp.Max(a, b) - sp.Min(a, b) * sp.sign(a)
    if op == 10:
        return rsum(a * b) + rmean(a**2)
    return (a + b) ** rng.choice([2, -1])


def test_printed_expressions_are_a_fixed_point_of_ruff_with_the_same_tree():
    rng = random.Random(0)
    lines, seen = [], set()
    while len(lines) < 400:
        try:
            e = random_expr(rng)
        except (ValueError, TypeError):  # e.g. Max of incomparable constants
            continue
        if not e.free_symbols or e in seen or e.has(sp.zoo, sp.oo, -sp.oo, sp.nan, sp.I):
            continue
        seen.add(e)
        raw = _printer.doprint(e)
        code = pycode(e, {})
        # the formatter never changes the syntax tree, hence the evaluation order
        assert ast.dump(ast.parse(raw, mode="eval")) == ast.dump(ast.parse(code, mode="eval"))
        line = f"x{len(lines)} = {code}"
        if len(line) <= 100:
            lines.append(line)
    text = "\n".join(lines) + "\n"
    formatted = ruff_format(text)
    if formatted != text:
        pairs = zip(text.splitlines(), formatted.splitlines(), strict=False)
        raise AssertionError([(a, b) for a, b in pairs if a != b][:5])


@pytest.mark.parametrize(
    "literal, expected",
    [("1E5", "1e5"), (".5", "0.5"), ("1.", "1.0"), ("2.5E+03", "2.5e03"), ("0XFF", "0xFF")],
)
def test_number_literals_as_ruff_writes_them(literal, expected):
    assert pyfmt.expr(f"x * {literal}") == f"x * {expected}"
    assert ruff_format(f"y = x * {literal}\n") == f"y = x * {expected}\n"


# ---------------------------------------------------------- long update rules


def long_rule(k: int) -> str:
    terms = " + ".join(f"beta{i} * m * g^{1 + i % 3}" for i in range(k))
    hypers = "\n".join(f"hyper beta{i} = {0.1 + 0.01 * i:.2f}" for i in range(k))
    return textwrap.dedent(
        """\
        optimizer longrule "a rule longer than a line"
        hyper lr = 0.01
        {hypers}
        state m = 0
        update {{
            m = 0.9 * m + 0.1 * g
            u = {terms}
            w = w - lr * u / sqrt(1 + m^2 + ({terms})^2)
        }}
        """
    ).format(hypers=hypers, terms=terms)


def test_long_rules_stay_within_the_line_length_and_compute_the_same():
    text = long_rule(14)
    prog = parse_text(text, "longrule.opt")
    check_program(prog)
    spec = build_flow(prog, require_central=False)
    src = generate(spec)
    assert ruff_format(src) == src
    body = [ln for ln in src.splitlines() if not ln.lstrip().startswith(("#",))]
    code_lines = _code_lines(src)
    assert max(len(ln) for ln in code_lines) <= 100, max(code_lines, key=len)
    assert len(body) > 0
    mod = load_module(src, "longrule")
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=5), rng.normal(size=5)
    w1, s1 = mod.step(jnp.asarray(w), mod.init_state(jnp.asarray(w)), jnp.asarray(g), 1.0)
    m = 0.1 * g
    h = spec.hyper
    u = sum(h[f"beta{i}"] * m * g ** (1 + i % 3) for i in range(14))
    np.testing.assert_allclose(np.asarray(w1), w - 0.01 * u / np.sqrt(1 + m**2 + u**2), rtol=1e-12)
    # the optax module too
    osrc = flowgen.OptFile(prog).optax_source()
    assert ruff_format(osrc) == osrc
    assert max(len(ln) for ln in _code_lines(osrc)) <= 100


def _code_lines(src: str) -> list[str]:
    """Lines outside docstrings (docstrings may hold long formulas, which cannot wrap)."""
    tree = ast.parse(src)
    doc_lines = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            val = body[0].value
            if isinstance(val, ast.Constant) and isinstance(val.value, str):
                doc_lines.update(range(val.lineno, val.end_lineno + 1))
    return [ln for i, ln in enumerate(src.splitlines(), start=1) if i not in doc_lines]
