"""Generate an optax ``GradientTransformation`` from an `.opt` file.

``flowgen codegen FILE --optax`` and ``flowgen.load(FILE).optax(**hyper)`` give
the discrete update rule as a standard optax transformation, so a derived
optimizer drops into any JAX training loop::

    tx = flowgen.load("optimizers/adan.opt").optax(lr=1e-3)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

The generated module is self-contained (jax and optax only) and follows the
file exactly:

* every per-coordinate value (``g``, ``w``, per-coordinate states and locals)
  is a pytree shaped like the parameters, computed leaf by leaf with
  ``jax.tree.map``; scalars (hyperparameters, ``t``, scalar states,
  reductions) are shared;
* the reductions ``sum``, ``mean`` and ``norm`` span the whole pytree — every
  coordinate of every leaf, as in flowgen's own runs on a flat parameter
  vector (``mean`` divides by the total number of coordinates);
* the state is ``State(count, states)``: the number of steps taken
  (``t = count + 1`` during a step) and a dict of the file's states;
* the update is the step ``Δw = w_new − w``, written without forming
  ``w_new`` when the rule is ``w = w + …`` (``optax.apply_updates`` adds it);
* dtypes follow the gradient: ``t`` and scalar states take the gradient's
  dtype, each state leaf and update leaf its gradient leaf's dtype (float32
  stays float32; nothing enables x64).

Only the parsed rule is needed, not the derivation: any well-formed file
exports, including those without a central flow.
"""

from __future__ import annotations

import hashlib
import keyword

import sympy as sp

from flowgen import __version__
from flowgen.codegen import pyfmt
from flowgen.codegen.jaxgen import _math, _printer, _rename, format_source
from flowgen.flow.build import check_overrides
from flowgen.language.ast import Program
from flowgen.symbolic.model import REDUCTION_CLASSES, W, build_model, rmean, rsum

#: names the generated module uses itself; a file's name equal to one is escaped with "_"
TAKEN = frozenset(
    {
        "jax",
        "jnp",
        "optax",
        "NamedTuple",
        "State",
        "NAME",
        "HYPER",
        "STATES",
        "SCALAR_STATES",
        "hyper",
        "transformation",
        "init_fn",
        "update_fn",
        "params",
        "updates",
        "state",
        "count",
        "states",
        "dtype",
        "_like",
        "_sum",
        "_mean",
        "_dtype",
        "unknown",
        "g",
        "w",
        "t",
        "float",
        "sorted",
        "set",
        "list",
        "sum",
        "len",
        "ValueError",
        "TypeError",
    }
)


def _escape(name: str, taken: set[str]) -> str:
    if not (keyword.iskeyword(name) or name in TAKEN - {"g", "w", "t"}):
        return name
    out = name + "_"
    while out in taken or keyword.iskeyword(out) or out in TAKEN:
        out += "_"
    return out


class _Module:
    """Source lines plus the naming of one generated transformation."""

    def __init__(self, program: Program, names: dict[str, str], per_coord: set[str]):
        self.program, self.names, self.per_coord = program, names, per_coord
        self.taken = set(TAKEN) | set(names.values())
        self._k = 0

    def fresh(self, stem: str = "x") -> str:
        while f"{stem}{self._k}" in self.taken:
            self._k += 1
        out = f"{stem}{self._k}"
        self.taken.add(out)
        return out

    def code(self, expr: sp.Expr) -> str:
        return pyfmt.expr(_printer.doprint(_rename(expr, self.names)))

    def tree_args(self, expr: sp.Expr, order: list[str]) -> list[str]:
        used = {s.name for s in expr.free_symbols}
        return [n for n in order if n in used and n in self.per_coord]

    def reductions(self, expr: sp.Expr, order: list[str], indent: str, lines: list[str]):
        """Each reduction in ``expr`` computed over the whole pytree into a scalar."""
        reps = {}
        for r in sorted(expr.atoms(*REDUCTION_CLASSES), key=sp.default_sort_key):
            arg = r.args[0]
            tmp = self.fresh()
            fn = "_sum" if isinstance(r, rsum) else "_mean"
            room = pyfmt.LINE_LENGTH - len(indent) - len(f"{tmp} = {fn}()")
            tree = self.leafwise(arg, order, indent, lines, cast=None, room=room)
            lines.append(f"{indent}{tmp} = {fn}({tree})")
            reps[r] = sp.Symbol(tmp)
            self.per_coord.discard(tmp)
        return expr.xreplace(reps)

    def leafwise(
        self,
        expr: sp.Expr,
        order: list[str],
        indent: str,
        lines: list[str],
        cast: str | None,
        default: str = "g",
        room: int = pyfmt.LINE_LENGTH,
    ) -> str:
        """``jax.tree.map(lambda ...: expr, ...)`` over the per-coordinate names ``expr``
        reads (``default`` when it reads none); ``cast`` names the leaf whose dtype the
        result takes."""
        args = self.tree_args(expr, order)
        if cast and cast not in args:
            args = [cast, *args]
        if not args:
            args = [default]
        shown = [self.names.get(a, a) for a in args]
        body = self.code(expr)
        if not any(a in {s.name for s in expr.free_symbols} for a in args):
            body = f"jnp.zeros_like({shown[0]}) + ({body})"
        if cast:
            body = f"_like({self.names.get(cast, cast)}, {body})"
        call = f"jax.tree.map(lambda {', '.join(shown)}: {body}, {', '.join(shown)})"
        if len(call) <= room:
            return call
        # too long for one line: a named leaf function, its expression split into temporaries
        from flowgen.codegen.jaxgen import _Body

        fn = self.fresh("_leaf")
        inner = _Body(self.names, self.taken, indent + "    ")
        text = inner.value(self.code(expr), pyfmt.LINE_LENGTH - len(indent) - 4 - 7 - 40)
        if not any(a in {s.name for s in expr.free_symbols} for a in args):
            text = f"jnp.zeros_like({shown[0]}) + ({text})"
        if cast:
            text = f"_like({self.names.get(cast, cast)}, {text})"
        self.taken |= inner.taken
        if lines and lines[-1] != "":
            lines.append("")
        lines.append(f"{indent}def {fn}({', '.join(shown)}):")
        lines += inner.lines
        lines.append(f"{indent}    return {text}")
        lines.append("")
        return f"jax.tree.map({fn}, {', '.join(shown)})"


def _per_coordinate_locals(model, scalar_states: set[str]) -> set[str]:
    per = {"g", "w"} | {s for s in model.states if s not in scalar_states}
    for st in model.statements:
        if st.role != "local":
            continue
        e = st.raw.xreplace({r: sp.Symbol("_r") for r in st.raw.atoms(*REDUCTION_CLASSES)})
        if {s.name for s in e.free_symbols} & per:
            per.add(st.target)
    return per


def generate_optax(
    program: Program, overrides: dict[str, float] | None = None, *, path_label: str | None = None
) -> str:
    """The source of a module defining ``transformation(**hyper) -> GradientTransformation``."""
    overrides = check_overrides(program, overrides)
    model = build_model(program, overrides)
    scalar_states = {s for s in model.states if model.scalar[s]}
    declared = [*model.hyper_values, *model.states, *(st.target for st in model.statements)]
    names: dict[str, str] = {}
    for n in declared:
        if n not in names:
            names[n] = _escape(n, set(declared) | set(names.values()))
    per_coord = _per_coordinate_locals(model, scalar_states)
    mod = _Module(program, names, per_coord)
    order = ["g", "w", *model.states, *(st.target for st in model.statements if st.role == "local")]

    # the step: Δw instead of w_new
    w_stmt = next(st for st in model.statements if st.role == "w")
    dw = w_stmt.raw - W  # w + (...) - w cancels: the step is never formed as a difference
    if dw.has(W):  # e.g. (w - lr*u)/(1 + lr*wd) - w: one fraction, w collected
        together = sp.cancel(sp.together(dw))
        if sp.count_ops(together) <= sp.count_ops(dw) + 4:
            dw = together
    reads_w = dw.has(W) or any(st.raw.has(W) for st in model.statements if st.role != "w")

    src = path_label or program.path
    rule = "\n".join(f"    {st.target} <- {_math(st.raw)}" for st in model.statements)
    desc = (program.description or "").replace('"', "'").replace("\\", "/")
    sha = hashlib.sha256(program.source.encode()).hexdigest()
    out: list[str] = []
    out.append(
        f'"""{program.name}: {desc} — an optax GradientTransformation\n\n'
        f"Generated by flowgen {__version__} from {src}\n"
        f"sha256 of the source: {sha}\n"
        "Do not edit: regenerate with `flowgen codegen --optax`.\n\n"
        f"Update rule (one step, g = grad L(w), t = 1, 2, ...):\n{rule}\n\n"
        "Usage:\n"
        "    tx = transformation()  # or transformation(lr=...): any of HYPER\n"
        "    opt_state = tx.init(params)\n"
        "    updates, opt_state = tx.update(grads, opt_state, params)\n"
        "    params = optax.apply_updates(params, updates)\n\n"
        "Per-coordinate values are pytrees like the parameters; sum, mean and norm span\n"
        "every coordinate of every leaf. The update is the step w_new - w.\n"
        '"""\n'
    )
    out.append("from typing import NamedTuple\n")
    out.append("import jax")
    out.append("import jax.numpy as jnp")
    out.append("import optax\n")
    out.append(f"NAME = {pyfmt.string(program.name)}")
    hyper_items = [f"{pyfmt.string(k)}: {float(v)!r}" for k, v in model.hyper_values.items()]
    out += pyfmt.container("HYPER = {", hyper_items, "}")
    out += pyfmt.container("STATES = (", [pyfmt.string(s) for s in model.states], ")", tuple_=True)
    out += pyfmt.container(
        "SCALAR_STATES = (", [pyfmt.string(s) for s in sorted(scalar_states)], ")", tuple_=True
    )
    out.append("\n")
    out.append("class State(NamedTuple):")
    out.append(
        '    """Steps taken so far (t = count + 1 during a step) and the optimizer\'s states'
    )
    out.append(
        '    (per-coordinate states are pytrees like the parameters, scalar ones scalars)."""'
    )
    out.append("")
    out.append("    count: jax.Array")
    out.append("    states: dict")
    out.append("\n")
    out.append("def _dtype(tree):")
    out.append('    """The common dtype of the leaves."""')
    out.append("    return jnp.result_type(*jax.tree.leaves(tree))")
    out.append("\n")
    out.append("def _like(ref, x):")
    out.append('    """``x`` in the dtype of the leaf ``ref``."""')
    out.append("    return jnp.asarray(x, dtype=ref.dtype)")
    out.append("\n")
    out.append("def _sum(tree):")
    out.append('    """Sum over every coordinate of every leaf."""')
    out.append("    return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))")
    out.append("\n")
    out.append("def _mean(tree):")
    out.append('    """Mean over every coordinate of every leaf."""')
    out.append("    return _sum(tree) / sum(jnp.size(leaf) for leaf in jax.tree.leaves(tree))")
    out.append("\n")

    out.append("def transformation(**hyper) -> optax.GradientTransformation:")
    out.append(f'    """{program.name} as an optax GradientTransformation.\n')
    out.append("    Args:")
    out.append("        **hyper: hyperparameters overriding the defaults in HYPER.\n")
    out.append("    Returns:")
    out.append("        The transformation; its update is the step w_new - w.")
    out.append('    """')
    out.append("    unknown = set(hyper) - set(HYPER)")
    out.append("    if unknown:")
    out.append(
        '        raise TypeError(f"unknown hyperparameters {sorted(unknown)}; '
        'known: {list(HYPER)}")'
    )
    out.append("    hyper = {**HYPER, **hyper}")
    used = set().union(
        *(st.raw.free_symbols for st in model.statements),
        *(e.free_symbols for e in model.init.values()),
    )
    used = {u.name for u in used}
    for h in model.hyper_values:
        if h in used:
            out.append(f"    {names[h]} = hyper[{pyfmt.string(h)}]")
    out.append("")

    # init
    out.append("    def init_fn(params):")
    ind = "        "
    per_states = [s for s in model.states if s not in scalar_states]
    init_lines: list[str] = [f"{ind}w = params"] if per_states else []
    items = []
    for s in model.states:
        e = model.init[s]
        if s in scalar_states:
            items.append((s, f"jnp.asarray({mod.code(e)}, dtype=_dtype(params))"))
        else:
            room = pyfmt.LINE_LENGTH - len(ind) - 4 - len(f'"{s}": ,')
            tree = mod.leafwise(e, ["w"], ind, init_lines, cast=None, default="w", room=room)
            items.append((s, tree))
    out += init_lines
    entries = [f"{pyfmt.string(k)}: {v}" for k, v in items]
    out += pyfmt.container("states = {", entries, "}", ind)
    out.append(f"{ind}return State(jnp.zeros([], jnp.int32), states)")
    out.append("")

    # update
    out.append("    def update_fn(updates, state, params=None):")
    body: list[str] = []
    body.append(f"{ind}g = updates")
    if reads_w:
        body.append(f"{ind}if params is None:")
        body.append(
            f'{ind}    raise ValueError("{program.name} reads the parameters w: '
            'pass params to update")'
        )
        body.append(f"{ind}w = params")
    if "t" in used:
        body.append(f"{ind}t = jnp.asarray(state.count + 1, dtype=_dtype(g))")
    for s in model.states:
        body.append(f"{ind}{names[s]} = state.states[{pyfmt.string(s)}]")
    for st in model.statements:
        expr = mod.reductions(st.raw if st.role != "w" else dw, order, ind, body)
        target = "dw" if st.role == "w" else names[st.target]
        room = pyfmt.LINE_LENGTH - len(ind) - len(f"{target} = ")
        if st.role == "w":
            body.append(f"{ind}dw = {mod.leafwise(expr, order, ind, body, 'g', room=room)}")
        elif st.target in per_coord:
            cast = "g" if st.role == "state" else None
            tree = mod.leafwise(expr, order, ind, body, cast=cast, room=room)
            body.append(f"{ind}{target} = {tree}")
        elif st.role == "state":
            old = f"state.states[{pyfmt.string(st.target)}]"
            body.append(f"{ind}{target} = jnp.asarray({mod.code(expr)}, dtype={old}.dtype)")
        else:
            body.append(f"{ind}{target} = {mod.code(expr)}")
    out += body
    new_states = [f"{pyfmt.string(s)}: {names[s]}" for s in model.states]
    out += pyfmt.container("states = {", new_states, "}", ind)
    out.append(f"{ind}return dw, State(optax.safe_int32_increment(state.count), states)")
    out.append("")
    out.append("    return optax.GradientTransformation(init_fn, update_fn)")
    text = "\n".join(out).rstrip() + "\n"
    return format_source(text)


__all__ = ["generate_optax", "rmean", "rsum"]
