"""From a checked AST to sympy: symbols, reductions and the per-step map.

Conventions (``docs/mathematics.md`` §3):

* every name becomes a sympy symbol of the same name; per-coordinate values are
  represented by one coordinate (``g`` is ``g_i``), scalars broadcast;
* reductions are the sympy functions :class:`rsum` and :class:`rmean`
  (printed ``sum(...)``, ``mean(...)``); ``norm(x)`` is ``sqrt(sum(x**2))``;
* a state ``s`` read before its assignment in the step is its *old* value (the
  plain symbol ``s``); after it, the *new* value (the symbol ``s'``);
* a state whose update does not read its own old value, while some statement
  does read that old value (``gp = g`` after ``d = g - gp``), is a *delay*
  state: the previous step's value of its argument. Its new value is that
  argument, so in current values ``d'`` is replaced by it (:meth:`StepModel.to_current`).

User text is never ``sympify``-ed: expressions are built node by node.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from flowgen.errors import DerivationError, location_in
from flowgen.language import ast
from flowgen.symbolic import budget

# ------------------------------------------------------------------ reductions


class rsum(sp.Function):
    """``sum(x)``: sum over coordinates of a per-coordinate expression."""

    nargs = 1
    is_real = True
    is_number = False  # sum(1) = n is not a number the algebra may evaluate or compare

    def _sympystr(self, printer):
        return f"sum({printer._print(self.args[0])})"

    def _latex(self, printer):
        return r"\sum_i \left(" + printer._print(self.args[0]) + r"\right)"

    def _pretty(self, printer):
        from sympy.printing.pretty.stringpict import prettyForm

        return prettyForm(*printer._print(self.args[0]).parens().left("Σ "))


class rmean(sp.Function):
    """``mean(x)``: mean over coordinates of a per-coordinate expression."""

    nargs = 1
    is_real = True
    is_number = False

    @classmethod
    def eval(cls, arg):
        if arg.is_number:  # the mean of a constant is the constant
            return arg
        return None

    def _sympystr(self, printer):
        return f"mean({printer._print(self.args[0])})"

    def _latex(self, printer):
        return r"\operatorname{mean}_i \left(" + printer._print(self.args[0]) + r"\right)"

    def _pretty(self, printer):
        from sympy.printing.pretty.stringpict import prettyForm

        return prettyForm(*printer._print(self.args[0]).parens().left("mean "))


REDUCTION_CLASSES = (rsum, rmean)
NONSMOOTH = (sp.sign, sp.Abs, sp.Min, sp.Max)

#: names flowgen uses in derived drifts; a `.opt` file may not declare them
EG_NAME, VG_NAME = "Eg", "Vg"
Eg = sp.Symbol(EG_NAME, real=True)
Vg = sp.Symbol(VG_NAME, nonnegative=True)
G = sp.Symbol("g", real=True)
W = sp.Symbol("w", real=True)
T = sp.Symbol("t", positive=True)


def reductions_in(expr: sp.Expr) -> list[sp.Expr]:
    return sorted(expr.atoms(*REDUCTION_CLASSES), key=sp.default_sort_key)


def new_symbol(name: str) -> sp.Symbol:
    """The value of state ``name`` after its assignment in the current step."""
    return sp.Symbol(name + "'", real=True)


# ------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Statement:
    """One update statement: ``target = raw`` (``raw`` in names as written)."""

    target: str
    role: str  # "state" | "local" | "w"
    raw: sp.Expr  # names as plain symbols: what sequential code computes
    value: sp.Expr  # locals inlined, states as old (``s``) or new (``s'``) symbols
    node: ast.Assign


@dataclass(frozen=True)
class StepModel:
    """The per-step map of an optimizer, symbolically.

    ``f[s]`` is the new value of state ``s`` in old symbols, ``g``, ``t`` and
    hyperparameters, with the new values of earlier-assigned states as ``s'``
    symbols; ``f_full[s]`` has those expanded (old symbols only).
    """

    program: ast.Program
    hyper: dict[str, sp.Symbol]
    hyper_values: dict[str, float]
    states: tuple[str, ...]
    scalar: dict[str, bool]
    init: dict[str, sp.Expr]
    statements: tuple[Statement, ...]
    f: dict[str, sp.Expr]
    f_full: dict[str, sp.Expr]
    w_new: sp.Expr  # with s' symbols
    w_new_full: sp.Expr  # old symbols only
    assign_node: dict[str, ast.Assign]
    delays: tuple[str, ...] = ()  # delay states, in assignment order

    def sym(self, name: str) -> sp.Symbol:
        if name in self.hyper:
            return self.hyper[name]
        return {"g": G, "w": W, "t": T}.get(name) or sp.Symbol(name, real=True)

    def error(
        self, message: str, node: ast.Node | None, hint: str | None = None
    ) -> DerivationError:
        loc = None
        if node is not None and node.line:
            loc = location_in(self.program.path, self.program.source, node.line, node.column)
        return DerivationError(message, location=loc, hint=hint)

    def to_current(self, expr: sp.Expr) -> sp.Expr:
        """Express in current (flow) values: every ``s'`` becomes ``s``, and a delay
        state's new value becomes its argument (in current values)."""
        reps = {new_symbol(s): sp.Symbol(s, real=True) for s in self.states}
        for d in self.delays:  # in assignment order: an argument reads earlier states only
            reps[new_symbol(d)] = self.f[d].xreplace(reps)
        return expr.xreplace(reps)


def hyper_symbol(name: str, value: float) -> sp.Symbol:
    if value > 0:
        return sp.Symbol(name, positive=True)
    if value == 0:
        return sp.Symbol(name, nonnegative=True)
    return sp.Symbol(name, real=True)


def number(node: ast.Num) -> sp.Expr:
    """Exact rational for literals written as decimals (0.9 -> 9/10).

    A literal whose float64 value is 0 or subnormal although its text is not
    zero (``1e-400``) is taken at its float64 value, like the discrete step
    computes it (and no 400-digit denominators enter the algebra).
    """
    value = float(node.value)
    if value == 0.0 or abs(value) < 2.2250738585072014e-308:
        return sp.Integer(0) if value == 0.0 else sp.Float(value)
    try:
        return sp.Rational(node.text) if node.text else sp.Float(value)
    except (TypeError, ValueError):
        return sp.Float(value)


class NotReal(ValueError):
    """A value the derivation cannot treat as a real number, at ``node``."""

    def __init__(self, node: ast.Node, reason: str):
        super().__init__(reason)
        self.node = node
        self.reason = reason


def to_sympy(expr: ast.Expr, env: dict[str, sp.Expr]) -> sp.Expr:
    """Build a sympy expression from an AST expression (no ``sympify``).

    Raises :class:`NotReal` at a node whose value sympy knows is not real
    (``log(-lr)``, ``sqrt(-lr)`` with ``lr > 0``: NaN in float64), or that it
    cannot order where ``min``/``max`` must (a comparison of non-real values).
    """
    out = _to_sympy(expr, env)
    if out.is_real is False or out.has(sp.zoo, sp.nan):
        raise NotReal(expr, "is not a real number (NaN in float64 arithmetic)")
    return out


def _to_sympy(expr: ast.Expr, env: dict[str, sp.Expr]) -> sp.Expr:
    if isinstance(expr, ast.Num):
        return number(expr)
    if isinstance(expr, ast.Name):
        return env[expr.id]
    if isinstance(expr, ast.Neg):
        return -to_sympy(expr.operand, env)
    if isinstance(expr, ast.BinOp):
        a, b = to_sympy(expr.left, env), to_sympy(expr.right, env)
        match expr.op:
            case "+":
                return a + b
            case "-":
                return a - b
            case "*":
                return a * b
            case "/":
                return a / b
            case "^" | "**":
                return a**b
        raise AssertionError(expr.op)
    if isinstance(expr, ast.Call):
        args = [to_sympy(a, env) for a in expr.args]
        match expr.func:
            case "sqrt":
                return sp.sqrt(args[0])
            case "exp":
                return sp.exp(args[0])
            case "log":
                return sp.log(args[0])
            case "abs":
                return sp.Abs(args[0])
            case "sign":
                return sp.sign(args[0])
            case "min" | "max":
                try:
                    return (sp.Min if expr.func == "min" else sp.Max)(*args)
                except (TypeError, ValueError):
                    raise NotReal(expr, "compares values that are not real numbers") from None
            case "sum":
                return rsum(args[0])
            case "mean":
                return rmean(args[0])
            case "norm":
                return sp.sqrt(rsum(args[0] ** 2))
        raise AssertionError(expr.func)
    raise AssertionError(type(expr))


def _located(program: ast.Program, exc: NotReal) -> DerivationError:
    from flowgen.language.printer import to_text

    node = exc.node
    loc = None
    if node.line:
        loc = location_in(program.path or "<string>", program.source, node.line, node.column)
    return DerivationError(
        f"`{to_text(node)}` {exc.reason}; the derivation works with real values",
        location=loc,
        hint="the discrete optimizer computes it as NaN (flowgen codegen, run)",
    )


def build_model(program: ast.Program, overrides: dict[str, float] | None = None) -> StepModel:
    """The step map of a checked program (``overrides`` replace hyper defaults)."""
    values = dict(program.hyper_defaults)
    values.update(overrides or {})
    hyper = {h: hyper_symbol(h, v) for h, v in values.items()}
    try:
        return _build_model(program, values, hyper)
    except NotReal as exc:
        raise _located(program, exc) from None


def _build_model(program: ast.Program, values: dict, hyper: dict) -> StepModel:
    states = program.state_names
    plain = {s: sp.Symbol(s, real=True) for s in states}
    base = {**hyper, "g": G, "w": W, "t": T, **plain}
    init = {}
    for s in program.states:
        init[s.name] = to_sympy(s.init, {**hyper, "w": W})

    raw_env = dict(base)  # plain names (for sequential code)
    env = dict(base)  # inlined, with s' for assigned states
    statements, f, assign_node = [], {}, {}
    w_new = None
    for node in program.update:
        budget.stage(f"the statement of `{node.target}`", node)
        raw = to_sympy(node.value, raw_env)
        value = to_sympy(node.value, env)
        if node.target == "w":
            role = "w"
            w_new = value
        elif node.target in plain:
            role = "state"
            f[node.target] = value
            env[node.target] = new_symbol(node.target)
        else:
            role = "local"
            env[node.target] = value
            raw_env[node.target] = sp.Symbol(node.target, real=True)
        assign_node[node.target] = node
        statements.append(Statement(node.target, role, raw, value, node))
    assert w_new is not None, "checked programs assign w"

    # states that are never assigned keep their value
    for s in states:
        f.setdefault(s, plain[s])

    expand = {}
    f_full = {}
    for stmt in statements:
        if stmt.role == "state":
            full = stmt.value.xreplace(expand)
            f_full[stmt.target] = full
            expand[new_symbol(stmt.target)] = full
    for s in states:
        f_full.setdefault(s, plain[s])
    w_new_full = w_new.xreplace(expand)

    # delay states: assigned without reading their own old value, which another statement reads
    def old_value_read(s: str) -> bool:
        others = [f[o] for o in states if o != s]
        return any(plain[s] in e.free_symbols for e in (w_new, *others))

    delays = tuple(
        st.target
        for st in statements
        if st.role == "state"
        and plain[st.target] not in f[st.target].free_symbols
        and old_value_read(st.target)
    )

    return StepModel(
        program=program,
        hyper=hyper,
        hyper_values=values,
        states=states,
        scalar={s.name: s.scalar for s in program.states},
        init=init,
        statements=tuple(statements),
        f=f,
        f_full=f_full,
        w_new=w_new,
        w_new_full=w_new_full,
        assign_node=assign_node,
        delays=delays,
    )


def simp(e: sp.Expr) -> sp.Expr:
    """Cheap rational simplification (``cancel``), enough for update rules."""
    budget.check()
    return sp.cancel(sp.together(e))


def _wants_flip(add: sp.Add) -> bool:
    neg = sum(1 for a in add.args if a.could_extract_minus_sign())
    pos = len(add.args) - neg
    const = add.as_coeff_Add()[0]
    return neg > pos or (neg == pos and const < 0)


def tidy_signs(expr: sp.Expr) -> sp.Expr:
    """Readable signs: ``-lr/(beta**t - 1)`` → ``lr/(1 - beta**t)`` (value unchanged)."""

    def fix(e):
        if not e.args or isinstance(e, sp.Symbol):
            return e
        e = e.func(*[fix(a) for a in e.args])
        if isinstance(e, sp.Mul):
            sign, factors, flipped_ids = 1, [], set()
            for f in e.args:
                base, ex = f.as_base_exp()
                if isinstance(base, sp.Add) and ex.is_Integer and _wants_flip(base):
                    flipped = sp.expand(-base)
                    flipped_ids.add(len(factors))
                    factors.append(flipped if ex == 1 else sp.Pow(flipped, ex, evaluate=False))
                    sign *= (-1) ** abs(int(ex))
                else:
                    factors.append(f)
            coeff = [f for f in factors if f.is_Number]
            rest = [(i, f) for i, f in enumerate(factors) if not f.is_Number]
            c = sign * sp.Mul(*coeff)
            if c < 0:  # absorb a leading minus into a balanced sum: -(m - Eg) -> (Eg - m)
                for j, (i, f) in enumerate(rest):
                    if isinstance(f, sp.Add) and i not in flipped_ids and f.as_coeff_Add()[0] == 0:
                        rest[j] = (i, sp.expand(-f))
                        c = -c
                        break
            rest = [f for _, f in rest]
            return sp.Mul(c, *rest, evaluate=False) if c != 1 else sp.Mul(*rest, evaluate=False)
        return e

    out = fix(expr)
    try:
        ok = sp.expand(out - expr) == 0 or sp.cancel(out - expr) == 0
    except (TypeError, ValueError):
        ok = False
    return out if ok else expr


def tidy(expr: sp.Expr) -> sp.Expr:
    """A readable normal form: the shorter of the cancelled and factored forms, signs tidied."""
    e = simp(expr)
    budget.check()
    f = sp.factor(e)
    best = f if sp.count_ops(f) <= sp.count_ops(e) else e
    return tidy_signs(best)
