"""Generate one self-contained JAX module from a :class:`FlowSpec` or a :class:`DiscreteSpec`.

The module holds ``HYPER``, ``init_state``, ``step`` (the exact discrete
update), ``precond`` (the effective step size ``p``), ``rates`` (the raw rates,
read by the stable flow), ``drift`` (the averaged rates in ``Eg``, ``Vg``, read
by the central flow), ``threshold``, and the tables ``FLOW_STATES`` (the ODE
states of the flows: every state but the delay states) and ``MOMENTS`` (what
``drift`` reads after ``(w, state)``, from :mod:`flowgen.symbolic.moments`).

``init_state`` and ``step`` are printed from the checked AST
(:mod:`flowgen.codegen.discrete`): they exist for every well-formed file and
compute exactly what it says in float64. The flow parts are printed from the
derivation's sympy expressions by sympy's ``JaxPrinter`` (numbers as float
literals, common subexpressions named by ``sympy.cse``); when the derivation
refused the file, the module says why (docstring, ``NO_FLOW_REASON``) and its
flow functions raise ``NotImplementedError`` with that reason. The same text is
what :func:`load_module` executes in memory, registered in ``linecache`` so
tracebacks and ``inspect.getsource`` show the real lines.

The text is written in ruff's style by flowgen itself (:mod:`flowgen.codegen.pyfmt`:
expressions re-spaced, long lines cut into temporaries, long containers
exploded); no formatter runs, so the bytes never depend on what is installed.
"""

from __future__ import annotations

import ast
import keyword
import linecache
import types
from contextvars import ContextVar

import sympy as sp
from sympy.printing.numpy import JaxPrinter

from flowgen import __version__
from flowgen.codegen import pyfmt
from flowgen.codegen.discrete import float_literal, jax_expr
from flowgen.errors import CodegenError
from flowgen.flow.discrete import DiscreteSpec, build_discrete
from flowgen.flow.spec import FlowSpec
from flowgen.language.ast import Expr, Name, walk
from flowgen.language.printer import to_text
from flowgen.symbolic.model import Eg, Vg, rmean, rsum
from flowgen.symbolic.moments import MOMENT_NAMES, MOMENTS

_PY_TAKEN = {"jax", "jnp", "hyper", "state", "HYPER", "w", "g", "t", "Eg", "Vg", "p", "new"}
_PY_TAKEN |= {"dw", "float"}  # a local of rates/drift; the builtin threshold() calls


class FlowgenJaxPrinter(JaxPrinter):
    """sympy's JAX printer with ``jnp.`` names and flowgen's reductions."""

    _module = "jnp"
    _kf = {k: v.replace("jax.numpy.", "jnp.", 1) for k, v in JaxPrinter._kf.items()}
    _kc = {k: v.replace("jax.numpy.", "jnp.", 1) for k, v in JaxPrinter._kc.items()}

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})

    def _print_rsum(self, e):
        arg = e.args[0]
        if {s.name for s in arg.free_symbols} & _PER_COORD.get():
            return f"jnp.sum({self._print(arg)})"
        # a scalar argument (the algebra folded `g*0 + 1` to 1): n copies of it
        return f"jnp.sum(jnp.full_like(w, {self._print(arg)}))"

    def _print_rmean(self, e):
        return f"jnp.mean({self._print(e.args[0])})"

    # Numbers print as float literals: exact (repr round-trips), never an integer
    # beyond int64 (``1e20`` is ``1e+20``); non-finite and non-real numbers follow
    # float semantics (a derivation never produces them from a checked file:
    # it refuses non-finite constants).
    def _print_Integer(self, e):
        return float_literal(float(e))[0]

    _print_Rational = _print_Integer
    _print_Float = _print_Integer
    _print_Zero = _print_One = _print_NegativeOne = _print_Half = _print_Integer

    def _print_Infinity(self, e):
        return "jnp.inf"

    def _print_NegativeInfinity(self, e):
        return "-jnp.inf"

    def _print_ComplexInfinity(self, e):
        return "jnp.nan"

    _print_NaN = _print_ComplexInfinity
    _print_ImaginaryUnit = _print_ComplexInfinity

    def _print_Max(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"jnp.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, e):
        out = self._print(e.args[0])
        for a in e.args[1:]:
            out = f"jnp.minimum({out}, {self._print(a)})"
        return out


_printer = FlowgenJaxPrinter()
#: names of the per-coordinate values of the module being printed (see ``_print_rsum``)
_PER_COORD: ContextVar[frozenset[str]] = ContextVar(
    "flowgen_per_coordinate", default=frozenset({"g", "w", "Eg", "Vg"})
)


def safe_name(name: str, taken: set[str] | frozenset = frozenset()) -> str:
    """A Python identifier for a DSL name: keywords and names the generated code uses
    get underscores appended until the result clashes with nothing in ``taken``."""
    if not (keyword.iskeyword(name) or name in _PY_TAKEN - {"w", "g", "t"}):
        return name
    out = name + "_"
    while out in taken or keyword.iskeyword(out) or out in _PY_TAKEN:
        out += "_"
    return out


def _rename(expr: sp.Expr, names: dict[str, str]) -> sp.Expr:
    reps = {}
    for s in expr.free_symbols:
        if s.name in names and names[s.name] != s.name:
            reps[s] = sp.Symbol(names[s.name], **s.assumptions0)
    return expr.xreplace(reps)


def pycode(expr: sp.Expr, names: dict[str, str]) -> str:
    """``expr`` as Python source in ruff's style (:mod:`flowgen.codegen.pyfmt`)."""
    return pyfmt.expr(_printer.doprint(_rename(expr, names)))


def _math(expr: sp.Expr) -> str:
    return sp.sstr(expr).replace('"', "'").replace("\\", "/")


def _doc(text: str, indent: str = "    ") -> str:
    body = text.replace("\\", "/").replace('"""', "'''")
    lines = body.splitlines()
    return "\n".join((indent + ln) if ln.strip() else "" for ln in lines)


def _hyper_reads(exprs: list[sp.Expr], spec: FlowSpec, names, *, arrays=True) -> list[str]:
    """Read the hyperparameters ``exprs`` use; with ``arrays`` (functions of ``w``) as
    arrays of w's dtype, like ``t``, so that no arithmetic is Python float arithmetic."""
    used = set()
    for e in exprs:
        used |= {s.name for s in e.free_symbols}
    if not arrays:
        return [f'    {names[h]} = hyper["{h}"]' for h in spec.hyper if h in used]
    lines = [
        f'    {names[h]} = jnp.asarray(hyper["{h}"], dtype=w.dtype)'
        for h in spec.hyper
        if h in used
    ]
    if "t" in used:
        lines.append("    t = jnp.asarray(t, dtype=w.dtype)")
    return lines


class _Body:
    """The lines of one generated function: no statement exceeds the line length (a long
    expression is cut into temporaries), temporaries get names nothing else uses."""

    def __init__(self, names: dict[str, str], taken=(), indent: str = "    "):
        self.indent, self.lines = indent, []
        self.taken = set(taken) | set(names) | set(names.values()) | _PY_TAKEN | {"x"}
        self._k = 0

    def fresh(self) -> str:
        while f"x{self._k}" in self.taken:
            self._k += 1
        self.taken.add(f"x{self._k}")
        return f"x{self._k}"

    def value(self, code: str, room: int) -> str:
        """``code`` fitted into ``room`` columns; its temporaries are emitted first."""
        temp_room = pyfmt.LINE_LENGTH - len(self.indent) - len("x000 = ")
        temps, text = pyfmt.fit(code, room, self.fresh, temp_room)
        self.lines += [f"{self.indent}{name} = {t}" for name, t in temps]
        return text

    def assign(self, target: str, code: str, prefix: str = "", suffix: str = "") -> None:
        head = f"{self.indent}{target} = {prefix}"
        text = self.value(code, pyfmt.LINE_LENGTH - len(head) - len(suffix))
        self.lines.append(f"{head}{text}{suffix}")

    def line(self, text: str) -> None:
        self.lines.append(self.indent + text)

    def returns(self, first: str, items: list[tuple[str, str, str, str]]) -> None:
        """``return first, {"key": prefix + code + suffix, ...}``, exploded when long."""
        flat = [f"{pyfmt.string(k)}: {pre}{pyfmt.expr(c)}{suf}" for k, pre, c, suf in items]
        one = f"{self.indent}return {first}, {{{', '.join(flat)}}}"
        if len(one) <= pyfmt.LINE_LENGTH or not items:
            self.lines.append(one)
            return
        entries = []
        for k, pre, c, suf in items:
            head = f"{self.indent}    {pyfmt.string(k)}: {pre}"
            entries.append(head + self.value(c, pyfmt.LINE_LENGTH - len(head) - len(suf) - 1) + suf)
        self.lines.append(f"{self.indent}return {first}, {{")
        self.lines += [e + "," for e in entries]
        self.lines.append(f"{self.indent}}}")


def _cse_block(outputs: list[sp.Expr], names, body: _Body) -> list[str]:
    """Common subexpressions as temporaries of ``body``; the reduced outputs as code."""

    def temporaries():
        while True:
            yield sp.Symbol(body.fresh())

    reps, reduced = sp.cse(outputs, symbols=temporaries(), optimizations="basic")
    for sym, val in reps:
        body.assign(sym.name, pycode(val, names))
    return [pycode(r, names) for r in reduced]


def _doc_text(text: str) -> str:
    return text.replace("\\", "/").replace('"', "'").rstrip(".")


def _tuple_text(value) -> str:
    """A nested tuple of floats and strings, as ruff writes it on one line."""
    if isinstance(value, tuple):
        inner = ", ".join(_tuple_text(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, str):
        return pyfmt.string(value)
    return repr(float(value))


def _discrete_of(spec: FlowSpec) -> DiscreteSpec:
    """The discrete level a :class:`FlowSpec` was built on (rebuilt from its source
    text for a spec made without one)."""
    found = getattr(spec, "discrete", None)
    if found is not None:
        return found
    from flowgen.language import check_program, parse_text

    program = parse_text(spec.source, spec.path)
    check_program(program)
    return build_discrete(program, spec.hyper)


def _ast_names(expr: Expr) -> set[str]:
    return {n.id for n in walk(expr) if isinstance(n, Name)}


def _ast_hyper_reads(exprs: list[Expr], hyper, names, indent="    ") -> list[str]:
    """Hyperparameters (and ``t``) as arrays of w's dtype, so that no arithmetic in the
    step is Python float arithmetic (which raises on 1/0 and goes complex on (-8)**(1/3))."""
    used = set().union(*(_ast_names(e) for e in exprs)) if exprs else set()
    lines = [
        f'{indent}{names[h]} = jnp.asarray(hyper["{h}"], dtype=w.dtype)' for h in hyper if h in used
    ]
    if "t" in used:
        lines.append(f"{indent}t = jnp.asarray(t, dtype=w.dtype)")
    return lines


def _discrete_parts(d: DiscreteSpec, names: dict[str, str]) -> tuple[str, list[str]]:
    """The update rule as text, and the source lines of ``init_state`` and ``step``."""
    rule = "\n".join(f"    {st.target} <- {to_text(st.value)}" for st in d.statements)
    out: list[str] = []

    body = _Body(names)
    body.lines += _ast_hyper_reads([s.init for s in d.states], d.hyper, names)
    inits, shown = [], []
    for s in d.states:
        code = jax_expr(s.init, names)
        if s.scalar:
            pre, suf = "jnp.asarray(", ", dtype=w.dtype)"
        elif not s.init_scalar:
            pre, suf = "", ""
        elif code == "0.0":
            pre, suf, code = "jnp.zeros_like(", ")", "w"
        else:
            pre, suf = "jnp.full_like(w, ", ")"
        head = f"        {pyfmt.string(s.name)}: {pre}"
        inits.append(head + body.value(code, pyfmt.LINE_LENGTH - len(head) - len(suf) - 1) + suf)
        shown.append(f"{s.name} = {to_text(s.init)}")
    out.append("def init_state(w, hyper=HYPER):")
    out.append(f'    """Initial optimizer state: {"; ".join(shown) or "(none)"}."""')
    out += body.lines
    if inits:
        out.append("    return {")
        out += [i + "," for i in inits]
        out.append("    }\n\n")
    else:
        out.append("    return {}\n\n")

    out.append("def step(w, state, g, t, hyper=HYPER):")
    out.append('    """One discrete step (t is 1 on the first step); returns (w, state).\n')
    out.append(_doc(rule, "") + '\n    """')
    body = _Body(names)
    body.lines += _ast_hyper_reads([st.value for st in d.statements], d.hyper, names)
    for s in d.states:
        body.line(f'{names[s.name]} = state["{s.name}"]')
    for st in d.statements:
        code = jax_expr(st.value, names)
        pre = suf = ""
        if st.role != "local" and st.target_scalar:
            pre, suf = "jnp.asarray(", ", dtype=w.dtype)"
        elif st.role != "local" and st.value_scalar:
            pre, suf = "jnp.full_like(w, ", ")"  # a scalar value keeps w's shape
        body.assign(names.get(st.target, st.target), code, pre, suf)
    state_names = [s.name for s in d.states]
    body.returns("w", [(s, "", names[s], "") for s in state_names])
    out += body.lines
    out[-1] += "\n\n"
    return rule, out


def generate(
    spec: FlowSpec | DiscreteSpec, *, path_label: str | None = None, reason: str | None = None
) -> str:
    """The module's source text (deterministic: same spec, same bytes).

    ``spec`` is a :class:`FlowSpec` (flow parts from the derivation, when it has
    them) or a bare :class:`DiscreteSpec` (discrete step only; ``reason`` says why,
    in the docstring and ``NO_FLOW_REASON``).
    """
    if isinstance(spec, DiscreteSpec):
        d, flow = spec, None
        reason = reason or "the flow was not derived"
    else:
        d, flow = _discrete_of(spec), spec
        if not getattr(spec, "has_flow", True):
            reason, flow = reason or spec.flow_reason or spec.central_reason, None
    declared = {*d.hyper, *(s.name for s in d.states), *(st.target for st in d.statements)}
    names: dict[str, str] = {}
    for n in [*d.hyper, *(s.name for s in d.states), *(st.target for st in d.statements)]:
        if n not in names:
            names[n] = safe_name(n, declared | set(names.values()))
    state_names = [s.name for s in d.states]
    src = path_label or d.path
    out: list[str] = []
    rule, discrete_lines = _discrete_parts(d, names)
    desc = d.description.replace('"', "'").replace("\\", "/")
    absent = ""
    if flow is None:
        absent = (
            "\nNo flow parts: `rates`, `precond`, `drift` and `threshold` are absent because "
            f"the derivation refused this file:\n{_doc(reason or '')}\n"
        )
    out.append(
        f'"""{d.name}: {desc}\n\n'
        f"Generated by flowgen {__version__} from {src}\n"
        f"sha256 of the source: {d.sha256}\n"
        "Do not edit: regenerate with `flowgen codegen`.\n\n"
        f"Update rule (one step, g = grad L(w), t = 1, 2, ...):\n{_doc(rule, '')}\n"
        f"{absent}"
        '"""\n'
    )
    out.append("import jax.numpy as jnp\n")
    out.append(f"NAME = {pyfmt.string(d.name)}")
    hyper_items = [f"{pyfmt.string(k)}: {float(v)!r}" for k, v in d.hyper.items()]
    out += pyfmt.container("HYPER = {", hyper_items, "}")
    out += pyfmt.container("STATES = (", [pyfmt.string(s) for s in state_names], ")", tuple_=True)
    kinds = {} if flow is None else {s.name: s.kind for s in flow.states}
    kind_items = [f"{pyfmt.string(k)}: {pyfmt.string(v)}" for k, v in kinds.items()]
    out += pyfmt.container("STATE_KINDS = {", kind_items, "}")
    scalars = [pyfmt.string(s.name) for s in d.states if s.scalar]
    out += pyfmt.container("SCALAR_STATES = (", scalars, ")", tuple_=True)
    thr = None if flow is None else flow.threshold
    C = "c" if flow is None else flow.shown("c")
    out.append(f"THRESHOLD = {thr!r}  # {C}: stability threshold on lambda_max(P^-1 H)")
    out.append(f"HAS_CENTRAL_FLOW = {flow is not None and flow.has_central!r}")
    out.append(f"HAS_FLOW = {flow is not None!r}  # rates, precond, drift, threshold derived")
    short = (reason or "the flow was not derived").splitlines()[0] if flow is None else None
    if short is None:
        out.append("NO_FLOW_REASON = None")
    else:
        out += pyfmt.long_string_assignment("", "NO_FLOW_REASON", short)
    out.append("# the ODE states of the stable and central flows: every state but the delay states")
    flow_names = state_names if flow is None else [s.name for s in flow.flow_states]
    flows = [pyfmt.string(s) for s in flow_names]
    out += pyfmt.container("FLOW_STATES = (", flows, ")", tuple_=True)
    out.append("# what drift() reads after (w, state): each moment is a sum of coef * einsum(spec,")
    out.append(
        "# *operands) over the central flow's grad (n,), G (k, k, n), HU (n, k) and X (k, k)"
    )
    moments = flow.moments if flow is not None else tuple((m.name, m.runtime) for m in MOMENTS)
    moment_items = [f"{pyfmt.string(m)}: {_tuple_text(terms)}" for m, terms in moments]
    out += pyfmt.container("MOMENTS = {", moment_items, "}")
    out.append("\n")
    out += discrete_lines
    if flow is None:
        out += _absent_flow(short or "the flow was not derived")
    else:
        per_coord = {"g", "w", "Eg", "Vg", *(names[s.name] for s in d.states if not s.scalar)}
        token = _PER_COORD.set(frozenset(per_coord))
        try:
            out += _flow_parts(flow, names, state_names, thr)
        finally:
            _PER_COORD.reset(token)
    text = "\n".join(out).rstrip() + "\n"
    return format_source(text)


def _absent_flow(reason: str) -> list[str]:
    doc = reason.replace("\\", "/").replace('"', "'")
    out = [
        "def precond(w, state, t, hyper=HYPER):",
        '    """No effective step: the flow was not derived."""',
        "    return None\n\n",
    ]
    for sig, role in (
        ("rates(w, state, g, t, hyper=HYPER)", "No rates"),
        (f"drift(w, state, {', '.join(MOMENT_NAMES)}, t, hyper=HYPER)", "No central flow"),
    ):
        out.append(f"def {sig}:")
        out.append(f'    """{role}: {doc}"""')
        out += pyfmt.call_one_argument("    ", "raise NotImplementedError", pyfmt.string(reason))
        out[-1] += "\n\n"
    out.append("def threshold(hyper=HYPER):")
    out.append('    """No threshold: the flow was not derived."""')
    out.append("    return None")
    return out


def _flow_parts(spec: FlowSpec, names, state_names, thr) -> list[str]:
    out: list[str] = []
    P, C = spec.shown("p"), spec.shown("c")
    flow_states = spec.flow_states
    flow_names = [s.name for s in flow_states]
    declared = set(names) | set(names.values())

    def state_reads(body, exprs):
        used = set().union(*(e.free_symbols for e in exprs)) if exprs else set()
        for s in state_names:
            if sp.Symbol(s, real=True) in used:
                body.line(f'{names[s]} = state["{s}"]')

    # precond
    p = spec.stability.effective_step if spec.stability else None
    out.append("def precond(w, state, t, hyper=HYPER):")
    if p is None:
        why = (spec.stability.step_note if spec.stability else "") or "no stability analysis"
        out.append(f'    """No effective step {P}: {_doc_text(why)}."""')
        out.append("    return None\n\n")
    else:
        out.append(f'    """Effective step size {P} (P^-1 = diag({P})):  {P} = {_math(p)}"""')
        body = _Body(names, declared)
        body.lines += _hyper_reads([p], spec, names)
        state_reads(body, [p])
        head, tail = "    return jnp.broadcast_to(", ", w.shape)"
        code = body.value(pycode(p, names), pyfmt.LINE_LENGTH - len(head) - len(tail))
        out += body.lines
        out.append(f"{head}{code}{tail}\n\n")

    # rates and drift
    def rate_fn(fname, args, w_expr, state_exprs, doc):
        exprs = [w_expr, *state_exprs]
        lines = [f"def {fname}({args}, hyper=HYPER):", f'    """{doc}\n']
        math = [f"    dw/dt = {_math(w_expr)}"] + [
            f"    d{s}/dt = {_math(e)}" for s, e in zip(flow_names, state_exprs, strict=True)
        ]
        lines.append("\n".join(math) + '\n    """')
        body = _Body(names, declared | set(MOMENT_NAMES))
        body.lines += _hyper_reads(exprs, spec, names)
        state_reads(body, exprs)
        res = _cse_block(exprs, names, body)
        body.assign("dw", res[0], "jnp.zeros_like(w) + (", ")")
        items = [
            (s, f"jnp.zeros_like(state[{pyfmt.string(s)}]) + (", r, ")")
            for s, r in zip(flow_names, res[1:], strict=True)
        ]
        body.returns("dw", items)
        lines += body.lines
        lines[-1] += "\n\n"
        return lines

    out += rate_fn(
        "rates",
        "w, state, g, t",
        spec.w_rate,
        [s.rate for s in flow_states],
        "Raw rates s_new - s_old per step; the stable flow uses g = grad L.",
    )
    moment_args = ", ".join(MOMENT_NAMES)
    if spec.has_central:
        meanings = ", ".join(f"{m.name} = {m.short}" for m in MOMENTS)
        out += rate_fn(
            "drift",
            f"w, state, {moment_args}, t",
            spec.w_drift,
            [s.drift for s in flow_states],
            f"Rates averaged over the oscillation: {meanings}.",
        )
    else:
        reason = (spec.central_reason or "").replace('"', "'")
        out.append(f"def drift(w, state, {moment_args}, t, hyper=HYPER):")
        out.append(f'    """No central flow: {reason}"""')
        out += pyfmt.call_one_argument("    ", "raise NotImplementedError", pyfmt.string(reason))
        out[-1] += "\n\n"

    c = spec.stability.threshold if spec.stability else None
    out.append("def threshold(hyper=HYPER):")
    if c is None:
        out.append(f'    """No dimensionless threshold {C} (no flip, or no effective step)."""')
        out.append("    return None")
    else:
        out.append(f'    """Threshold {C} on lambda_max(P^-1 H):  {C} = {_math(c)}"""')
        body = _Body(names, declared | {"float"})
        body.lines += _hyper_reads([c], spec, names, arrays=False)
        if c.free_symbols - set(spec.hyper_symbols.values()) or c.atoms(rsum, rmean):
            body.line(f"return {thr!r}")
        elif c.is_Number:
            body.line(f"return {pycode(c, names)}")
        else:
            code = body.value(pycode(c, names), pyfmt.LINE_LENGTH - len("    return float()"))
            body.line(f"return float({code})")
        out += body.lines
    return out


def format_source(text: str) -> str:
    """The generated text, checked to parse. It is already in ruff's style
    (:mod:`flowgen.codegen.pyfmt`) and no formatter runs, so its bytes never depend
    on which tools are installed."""
    try:
        ast.parse(text)
    except SyntaxError as err:  # a flowgen bug, not a user error: say where
        raise CodegenError(
            f"generated code does not parse: {err.msg} (line {err.lineno})"
        ) from None
    return text


_counter = [0]


def load_module(source: str, name: str) -> types.ModuleType:
    """Execute generated source as a module (flowgen's own output, never user text)."""
    _counter[0] += 1
    filename = f"<flowgen:{name}:{_counter[0]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    mod = types.ModuleType(f"flowgen_generated_{name}")
    mod.__file__ = filename
    code = compile(source, filename, "exec")
    exec(code, mod.__dict__)  # noqa: S102 - generated by flowgen's printer
    return mod


__all__ = ["generate", "load_module", "Eg", "Vg", "rsum", "rmean"]
