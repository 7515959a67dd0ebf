"""Stage 1 — the `.opt` language: grammar, AST, error messages, static checks."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowgen.errors import FlowgenError, OptCheckError, OptSyntaxError
from flowgen.language import check_program, load_program, parse_file, parse_text
from flowgen.language import parser as parser_module
from flowgen.language.ast import (
    FUNCTIONS,
    Assign,
    BinOp,
    Call,
    HyperDecl,
    Name,
    Neg,
    Num,
    Program,
    StateDecl,
)
from flowgen.language.checks import expr_is_scalar, local_kinds

ROOT = Path(__file__).resolve().parents[1]
OPT_FILES = sorted((ROOT / "optimizers").glob("*.opt"))

# ------------------------------------------------------------ shipped files


def test_there_are_shipped_optimizers():
    assert OPT_FILES, "optimizers/*.opt should not be empty"


@pytest.mark.parametrize("path", OPT_FILES, ids=lambda p: p.name)
def test_shipped_optimizer_parses_and_checks(path):
    prog = load_program(str(path))
    assert prog.name
    assert prog.path == str(path)
    assert prog.update and prog.update[-1].target == "w"
    assert prog.update_line >= 1 and prog.update_column >= 1


# -------------------------------------------------------------- bad programs

HEAD = (
    "optimizer demo\n"  # 1
    "hyper lr = 0.1\n"  # 2
    "hyper beta1 = 0.9\n"  # 3
    "state m = 0\n"  # 4
    "state v : scalar = 0\n"  # 5
)


def upd(*body: str) -> str:
    """HEAD + an update block (its `update {` on line 6, the body from line 7)."""
    return HEAD + "update {\n" + "".join(line + "\n" for line in body) + "}\n"


S, C = OptSyntaxError, OptCheckError

# (id, source, error class, fragment of the message, line, column of the caret)
# fmt: off
BAD = [
    # --- program structure
    ("no-optimizer", "# nothing here\n", S, "declares no optimizer", 1, 1),
    ("optimizer-not-first", "hyper lr = 1\noptimizer a\nupdate { w = w }\n", S,
     "optimizer must be declared first", 1, 1),
    ("second-optimizer", "optimizer a\noptimizer b\nupdate { w = w }\n", S,
     "a second `optimizer`", 2, 1),
    ("no-update", "optimizer a\nhyper lr = 1\n", S, "has no `update", 1, 1),
    ("two-updates", "optimizer a\nupdate { w = w }\nupdate { w = w }\n", S,
     "a second `update` block", 3, 1),
    # --- syntax errors
    ("expr-after-eq", upd("m = ", "w = w"), S, "expected an expression after `=`", 7, 4),
    ("expr-after-op", upd("m = 2 *", "w = w"), S, "expected an expression after `*`", 7, 8),
    ("expr-after-comma", upd("m = max(g,)", "w = w"), S,
     "expected an expression after `,`, found `)`", 7, 11),
    ("unexpected-rpar", upd("m = g)", "w = w"), S, "unexpected `)`", 7, 6),
    ("missing-rpar", upd("m = (g + 1", "w = w"), S, "missing `)`", 7, 11),
    ("missing-rpar-comment", upd("m = sqrt(g  # comment", "w = w"), S, "missing `)`", 7, 11),
    ("unterminated-string", 'optimizer a "Adam\nupdate { w = w }\n', S,
     "unterminated string", 1, 13),
    ("missing-rbrace", HEAD + "update {\n  w = w - lr * g\n", S,
     "missing `}` at the end of the update block", 7, 17),
    ("missing-rbrace-no-newline", HEAD + "update {\n  w = w - lr * g", S,
     "missing `}` at the end of the update block", 7, 17),
    ("decl-inside-update", HEAD + "update {\n  w = w\nhyper b = 2\n", S,
     "unexpected `hyper` inside the update block", 8, 1),
    ("hyper-not-a-number", "optimizer a\nhyper lr = abc\nupdate { w = w }\n", S,
     "expected a number for hyper `lr`", 2, 12),
    ("hyper-missing-value", "optimizer a\nhyper lr =\nupdate { w = w }\n", S,
     "expected a number for hyper `lr`", 2, 11),
    ("hyper-expression", "optimizer a\nhyper lr = 1 * 2\nupdate { w = w }\n", S,
     "expected the end of the line after the value of hyper `lr`", 2, 14),
    ("hyper-missing-eq", "optimizer a\nhyper lr 1\nupdate { w = w }\n", S,
     "expected `=` after `hyper lr`", 2, 10),
    ("state-kind", "optimizer a\nstate m : vector = 0\nupdate { w = w }\n", S,
     "expected `scalar` after `state m :`", 2, 11),
    ("state-missing-eq", "optimizer a\nstate m 0\nupdate { w = w }\n", S,
     "expected `=` or `: scalar` after `state m`", 2, 9),
    ("optimizer-no-name", "optimizer\nupdate { w = w }\n", S,
     "expected the optimizer's name", 1, 10),
    ("optimizer-extra", "optimizer a b\nupdate { w = w }\n", S,
     "expected a description in double quotes", 1, 13),
    ("missing-operator", upd("m = beta1 m", "w = w"), S,
     "expected an operator or the end of the line before `m`", 7, 11),
    ("two-dots", upd("m = 1.2.3", "w = w"), S, "before the number `.3`", 7, 8),
    ("double-assign", upd("m = g = 2", "w = w"), S, "unexpected `=`", 7, 7),
    ("reserved-word", upd("m = hyper", "w = w"), S, "`hyper` is a reserved word", 7, 5),
    ("reserved-decl", "optimizer a\nstate update = 0\nupdate { w = w }\n", S,
     "`update` is a reserved word", 2, 7),
    ("bad-character", upd("m = g @ 2", "w = w"), S, "unexpected character `@`", 7, 7),
    ("non-ascii-name", upd("m = β * g", "w = w"), S, "unexpected character `β`", 7, 5),
    ("misspelled-keyword", "optimizer a\nhyperr lr = 1\nupdate { w = w }\n", S,
     "unexpected `hyperr`", 2, 1),
    ("assignment-at-top", HEAD + "w = w\n", S, "unexpected `w`", 6, 1),
    ("stray-rbrace", "optimizer a\n}\n", S, "no update block is open", 2, 1),
    ("update-no-brace", "optimizer a\nupdate\n  w = w\n", S, "expected `{` after `update`", 3, 3),
    ("statement-not-assign", upd("m + 1", "w = w"), S, "expected `=` after `m`", 7, 3),
    ("statement-number", upd("3 = m", "w = w"), S, "expected a statement", 7, 1),
    ("after-block", HEAD + "update { w = w } x\n", S, "expected the end of the line", 6, 18),
    # --- checks: names
    ("undeclared", upd("m = bta1 * m + g", "w = w"), C, "undeclared name `bta1`", 7, 5),
    ("assign-g", upd("g = 1", "w = w"), C, "cannot assign to `g`: it is the gradient, read-only",
     7, 1),
    ("assign-t", upd("t = 1", "w = w"), C, "cannot assign to `t`: it is the step counter", 7, 1),
    ("assign-hyper", upd("m = g", "lr = 2", "w = w"), C,
     "cannot assign to `lr`: it is a hyperparameter, read-only", 8, 1),
    ("assign-function", upd("sqrt = g", "w = w"), C, "cannot assign to `sqrt`", 7, 1),
    ("function-as-value", upd("m = 2 * sqrt", "w = w"), C, "`sqrt` is a function", 7, 9),
    # --- checks: assignment order
    ("state-twice", upd("m = g", "m = 2 * m", "w = w"), C,
     "state `m` is assigned twice", 8, 1),
    ("w-never", upd("m = g"), C, "the update never assigns `w`", 6, 1),
    ("w-not-last", upd("w = w - lr * g", "m = g"), C,
     "`w` must be assigned last; `m` is assigned after it", 8, 1),
    ("w-twice", upd("w = w", "w = w - lr * g"), C, "`w` is assigned twice", 8, 1),
    ("local-before-def", upd("a = 2 * b", "b = g", "w = w"), C,
     "local `b` is used before it is assigned", 7, 9),
    ("local-self", upd("a = a + g", "w = w"), C, "local `a` is used before it is assigned", 7, 5),
    ("local-twice", upd("a = g", "a = 2", "w = w"), C, "local `a` is assigned twice", 8, 1),
    ("empty-update", HEAD + "update {\n  # nothing yet\n}\n", C, "the update block is empty", 6, 1),
    # --- checks: functions
    ("unknown-function", upd("m = sqr(g)", "w = w"), C, "unknown function `sqr`", 7, 5),
    ("arity-1", upd("m = sqrt(g, m)", "w = w"), C, "`sqrt` takes 1 argument, got 2", 7, 5),
    ("arity-2", upd("m = 1 + max(g)", "w = w"), C, "`max` takes 2 arguments, got 1", 7, 9),
    ("reduction-of-reduction", upd("v = sum(norm(g))", "w = w"), C,
     "reduction of a reduction", 7, 5),
    ("reduction-of-scalar-state", upd("v = 2 * mean(v)", "w = w"), C, "reduction of a scalar",
     7, 9),
    ("reduction-of-reduced-local", upd("n = norm(g)", "v = mean(n)", "w = w"), C,
     "reduction of a reduction", 8, 5),
    # --- checks: declarations
    ("hyper-twice", "optimizer a\nhyper lr = 1\nhyper lr = 2\nupdate { w = w }\n", C,
     "hyper `lr` is declared twice", 3, 7),
    ("state-declared-twice", "optimizer a\nstate m = 0\nstate m = 1\nupdate { w = w }\n", C,
     "state `m` is declared twice", 3, 7),
    ("hyper-and-state", "optimizer a\nhyper m = 1\nstate m = 0\nupdate { w = w }\n", C,
     "declared both as a hyper and as a state", 3, 7),
    ("declare-reserved", "optimizer a\nstate g = 0\nupdate { w = w }\n", C,
     "cannot declare `g`", 2, 7),
    ("declare-function", "optimizer a\nhyper sqrt = 1\nupdate { w = w }\n", C,
     "cannot declare `sqrt`: it is the name of a function", 2, 7),
    ("init-uses-g", "optimizer a\nstate m = 0.5 * g\nupdate { w = w }\n", C,
     "the initial value of state `m` cannot use `g`", 2, 17),
    ("init-uses-t", "optimizer a\nstate m = t\nupdate { w = w }\n", C,
     "cannot use `t`", 2, 11),
    ("init-undeclared", "optimizer a\nhyper lr = 1\nstate m = lrr\nupdate { w = w }\n", C,
     "undeclared name `lrr`", 3, 11),
    ("init-uses-state", "optimizer a\nstate m = 0\nstate s = m\nupdate { w = w }\n", C,
     "cannot use the state `m`", 3, 11),
    # --- checks: scalar / per-coordinate
    ("scalar-state-per-coord", upd("v = g * 2", "w = w"), C,
     "state `v` is scalar but the value is per-coordinate; reduce it with sum/mean/norm", 7, 1),
    ("scalar-state-per-coord-local", upd("a = m + 1", "v = a", "w = w"), C,
     "state `v` is scalar but the value is per-coordinate", 8, 1),
    ("scalar-init-per-coord", "optimizer a\nstate s : scalar = w\nupdate { w = w }\n", C,
     "state `s` is scalar but its initial value is per-coordinate", 2, 7),
    ("too-large", upd("a = 1e999 * g", "w = w"), C, "the number `1e999` is too large", 7, 5),
]
# fmt: on


def _fail_with(source: str, path: str = "bad.opt") -> FlowgenError:
    with pytest.raises(FlowgenError) as info:
        check_program(parse_text(source, path))
    return info.value


def test_bad_table_is_big_enough():
    assert len(BAD) >= 25
    assert len({row[0] for row in BAD}) == len(BAD)


@pytest.mark.parametrize(
    ("source", "cls", "fragment", "line", "col"), [r[1:] for r in BAD], ids=[r[0] for r in BAD]
)
def test_bad_program(source, cls, fragment, line, col):
    err = _fail_with(source)
    assert type(err) is cls, err.format()
    assert fragment in err.message, err.format()
    assert (err.line, err.column) == (line, col), err.format()

    text = err.format()
    lines = text.split("\n")
    assert lines[0].startswith(f"bad.opt:{line}:{col}: error: ")
    source_line = source.split("\n")[line - 1]
    assert source_line.strip(), "every row must point at a non-blank line"
    assert lines[1] == "    " + source_line.expandtabs(1)
    caret = lines[2]
    assert caret.strip() == "^"
    assert caret.index("^") == 4 + col - 1
    assert "Traceback" not in text and "Token(" not in text


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        (upd("m = bta1 * m + g", "w = w"), "did you mean `beta1`?"),
        (upd("m = sqr(g)", "w = w"), "did you mean `sqrt`?"),
        ("optimizer a\nhyper lr = 1\nstate m = lrr\nupdate { w = w }\n", "did you mean `lr`?"),
        ("optimizer a\nhyperr lr = 1\nupdate { w = w }\n", "did you mean `hyper`?"),
        (upd("m = (g + 1", "w = w"), "the `(` at line 7, column 5 is never closed"),
        (HEAD + "update {\n  w = w - lr * g\n", "opened at line 6"),
        (upd("m = m(2)", "w = w"), "`m` is a state, not a function"),
        (upd("a = 2 * b", "b = g", "w = w"), "assigned at line 8"),
        (upd("m = g", "m = 2 * m", "w = w"), "first assigned at line 7"),
        ("optimizer a\nhyper lr = 1\nhyper lr = 2\nupdate { w = w }\n", "at line 2"),
    ],
)
def test_hints(source, hint):
    err = _fail_with(source)
    assert err.hint and hint in err.hint, err.format()
    assert f"hint: {err.hint}" in err.format()


def test_empty_text_has_a_location_without_source_line():
    err = _fail_with("")
    assert isinstance(err, OptSyntaxError)
    assert (err.line, err.column) == (1, 1)
    assert err.format().startswith("bad.opt:1:1: error:")


def test_syntax_examples_table_gives_its_own_messages():
    for message, _hint, examples in parser_module.SYNTAX_EXAMPLES:
        stem = message.split("{name}")[0]
        for example in examples:
            err = _fail_with(example)
            assert isinstance(err, OptSyntaxError)
            assert err.message.startswith(stem), (example, err.message)


def test_parse_file_errors(tmp_path):
    with pytest.raises(OptSyntaxError) as info:
        parse_file(tmp_path / "missing.opt")
    assert info.value.location is None
    assert "no such file" in info.value.message
    assert "missing.opt" in info.value.format()

    with pytest.raises(OptSyntaxError) as info:
        parse_file(tmp_path)
    assert "directory" in info.value.message

    binary = tmp_path / "binary.opt"
    binary.write_bytes(b"optimizer a\n\xff\xfe\n")
    with pytest.raises(OptSyntaxError) as info:
        parse_file(binary)
    assert "UTF-8" in info.value.message


def test_parse_file_reports_the_path(tmp_path):
    bad = tmp_path / "bad.opt"
    bad.write_text(upd("m = bta1", "w = w"))
    with pytest.raises(OptCheckError) as info:
        load_program(str(bad))
    assert info.value.format().startswith(f"{bad}:7:5: error: undeclared name `bta1`")


# ------------------------------------------------------------------ the AST

DSL_EXAMPLE = """\
# optimizers/adam.opt — Adam with bias correction
optimizer adam "Adam (Kingma & Ba, 2015)"

hyper lr    = 1e-3     # learning rate
hyper beta1 = 0.9
hyper beta2 = 0.999
hyper eps   = 1e-8

state m = 0            # per-coordinate state, same shape as w
state v = 0

update {
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    mhat = m / (1 - beta1^t)
    vhat = v / (1 - beta2^t)
    w = w - lr * mhat / (sqrt(vhat) + eps)
}
"""


def n(x: str) -> Name:
    return Name(x)


def num(text: str) -> Num:
    return Num(float(text), text)


def b(op: str, left, right) -> BinOp:
    return BinOp(op, left, right)


ADAM_UPDATE = (
    Assign("m", b("+", b("*", n("beta1"), n("m")), b("*", b("-", num("1"), n("beta1")), n("g")))),
    Assign(
        "v",
        b(
            "+",
            b("*", n("beta2"), n("v")),
            b("*", b("-", num("1"), n("beta2")), b("^", n("g"), num("2"))),
        ),
    ),
    Assign("mhat", b("/", n("m"), b("-", num("1"), b("^", n("beta1"), n("t"))))),
    Assign("vhat", b("/", n("v"), b("-", num("1"), b("^", n("beta2"), n("t"))))),
    Assign(
        "w",
        b(
            "-",
            n("w"),
            b("/", b("*", n("lr"), n("mhat")), b("+", Call("sqrt", (n("vhat"),)), n("eps"))),
        ),
    ),
)


def test_dsl_example_ast():
    prog = parse_text(DSL_EXAMPLE, "adam.opt")
    check_program(prog)
    assert isinstance(prog, Program)
    assert prog.name == "adam"
    assert prog.description == "Adam (Kingma & Ba, 2015)"
    assert prog.hypers == (
        HyperDecl("lr", 1e-3, "1e-3"),
        HyperDecl("beta1", 0.9, "0.9"),
        HyperDecl("beta2", 0.999, "0.999"),
        HyperDecl("eps", 1e-8, "1e-8"),
    )
    assert prog.hyper_defaults == {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    assert prog.states == (StateDecl("m", num("0")), StateDecl("v", num("0")))
    assert prog.update == ADAM_UPDATE
    assert (prog.path, prog.source) == ("adam.opt", DSL_EXAMPLE)
    assert (prog.line, prog.column) == (2, 1)
    assert (prog.update_line, prog.update_column) == (12, 1)


def test_dsl_example_positions():
    prog = parse_text(DSL_EXAMPLE)
    assert prog.path == "<string>"
    lr, beta1 = prog.hypers[:2]
    assert (lr.line, lr.column) == (4, 7)
    assert (beta1.line, beta1.column) == (5, 7)
    assert (prog.states[1].line, prog.states[1].column) == (10, 7)
    m_stmt, v_stmt, _, _, w_stmt = prog.update
    assert (m_stmt.line, m_stmt.column) == (13, 5)
    plus = m_stmt.value
    assert (plus.line, plus.column) == (13, 19)  # the operator
    assert (plus.left.left.line, plus.left.left.column) == (13, 9)  # `beta1`
    power = v_stmt.value.right.right
    assert power.op == "^" and (power.line, power.column) == (14, 36)
    assert (power.right.line, power.right.column) == (14, 37)  # the literal `2`
    call = w_stmt.value.right.right.left
    assert isinstance(call, Call) and (call.line, call.column) == (17, 26)


def _update_of(body: str, head: str = HEAD) -> tuple[Assign, ...]:
    prog = parse_text(head + body)
    check_program(prog)
    return prog.update


def test_double_star_is_power():
    a = _update_of("update {\n  w = w - lr * g**2\n}\n")
    c = _update_of("update {\n  w = w - lr * g^2\n}\n")
    assert a == c
    assert a[0].value.right.right == b("^", n("g"), num("2"))


def test_semicolons_and_one_line_blocks():
    expected = _update_of("update {\n  m = g\n  w = w - lr * m\n}\n")
    assert _update_of("update { m = g; w = w - lr * m }\n") == expected
    assert _update_of("update {\n  m = g;\n  w = w - lr * m;\n}\n") == expected
    assert _update_of("update {; m = g;; w = w - lr * m; }\n") == expected
    assert _update_of("update\n{\n  m = g\n  w = w - lr * m\n}") == expected


def test_comments_and_blank_lines_anywhere():
    text = (
        "\n\n# header comment\n\n"
        "optimizer sgd   # trailing comment\n"
        "\n   \n# between\n"
        "hyper lr = 0.1 # c\n"
        "\t\n"
        "update {   # after brace\n"
        "\n"
        "  # comment line in the block\n"
        "  w = w - lr * g   # why\n"
        "\n"
        "  # before the closing brace\n"
        "}   # after\n"
        "# final comment without newline"
    )
    prog = parse_text(text)
    check_program(prog)
    assert prog.name == "sgd" and prog.description == ""
    assert prog.update == (Assign("w", b("-", n("w"), b("*", n("lr"), n("g")))),)
    assert (prog.update_line, prog.update_column) == (11, 1)


def test_crlf_and_tabs():
    text = "optimizer sgd\r\nhyper lr = 0.1\r\nupdate {\r\n\tw = w - lr * g\r\n}\r\n"
    prog = parse_text(text)
    check_program(prog)
    assert prog.update[0].column == 2


def test_scalar_state_and_reductions():
    text = (
        "optimizer normed\n"
        "hyper lr = 0.1\n"
        "state s : scalar = 0\n"
        "state p = w * 0\n"
        "update {\n"
        "  gn = norm(g)\n"
        "  s = 0.9 * s + 0.1 * gn^2\n"
        "  avg = mean(g) + sum(p) / sum(abs(g))\n"
        "  p = g / gn\n"
        "  w = w - lr * p / sqrt(s + 1e-12) - avg * 0\n"
        "}\n"
    )
    prog = parse_text(text)
    check_program(prog)
    assert prog.states == (StateDecl("s", num("0"), True), StateDecl("p", b("*", n("w"), num("0"))))
    assert prog.state("s").scalar and not prog.state("p").scalar
    assert prog.update[0].value == Call("norm", (n("g"),))
    assert local_kinds(prog) == {"gn": True, "avg": True}
    kinds = local_kinds(prog)
    assert expr_is_scalar(prog.update[1].value, prog, kinds)
    assert not expr_is_scalar(prog.update[3].value, prog, kinds)


def test_all_functions():
    body = (
        "update {\n"
        "  a = sqrt(g) + exp(g) + log(g) + abs(g) + sign(g)\n"
        "  c = min(g, 0) + max(m, lr)\n"
        "  d = sum(g) + mean(g) + norm(g)\n"
        "  w = w - lr * (a + c + d)\n"
        "}\n"
    )
    update = _update_of(body)
    calls = []
    for stmt in update[:3]:
        stack = [stmt.value]
        while stack:
            e = stack.pop()
            if isinstance(e, BinOp):
                stack += [e.left, e.right]
            elif isinstance(e, Call):
                calls.append((e.func, len(e.args)))
    assert sorted(calls) == sorted(FUNCTIONS.items())
    assert update[1].value.left == Call("min", (n("g"), num("0")))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-x^2", Neg(b("^", n("x"), num("2")))),
        ("-x**2", Neg(b("^", n("x"), num("2")))),
        ("x^-2", b("^", n("x"), Neg(num("2")))),
        ("a^b^c", b("^", n("a"), b("^", n("b"), n("c")))),
        ("a**b^c", b("^", n("a"), b("^", n("b"), n("c")))),
        ("a - b - c", b("-", b("-", n("a"), n("b")), n("c"))),
        ("a / b * c", b("*", b("/", n("a"), n("b")), n("c"))),
        ("a + b * c", b("+", n("a"), b("*", n("b"), n("c")))),
        ("(a + b) * c", b("*", b("+", n("a"), n("b")), n("c"))),
        ("2 * -g", b("*", num("2"), Neg(n("g")))),
        ("--g", Neg(Neg(n("g")))),
        ("-(a)^2", Neg(b("^", n("a"), num("2")))),
        ("(-a)^2", b("^", Neg(n("a")), num("2"))),
        ("max(a, -b)", Call("max", (n("a"), Neg(n("b"))))),
        ("sqrt((g))", Call("sqrt", (n("g"),))),
        ("2a_1", None),  # syntax error: a number followed by a name
    ],
)
def test_precedence(text, expected):
    head = "optimizer p\nhyper a = 1\nhyper b = 2\nhyper c = 3\nhyper x = 4\n"
    source = head + "update {\n  y = " + text + "\n  w = w - y * g\n}\n"
    if expected is None:
        with pytest.raises(OptSyntaxError):
            parse_text(source)
        return
    prog = parse_text(source)
    check_program(prog)
    assert prog.update[0].value == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3.0),
        ("0.9", 0.9),
        ("1e-8", 1e-8),
        (".5", 0.5),
        ("1E+3", 1000.0),
        ("2.", 2.0),
        ("10", 10.0),
        ("1.5e2", 150.0),
    ],
)
def test_numbers(text, value):
    prog = parse_text(f"optimizer a\nhyper h = {text}\nupdate {{\n  w = w - {text} * g\n}}\n")
    check_program(prog)
    assert prog.hypers[0] == HyperDecl("h", value, text)
    lit = prog.update[0].value.right.left
    assert lit == Num(value, text) and (lit.line, lit.column) == (4, 11)


def test_negative_hyper_and_description_escapes():
    prog = parse_text('optimizer a "say \\"hi\\""\nhyper wd = -1e-2\nupdate { w = w - wd * g }\n')
    check_program(prog)
    assert prog.description == 'say "hi"'
    assert prog.hypers == (HyperDecl("wd", -0.01, "-1e-2"),)


def test_names_may_start_with_keywords():
    prog = parse_text(
        "optimizer a\nhyper hyper1 = 1\nhyper update_rate = 2\nstate states = 0\n"
        "update {\n  scalars = hyper1 * g\n  states = scalars\n  w = w - update_rate * states\n}\n"
    )
    check_program(prog)
    assert [h.name for h in prog.hypers] == ["hyper1", "update_rate"]


def test_state_may_be_read_before_its_assignment_and_w_in_init():
    prog = parse_text(
        "optimizer a\nhyper lr = 1\nstate m = w * lr\nstate s : scalar = norm(w)\n"
        "update {\n  old = m\n  m = g\n  s = s + sum(m - old)\n  w = w - lr * m\n}\n"
    )
    check_program(prog)


def test_parser_is_built_once():
    assert parser_module._parser() is parser_module._parser()
    assert parser_module.grammar_path().is_file()


def test_grammar_aliases_are_named_after_ast_classes():
    import flowgen.language.ast as ast

    grammar = parser_module.grammar_path().read_text()
    aliases = set(re.findall(r"->\s*(\w+)", grammar))
    assert aliases == {"bin_op", "neg", "num", "name", "call"}
    classes = {c.__name__.lower() for c in vars(ast).values() if isinstance(c, type)}
    assert {a.replace("_", "") for a in aliases} <= classes


# ------------------------------------------------------ robustness (fuzzing)

TOKENS = [
    *"optimizer hyper state update scalar lr beta1 m v w g t x sqrt max sum norm mean".split(),
    *"0 1 0.9 1e-8 .5 1e999 + - * / ^ ** ( ) { } = : , ; # β".split(),
    "\n",
    '"',
    '"desc"',
    "# c\n",
    "\t",
    "\r\n",
]

_piece = st.one_of(
    st.sampled_from(TOKENS),
    st.sampled_from(TOKENS),
    st.text(alphabet=string.printable, max_size=3),
)
_soup = st.lists(st.tuples(_piece, st.sampled_from([" ", "", "\n"])), max_size=40).map(
    lambda parts: "".join(p + s for p, s in parts)
)
_programs = st.one_of(
    _soup,
    _soup.map(lambda s: "optimizer fuzz\n" + s),
    _soup.map(lambda s: HEAD + "update {\n" + s + "\n}\n"),
    st.tuples(_soup, _soup).map(lambda p: HEAD + p[0] + "\nupdate {\n" + p[1] + "\nw = w\n}\n"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_programs)
def test_token_soup_raises_only_flowgen_errors(text):
    try:
        check_program(parse_text(text, "soup.opt"))
    except FlowgenError as err:
        assert isinstance(err, (OptSyntaxError, OptCheckError))
        assert err.message and "Token(" not in err.message
        rendered = err.format()
        assert rendered.startswith("soup.opt:")
        assert err.line >= 1 and err.column >= 1


def test_deep_nesting_is_an_error_not_a_crash():
    deep = "(" * 5000 + "g" + ")" * 5000
    try:
        check_program(parse_text(HEAD + "update {\n  w = " + deep + "\n}\n"))
    except FlowgenError:
        pass
    long_sum = " + ".join(["g"] * 5000)
    try:
        check_program(parse_text(HEAD + "update {\n  w = " + long_sum + "\n}\n"))
    except FlowgenError:
        pass
