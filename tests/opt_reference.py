"""An independent reference interpreter of the `.opt` language, for differential tests.

It shares nothing with flowgen but the grammar file: it parses with lark (its own
LALR parser over ``grammars/opt.lark``, no transformer) and evaluates the parse
tree with numpy in float64, following the language contract (``docs/language.md``)
literally:

* statements run in order; a state read before its assignment in a step is its
  old value, after it the new one; other assigned names are locals of the step;
* per-coordinate values have ``w``'s shape, scalars broadcast; a value assigned
  to ``w`` or to a per-coordinate state takes ``w``'s shape;
* ``+ - * / ^``, unary minus and the functions are IEEE float64 operations
  (``1/0 = inf``, ``sqrt(-1) = nan``, ``^`` is C's ``pow``) with subnormal
  numbers flushed to zero in operands and results, as XLA computes on CPU;
  ``sum``/``mean`` reduce over the coordinates, ``norm(x) = sqrt(sum(x^2))``;
  ``t`` is 1 during the first step.

It also states which files flowgen must refuse although they are well-formed in
grammar and names: :func:`refusal` applies the documented limits (depth,
size) and the float64-overflow rule for constant subexpressions. It checks no
names or kinds: the programs it runs come from a generator of well-formed programs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lark import Lark, Token, Tree

GRAMMAR = Path(__file__).resolve().parents[1] / "grammars" / "opt.lark"

# the documented limits of docs/language.md
MAX_DEPTH = 100
MAX_EXPR_NODES = 2_000
MAX_PROGRAM_NODES = 20_000

_parser = None


def _lark() -> Lark:
    global _parser
    if _parser is None:
        _parser = Lark(
            GRAMMAR.read_text(encoding="utf-8"),
            parser="lalr",
            lexer="contextual",
            maybe_placeholders=True,
        )
    return _parser


# ----------------------------------------------------------------- the program


@dataclass
class Ref:
    """A parsed program: declarations and the update's statements as parse trees."""

    name: str
    hypers: dict[str, float] = field(default_factory=dict)
    states: dict[str, tuple[bool, Tree]] = field(default_factory=dict)  # name -> (scalar, init)
    update: list[tuple[str, Tree]] = field(default_factory=list)


def parse(text: str) -> Ref:
    tree = _lark().parse(text if text.endswith("\n") else text + "\n")
    ref = None
    for item in tree.children:
        if not isinstance(item, Tree):
            continue
        kids = item.children
        if item.data == "optimizer_decl":
            ref = Ref(str(kids[1]))
        elif item.data == "hyper_decl":
            _, name, minus, number = kids
            ref.hypers[str(name)] = float(("-" if minus is not None else "") + str(number))
        elif item.data == "state_decl":
            _, name, scalar, init = kids
            ref.states[str(name)] = (scalar is not None, init)
        elif item.data == "update_block":
            for stmt in kids[1:]:
                if isinstance(stmt, Tree) and stmt.data == "assign":
                    target, value = stmt.children
                    ref.update.append((str(target), value))
    return ref


# ----------------------------------------------------------------- evaluation

_UNARY = {"sqrt": np.sqrt, "exp": np.exp, "log": np.log, "abs": np.abs, "sign": np.sign}
_BINARY = {"min": np.minimum, "max": np.maximum}
TINY = np.finfo(np.float64).tiny  # smallest normal float64


def _flush(x):
    """Subnormals to signed zero: XLA's CPU arithmetic flushes them, operands and results."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where((x != 0) & (np.abs(x) < TINY), np.copysign(0.0, x), x)
    return out if out.ndim else np.float64(out)


def _pow(a, b):
    """C's pow (IEEE 754). numpy's power takes sqrt at b = 0.5: pow(-inf, .5) is inf, not nan."""
    out = np.power(a, b)
    half = np.asarray(b) == 0.5
    out = np.where(half & np.isneginf(a), np.inf, out)
    out = np.where(half & (np.asarray(a) == 0), 0.0, out)
    return out


def _op(fn, *args):
    return _flush(fn(*[_flush(a) for a in args]))


def evaluate(node, env: dict) -> np.ndarray | np.float64:
    """The float64 value of an expression parse tree (``env``: name -> value)."""
    if isinstance(node, Token):  # pragma: no cover - expressions are trees
        raise TypeError(node)
    kind = node.data
    kids = node.children
    if kind == "num":
        return _flush(float(kids[0]))
    if kind == "name":
        return env[str(kids[0])]
    if kind == "neg":
        return _op(np.negative, evaluate(kids[1], env))
    if kind == "bin_op":
        a, op, b = evaluate(kids[0], env), str(kids[1]), evaluate(kids[2], env)
        fn = {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}.get(op, _pow)
        return _op(fn, a, b)  # ^ and ** are _pow
    if kind == "call":
        func, args = str(kids[0]), [evaluate(a, env) for a in kids[1:]]
        if func in _UNARY:
            return _op(_UNARY[func], *args)
        if func in _BINARY:
            return _op(_BINARY[func], *args)
        if func == "sum":
            return _op(np.sum, *args)
        if func == "mean":
            return _op(np.mean, *args)
        if func == "norm":
            return _op(np.sqrt, _op(np.sum, _op(np.square, *args)))
        raise KeyError(func)
    raise TypeError(kind)  # pragma: no cover


def init(ref: Ref, w: np.ndarray, hyper: dict[str, float]) -> dict:
    """The initial state: each state's initial value, at ``w``'s shape unless scalar."""
    env = {k: np.float64(v) for k, v in hyper.items()} | {"w": w}
    out = {}
    with np.errstate(all="ignore"):
        for name, (scalar, expr) in ref.states.items():
            value = evaluate(expr, env)
            out[name] = np.float64(value) if scalar else np.broadcast_to(value, w.shape).copy()
    return out


def step(ref: Ref, w: np.ndarray, state: dict, g: np.ndarray, t: int, hyper: dict[str, float]):
    """One step of the update block: returns ``(w, state)``."""
    env = {k: np.float64(v) for k, v in hyper.items()}
    env |= {"w": w, "g": g, "t": np.float64(t)} | dict(state)
    new_state = dict(state)
    new_w = w
    with np.errstate(all="ignore"):
        for target, expr in ref.update:
            value = evaluate(expr, env)
            if target == "w":
                new_w = np.broadcast_to(value, w.shape).copy()
            elif target in ref.states:
                scalar = ref.states[target][0]
                value = np.float64(value) if scalar else np.broadcast_to(value, w.shape).copy()
                new_state[target] = value
                env[target] = value
            else:
                env[target] = value
    return new_w, new_state


# ------------------------------------------------------------ what is refused


def _children(node):
    if node.data in ("num", "name"):
        return []
    if node.data == "neg":
        return [node.children[1]]
    if node.data == "bin_op":
        return [node.children[0], node.children[2]]
    return list(node.children[1:])  # call


def _depth_nodes(node) -> tuple[int, int]:
    kids = _children(node)
    if not kids:
        return 0, 1
    parts = [_depth_nodes(k) for k in kids]
    return 1 + max(d for d, _ in parts), 1 + sum(n for _, n in parts)


def _constant(node, hyper) -> np.float64 | None:
    """Value of a subexpression of numbers and hyperparameters; raises FloatingPointError
    on an overflow (finite operands, infinite result)."""
    if node.data == "num":
        return np.float64(float(node.children[0]))
    if node.data == "name":
        name = str(node.children[0])
        return np.float64(hyper[name]) if name in hyper else None
    values = [_constant(k, hyper) for k in _children(node)]
    if any(v is None for v in values):
        return None
    if node.data == "call" and str(node.children[0]) in ("sum", "mean", "norm"):
        return None
    with np.errstate(over="raise", divide="ignore", invalid="ignore", under="ignore"):
        return np.float64(evaluate(node, {k: np.float64(v) for k, v in hyper.items()}))


def refusal(ref: Ref, hyper: dict[str, float]) -> str | None:
    """Why flowgen must refuse this (grammatical, name-correct) program at these
    hyperparameters, or None: a limit of docs/language.md, or an overflow at the
    file's own hyperparameter values or at ``hyper``."""
    total = 0
    exprs = [e for _, e in ref.states.values()] + [e for _, e in ref.update]
    for expr in exprs:
        depth, nodes = _depth_nodes(expr)
        total += nodes
        if depth > MAX_DEPTH or nodes > MAX_EXPR_NODES or total > MAX_PROGRAM_NODES:
            return "limits"
    # the file's own values are checked with the file, whatever --set says later
    # (docs/language.md, "Numbers"); then the values the step runs with
    for values in (ref.hypers, hyper):
        for expr in exprs:
            try:
                _constant_everywhere(expr, values)
            except FloatingPointError:
                return "overflow"
    return None


def _constant_everywhere(node, hyper) -> None:
    _constant(node, hyper)
    for k in _children(node):
        _constant_everywhere(k, hyper)
