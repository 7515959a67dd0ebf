"""Generate one self-contained JAX module from a :class:`FlowSpec` or a :class:`DiscreteSpec`.

The module holds ``HYPER``, ``init_state``, ``step`` (the exact discrete
update), ``precond`` (the effective step size ``p``), ``rates`` (the raw rates,
read by the stable flow), ``drift`` (the averaged rates in ``Eg``, ``Vg``, read
by the central flow) and ``threshold``.

``init_state`` and ``step`` are printed from the checked AST
(:mod:`flowgen.codegen.discrete`): they exist for every well-formed file and
compute exactly what it says in float64. The flow parts are printed from the
derivation's sympy expressions by sympy's ``JaxPrinter`` (numbers as float
literals, common subexpressions named by ``sympy.cse``); when the derivation
refused the file, the module says why (docstring, ``NO_FLOW_REASON``) and its
flow functions raise ``NotImplementedError`` with that reason. The same text is
what :func:`load_module` executes in memory, registered in ``linecache`` so
tracebacks and ``inspect.getsource`` show the real lines.
"""

from __future__ import annotations

import keyword
import linecache
import shutil
import subprocess
import sys
import types
from contextvars import ContextVar

import sympy as sp
from sympy.printing.numpy import JaxPrinter

from flowgen import __version__
from flowgen.codegen.discrete import float_literal, jax_expr
from flowgen.errors import CodegenError
from flowgen.flow.discrete import DiscreteSpec, build_discrete
from flowgen.flow.spec import FlowSpec
from flowgen.language.ast import Expr, Name, walk
from flowgen.language.printer import to_text
from flowgen.symbolic.model import Eg, Vg, rmean, rsum

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
    return _printer.doprint(_rename(expr, names))


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


def _cse_block(outputs: list[sp.Expr], names, indent="    ") -> tuple[list[str], list[str]]:
    reps, reduced = sp.cse(outputs, symbols=sp.numbered_symbols("x"), optimizations="basic")
    lines = [f"{indent}{pycode(sym, names)} = {pycode(val, names)}" for sym, val in reps]
    return lines, [pycode(r, names) for r in reduced]


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

    inits, shown = [], []
    for s in d.states:
        code = jax_expr(s.init, names)
        if s.scalar:
            value = f"jnp.asarray({code}, dtype=w.dtype)"
        elif not s.init_scalar:
            value = code
        elif code == "0.0":
            value = "jnp.zeros_like(w)"
        else:
            value = f"jnp.full_like(w, {code})"
        inits.append(f"        {s.name!r}: {value},")
        shown.append(f"{s.name} = {to_text(s.init)}")
    out.append("def init_state(w, hyper=HYPER):")
    out.append(f'    """Initial optimizer state: {"; ".join(shown) or "(none)"}."""')
    out += _ast_hyper_reads([s.init for s in d.states], d.hyper, names)
    out.append("    return {")
    out += inits
    out.append("    }\n\n")

    out.append("def step(w, state, g, t, hyper=HYPER):")
    out.append('    """One discrete step (t is 1 on the first step); returns (w, state).\n')
    out.append(_doc(rule) + '\n    """')
    out += _ast_hyper_reads([st.value for st in d.statements], d.hyper, names)
    for s in d.states:
        out.append(f'    {names[s.name]} = state["{s.name}"]')
    for st in d.statements:
        code = jax_expr(st.value, names)
        if st.role != "local" and st.target_scalar:
            code = f"jnp.asarray({code}, dtype=w.dtype)"
        elif st.role != "local" and st.value_scalar:
            code = f"jnp.full_like(w, {code})"  # a scalar value keeps w's shape
        out.append(f"    {names.get(st.target, st.target)} = {code}")
    state_names = [s.name for s in d.states]
    out.append("    return w, {" + ", ".join(f'"{s}": {names[s]}' for s in state_names) + "}\n\n")
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
    out.append(f"NAME = {d.name!r}")
    out.append("HYPER = {" + ", ".join(f"{k!r}: {float(v)!r}" for k, v in d.hyper.items()) + "}")
    out.append(f"STATES = {tuple(state_names)!r}")
    kinds = {} if flow is None else {s.name: s.kind for s in flow.states}
    out.append("STATE_KINDS = {" + ", ".join(f"{k!r}: {v!r}" for k, v in kinds.items()) + "}")
    out.append(f"SCALAR_STATES = {tuple(s.name for s in d.states if s.scalar)!r}")
    thr = None if flow is None else flow.threshold
    out.append(f"THRESHOLD = {thr!r}  # c: stability threshold on lambda_max(P^-1 H)")
    out.append(f"HAS_CENTRAL_FLOW = {flow is not None and flow.has_central!r}")
    out.append(f"HAS_FLOW = {flow is not None!r}  # rates, precond, drift, threshold derived")
    short = (reason or "the flow was not derived").splitlines()[0] if flow is None else None
    out.append(f"NO_FLOW_REASON = {short!r}")
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
        ("drift(w, state, Eg, Vg, t, hyper=HYPER)", "No central flow"),
    ):
        out.append(f"def {sig}:")
        out.append(f'    """{role}: {doc}"""')
        out.append(f"    raise NotImplementedError({reason!r})\n\n")
    out.append("def threshold(hyper=HYPER):")
    out.append('    """No threshold: the flow was not derived."""')
    out.append("    return None")
    return out


def _flow_parts(spec: FlowSpec, names, state_names, thr) -> list[str]:
    out: list[str] = []
    # precond
    p = spec.stability.effective_step if spec.stability else None
    out.append("def precond(w, state, t, hyper=HYPER):")
    if p is None:
        out.append('    """The update does not factor as -p * (linear form); no effective step."""')
        out.append("    return None\n\n")
    else:
        out.append(f'    """Effective step size p (P^-1 = diag(p)):  p = {_math(p)}"""')
        out += _hyper_reads([p], spec, names)
        for s in state_names:
            if sp.Symbol(s, real=True) in p.free_symbols:
                out.append(f'    {names[s]} = state["{s}"]')
        out.append(f"    return jnp.broadcast_to({pycode(p, names)}, w.shape)\n\n")

    # rates and drift
    def rate_fn(fname, args, w_expr, state_exprs, doc):
        exprs = [w_expr, *state_exprs]
        lines = [f"def {fname}({args}, hyper=HYPER):", f'    """{doc}\n']
        math = [f"    dw/dt = {_math(w_expr)}"] + [
            f"    d{s}/dt = {_math(e)}" for s, e in zip(state_names, state_exprs, strict=True)
        ]
        lines.append("\n".join(math) + '\n    """')
        lines += _hyper_reads(exprs, spec, names)
        used = set().union(*(e.free_symbols for e in exprs))
        for s in state_names:
            if sp.Symbol(s, real=True) in used:
                lines.append(f'    {names[s]} = state["{s}"]')
        cse_lines, res = _cse_block(exprs, names)
        lines += cse_lines
        shape = ["jnp.zeros_like(w) + " if i == 0 else "" for i in range(len(res))]
        lines.append(f"    dw = {shape[0]}({res[0]})")
        items = []
        for s, r in zip(spec.states, res[1:], strict=True):
            items.append(f'"{s.name}": ' + (f"jnp.zeros_like(state['{s.name}']) + ({r})"))
        lines.append("    return dw, {" + ", ".join(items) + "}\n\n")
        return lines

    out += rate_fn(
        "rates",
        "w, state, g, t",
        spec.w_rate,
        [s.rate for s in spec.states],
        "Raw rates (time convention of central-flows.md §3); the stable flow uses g = grad L.",
    )
    if spec.has_central:
        out += rate_fn(
            "drift",
            "w, state, Eg, Vg, t",
            spec.w_drift,
            [s.drift for s in spec.states],
            "Rates averaged over the oscillation: Eg = E[g], Vg = diag(H Sigma H).",
        )
    else:
        reason = (spec.central_reason or "").replace('"', "'")
        out.append("def drift(w, state, Eg, Vg, t, hyper=HYPER):")
        out.append(f'    """No central flow: {reason}"""')
        out.append(f"    raise NotImplementedError({reason!r})\n\n")

    c = spec.stability.threshold if spec.stability else None
    out.append("def threshold(hyper=HYPER):")
    if c is None:
        out.append('    """No dimensionless threshold (no flip bifurcation or no factoring)."""')
        out.append("    return None")
    else:
        out.append(f'    """Threshold c on lambda_max(P^-1 H):  c = {_math(c)}"""')
        out += _hyper_reads([c], spec, names, arrays=False)
        if c.free_symbols - set(spec.hyper_symbols.values()) or c.atoms(rsum, rmean):
            out.append(f"    return {thr!r}")
        elif c.is_Number:
            out.append(f"    return {pycode(c, names)}")
        else:
            out.append(f"    return float({pycode(c, names)})")
    return out


def format_source(text: str) -> str:
    """Format with ruff when it is available (deterministic); else return as is."""
    exe = shutil.which("ruff")
    cmd = [exe] if exe else [sys.executable, "-m", "ruff"]
    try:
        res = subprocess.run(
            [*cmd, "format", "--isolated", "--line-length", "100", "-"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return text
    if res.returncode != 0:
        if "error" in res.stderr.lower() and "No module named" not in res.stderr:
            raise CodegenError(f"generated code does not parse: {res.stderr.strip()[:300]}")
        return text
    return res.stdout


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
