"""Hypothesis strategies for the differential fuzzer: random well-formed `.opt` programs,
and mutations of files and of ``--set`` values.

:func:`programs` draws whole files that the language accepts by construction:
hyperparameters (with Python keywords, builtins and names of the generated
module among their names), per-coordinate and scalar states with initial values
in hyperparameters, numbers and ``w``, and an update block of locals and state
assignments in random order — each state at most once, read before or after its
assignment, locals only after theirs — ending with ``w``. Expressions use every
operator, every function, the reductions (always of a per-coordinate value),
``t``, and numbers in every written form. Scalar targets get scalar values; a
per-coordinate target may get a scalar (it must take ``w``'s shape).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

# names a file may declare: ordinary ones, Python keywords and builtins, names the
# generated module uses itself, and names of internal symbols of the derivation
NAMES = (
    "lr beta beta1 beta2 eps mu a b c p x0 x1 lam kappa rho decay m2 v_hat "
    "lambda def None class float sum_ jnp jax HYPER STATE_KINDS dw new Eg Vg"
).split()
NUMBERS = (
    "0 1 2 3 7 10 0.5 .5 0.9 0.99 0.1 1e-3 1e-8 2.5 1e2 1e20 1e-30 0.25 100 1.5e-2 4"
).split()
HYPER_VALUES = "0.1 0.9 0.5 2 1e-3 3 0 -0.5 1e-8 10 0.999 -2 1.5".split()
UNARY = ("sqrt", "exp", "log", "abs", "sign")
BINARY = ("min", "max")
REDUCTIONS = ("sum", "mean", "norm")
OPS = ("+", "-", "*", "/", "^")


@dataclass(frozen=True)
class Program:
    text: str
    hyper_names: tuple[str, ...]


class _Scope:
    """Names readable at a point of the program, with their kinds (scalar or not)."""

    def __init__(self, scalars, percoord):
        self.scalars = list(scalars)
        self.percoord = list(percoord)


def _leaf(draw, scope: _Scope, kind: str) -> str:
    if kind == "percoord":
        return draw(st.sampled_from(scope.percoord))
    options = [*scope.scalars, *NUMBERS[:8]]
    if kind == "any":
        options += scope.percoord * 2
    choice = draw(st.sampled_from(options + list(NUMBERS)))
    return choice


def _expr(draw, scope: _Scope, depth: int, kind: str) -> str:
    """An expression of the given kind: "scalar", "percoord" or "any"."""
    if depth <= 0 or draw(st.integers(0, 9)) < 3:
        return _leaf(draw, scope, kind)
    form = draw(st.sampled_from(["op", "op", "op", "neg", "unary", "binary", "reduction"]))
    if form == "reduction":
        if kind == "percoord":
            form = "op"
        else:
            fn = draw(st.sampled_from(REDUCTIONS))
            return f"{fn}({_expr(draw, scope, depth - 1, 'percoord')})"
    if form == "neg":
        inner = _expr(draw, scope, depth - 1, kind)
        return f"-{inner}" if draw(st.booleans()) else f"-({inner})"
    if form == "unary":
        fn = draw(st.sampled_from(UNARY))
        return f"{fn}({_expr(draw, scope, depth - 1, kind)})"
    # binary operations: for a per-coordinate result one side must be per-coordinate
    op = draw(st.sampled_from(OPS)) if form == "op" else None
    small_exponent = op == "^" and draw(st.integers(0, 3)) > 0
    if kind == "percoord":
        left_first = draw(st.booleans()) or small_exponent
        kinds = ["percoord", "any"] if left_first else ["any", "percoord"]
    else:
        kinds = [kind, kind]
    left = _expr(draw, scope, depth - 1, kinds[0])
    if small_exponent:  # mostly small exponents, so that values stay finite often enough
        small = ["2", "0.5", "3", "-1", "1.5", "(1/3)", "-2"]
        right = draw(st.sampled_from(small + (["t"] if "t" in scope.scalars else [])))
    else:
        right = _expr(draw, scope, depth - 1, kinds[1])
    if form == "binary":
        return f"{draw(st.sampled_from(BINARY))}({left}, {right})"
    if op == "^":
        op = draw(st.sampled_from(["^", "**"]))
    return f"({left} {op} {right})" if draw(st.booleans()) else f"{left} {op} {right}"


@st.composite
def programs(draw, max_depth: int = 4) -> Program:
    """A random well-formed `.opt` program."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=12, unique=True))
    n_hyper = draw(st.integers(1, max(1, min(3, len(names)))))
    hypers, rest = names[:n_hyper], names[n_hyper:]
    n_states = draw(st.integers(0, min(3, len(rest))))
    states, locals_pool = rest[:n_states], rest[n_states:]
    scalar = {s: draw(st.booleans()) for s in states}

    lines = ['optimizer fuzz "a random program"']
    for h in hypers:
        lines.append(f"hyper {h} = {draw(st.sampled_from(HYPER_VALUES))}")
    init_scope = _Scope(hypers, ["w"])
    for s in states:
        kind = "scalar" if scalar[s] else "any"
        init = _expr(draw, init_scope, draw(st.integers(0, 2)), kind)
        lines.append(f"state {s}{' : scalar' if scalar[s] else ''} = {init}")

    scope = _Scope(
        [*hypers, "t", *(s for s in states if scalar[s])],
        ["g", "w", *(s for s in states if not scalar[s])],
    )
    todo = [("state", s) for s in states if draw(st.integers(0, 4)) > 0]
    todo += [("local", name) for name in locals_pool[: draw(st.integers(0, 3))]]
    order = draw(st.permutations(todo)) if todo else []
    body = []
    for role, name in order:
        if role == "state":
            kind = "scalar" if scalar[name] else "any"
            body.append(f"{name} = {_expr(draw, scope, draw(st.integers(0, max_depth)), kind)}")
        else:
            is_scalar = draw(st.booleans())
            value = _expr(
                draw, scope, draw(st.integers(0, max_depth)), "scalar" if is_scalar else "percoord"
            )
            body.append(f"{name} = {value}")
            (scope.scalars if is_scalar else scope.percoord).append(name)
    body.append(f"w = {_expr(draw, scope, draw(st.integers(0, max_depth)), 'any')}")
    sep = draw(st.sampled_from(["\n    ", "; "]))
    lines.append("update {" + ("\n    " if sep.startswith("\n") else " "))
    lines[-1] += sep.join(body) + ("\n}" if sep.startswith("\n") else " }")
    return Program("\n".join(lines) + "\n", tuple(hypers))


# ------------------------------------------------------------------ mutations

TOKENS = [
    *"optimizer hyper state update scalar lr beta1 m v w g t sqrt exp log max sum norm".split(),
    *"0 1 0.9 1e-8 .5 1e999 1e308 + - * / ^ ** ( ) { } = : , ; #".split(),
    "9^9^9",
    "2^2^2^2^2^2",
    "exp(" * 12,
    ")" * 12,
    "exp(710)",
    "log(0)",
    "1/0",
    "sqrt(-1)",
    "(-8)^(1/3)",
    "g^g^g^g^g^g^g^g",
    "sum(g*0 + 1)",
    "max(1, mean(g/g))",
    "Eg",
    "lambda",
    "\n",
    "\t",
    "β",
]
BAD_VALUES = (
    "nan inf -inf 1e308 -1e308 1e999 1e-320 0 -0.1 -1 1 2 1e20 abc 1e300 0x10 1_0 5e-324".split()
)


@st.composite
def mutated(draw, sources: list[str]) -> str:
    """A file from ``sources`` with a few random edits (characters, tokens, lines)."""
    text = draw(st.sampled_from(sources))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        i = draw(st.integers(0, len(text) - 1))
        edit = draw(st.sampled_from(["delete", "insert", "replace", "dup-line", "swap-lines"]))
        if edit == "delete":
            j = min(len(text), i + draw(st.integers(1, 3)))
            text = text[:i] + text[j:]
        elif edit == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif edit == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i + 1 :]
        else:
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            if edit == "dup-line":
                lines.insert(a, lines[a])
            else:
                b = draw(st.integers(0, len(lines) - 1))
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


@st.composite
def set_values(draw, names: tuple[str, ...]) -> list[str]:
    """``--set`` arguments, mostly bad: non-finite, huge, negative, misspelt names."""
    out = []
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        name = draw(st.sampled_from([*names, "lrr", "nope", ""])) if names else "lr"
        value = draw(st.sampled_from(BAD_VALUES))
        out += ["--set", f"{name}={value}"]
    return out
