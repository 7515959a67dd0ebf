"""Parse `.opt` text into the typed AST of :mod:`flowgen.language.ast`.

The grammar lives in ``grammars/opt.lark`` (packaged as ``flowgen/grammars/opt.lark``
in a wheel). The lark LALR parser is built once and builds the AST directly
while parsing (an inline transformer), so there is no intermediate parse tree.

Every failure is reported as an :class:`~flowgen.errors.OptSyntaxError` with a
line, a column and one plain sentence; no lark exception ever escapes.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
from dataclasses import dataclass, replace
from pathlib import Path

from lark import Lark, Token, Transformer
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from flowgen.errors import FlowgenError, Location, OptSyntaxError, location_in
from flowgen.language.ast import (
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

__all__ = ["KEYWORDS", "grammar_path", "parse_file", "parse_text", "SYNTAX_EXAMPLES"]

KEYWORDS = ("optimizer", "hyper", "state", "update", "scalar")

# ------------------------------------------------------------------- grammar


def grammar_path() -> Path:
    """Where the grammar is: the packaged copy if installed, else the repository's."""
    try:
        packaged = importlib.resources.files("flowgen") / "grammars" / "opt.lark"
        if packaged.is_file():
            return Path(str(packaged))
    except (ModuleNotFoundError, OSError, TypeError, ValueError):  # pragma: no cover
        pass
    return Path(__file__).resolve().parents[2] / "grammars" / "opt.lark"


@functools.cache
def _parser() -> Lark:
    path = grammar_path()
    try:
        grammar = path.read_text(encoding="utf-8")
    except OSError as exc:  # pragma: no cover - broken installation
        raise FlowgenError(f"cannot read the `.opt` grammar at {path}: {exc.strerror}") from None
    return Lark(
        grammar,
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
        transformer=_ASTBuilder(),
    )


# -------------------------------------------------------------- AST building


@dataclass(frozen=True)
class _Header:
    keyword: Token
    name: str
    description: str


@dataclass(frozen=True)
class _Decl:
    keyword: Token
    node: HyperDecl | StateDecl


@dataclass(frozen=True)
class _Update:
    keyword: Token
    body: tuple[Assign, ...]


def _pos(tok: Token) -> dict[str, int]:
    return {"line": tok.line, "column": tok.column}


def _unquote(text: str) -> str:
    body = text[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _ASTBuilder(Transformer):
    """Inline LALR callbacks: one method per rule alias of ``opt.lark``."""

    __visit_tokens__ = False

    def start(self, items):
        return list(items)

    def optimizer_decl(self, children):
        keyword, name, string = children
        return _Header(keyword, str(name), _unquote(str(string)) if string is not None else "")

    def hyper_decl(self, children):
        keyword, name, minus, number = children
        text = ("-" if minus is not None else "") + str(number)
        return _Decl(keyword, HyperDecl(str(name), float(text), text, **_pos(name)))

    def state_decl(self, children):
        keyword, name, scalar, init = children
        return _Decl(keyword, StateDecl(str(name), init, scalar is not None, **_pos(name)))

    def update_block(self, children):
        keyword, *body = children
        return _Update(keyword, tuple(body))

    def assign(self, children):
        name, value = children
        return Assign(str(name), value, **_pos(name))

    def bin_op(self, children):
        left, op, right = children
        symbol = "^" if op in ("^", "**") else str(op)
        return BinOp(symbol, left, right, **_pos(op))

    def neg(self, children):
        minus, operand = children
        return Neg(operand, **_pos(minus))

    def num(self, children):
        (tok,) = children
        return Num(float(tok), str(tok), **_pos(tok))

    def name(self, children):
        (tok,) = children
        return Name(str(tok), **_pos(tok))

    def call(self, children):
        func, *args = children
        return Call(str(func), tuple(args), **_pos(func))


# -------------------------------------------------------------- public API


def parse_text(text: str, path: str = "<string>") -> Program:
    """Parse `.opt` source text; raises :class:`OptSyntaxError` on any problem."""
    path = str(path)
    source = text if text.endswith("\n") else text + "\n"
    try:
        items = _parser().parse(source)
        return _assemble(items, text, path)
    except FlowgenError:
        raise
    except UnexpectedInput as exc:
        raise _from_lark(exc, text, path) from None
    except RecursionError:
        raise OptSyntaxError(
            "the program is nested too deeply to parse",
            location=_location(path, text, 1, 1),
            hint="split deeply nested expressions into several local assignments",
        ) from None
    except Exception as exc:  # pragma: no cover - a bug; never show a traceback for it either
        raise OptSyntaxError(f"cannot parse this file ({type(exc).__name__}: {exc})") from None


def parse_file(path) -> Program:
    """Read and parse an `.opt` file; unreadable files raise :class:`OptSyntaxError`."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OptSyntaxError(f"cannot read `{shown}`: no such file") from None
    except IsADirectoryError:
        raise OptSyntaxError(f"cannot read `{shown}`: it is a directory, not a file") from None
    except PermissionError:
        raise OptSyntaxError(f"cannot read `{shown}`: permission denied") from None
    except UnicodeDecodeError as exc:
        raise OptSyntaxError(
            f"cannot read `{shown}`: it is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise OptSyntaxError(f"cannot read `{shown}`: {reason}") from None
    return parse_text(text, shown)


# ------------------------------------------------------- program structure


def _location(path: str, source: str, line: int, column: int) -> Location:
    """Like :func:`location_in`, counting lines the way the lexer does (``\\n`` only)."""
    loc = location_in(path, source, line, column)
    lines = source.split("\n")
    text = lines[line - 1].rstrip("\r") if 1 <= line <= len(lines) else ""
    return replace(loc, source_line=text)


def _error(path, source, line, column, message, hint=None) -> OptSyntaxError:
    return OptSyntaxError(message, location=_location(path, source, line, column), hint=hint)


def _assemble(items: list, source: str, path: str) -> Program:
    if not items:
        raise _error(
            path,
            source,
            1,
            1,
            "the file declares no optimizer: expected `optimizer NAME` first",
            hint='start the file with a line like `optimizer my_opt "description"`',
        )
    first = items[0]
    if not isinstance(first, _Header):
        kw = first.keyword
        raise _error(
            path,
            source,
            kw.line,
            kw.column,
            f"expected `optimizer NAME` before `{kw}`: the optimizer must be declared first",
            hint='start the file with a line like `optimizer my_opt "description"`',
        )
    hypers: list[HyperDecl] = []
    states: list[StateDecl] = []
    update: _Update | None = None
    for item in items[1:]:
        if isinstance(item, _Header):
            kw = item.keyword
            raise _error(
                path,
                source,
                kw.line,
                kw.column,
                "a second `optimizer` declaration: a file declares exactly one optimizer",
                hint=f"the optimizer `{first.name}` is declared at line {first.keyword.line}",
            )
        if isinstance(item, _Update):
            if update is not None:
                kw = item.keyword
                raise _error(
                    path,
                    source,
                    kw.line,
                    kw.column,
                    "a second `update` block: an optimizer has exactly one",
                    hint=f"merge it into the `update` block of line {update.keyword.line}",
                )
            update = item
        elif isinstance(item.node, HyperDecl):
            hypers.append(item.node)
        else:
            states.append(item.node)
    if update is None:
        kw = first.keyword
        raise _error(
            path,
            source,
            kw.line,
            kw.column,
            f"the optimizer `{first.name}` has no `update {{ ... }}` block",
            hint="add a block `update { ... }` whose last statement assigns `w`",
        )
    return Program(
        first.name,
        first.description,
        tuple(hypers),
        tuple(states),
        update.body,
        path=path,
        source=source,
        update_line=update.keyword.line,
        update_column=update.keyword.column,
        line=first.keyword.line,
        column=first.keyword.column,
    )


# ------------------------------------------------------------ syntax errors

# Terminal groups of opt.lark.
_EXPR_START = frozenset({"NAME", "NUMBER", "LPAR", "MINUS"})
_OPERATORS = frozenset({"PLUS", "MINUS", "STAR", "SLASH", "POW"})
_KEYWORD_TYPES = frozenset(k.upper() for k in KEYWORDS)
_ITEM_START = frozenset({"OPTIMIZER", "HYPER", "STATE", "UPDATE"})
_LINE_END = frozenset({"_NL", "$END"})

_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a description in double quotes",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "LBRACE": "`{`",
    "RBRACE": "`}`",
    "COMMA": "`,`",
    "COLON": "`:`",
    "EQUAL": "`=`",
    "SEMICOLON": "`;`",
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "POW": "`^`",
    **{k.upper(): f"`{k}`" for k in KEYWORDS},
}
_ORDER = list(_WORDS)

# Malformed examples -> message, for the contexts of a declaration header.
# At the first syntax error, each example is parsed once and the parser state
# where it fails is remembered; an error in one of these states gets this
# message (``{name}`` is the name being declared) and hint.
SYNTAX_EXAMPLES: tuple[tuple[str, str | None, tuple[str, ...]], ...] = (
    (
        "expected the optimizer's name after `optimizer`",
        'write `optimizer NAME "description"`',
        ("optimizer\n", "optimizer 3\n", 'optimizer "Adam"\n', "optimizer (\n", "optimizer = 1\n"),
    ),
    (
        "expected a description in double quotes or the end of the line after `optimizer {name}`",
        'write `optimizer {name} "description"`',
        ("optimizer a b\n", "optimizer a 3\n", "optimizer a (\n", "optimizer a = 1\n"),
    ),
    (
        "expected the end of the line after the optimizer's description",
        None,
        ('optimizer a "x" y\n', 'optimizer a "x" "y"\n', 'optimizer a "x" = 1\n'),
    ),
    (
        "expected a name after `hyper`",
        "write `hyper NAME = NUMBER`",
        ("optimizer a\nhyper\n", "optimizer a\nhyper 3 = 1\n", "optimizer a\nhyper = 1\n"),
    ),
    (
        "expected `=` after `hyper {name}`",
        "write `hyper {name} = NUMBER`",
        ("optimizer a\nhyper lr\n", "optimizer a\nhyper lr 1\n", "optimizer a\nhyper lr : 1\n"),
    ),
    (
        "expected a number for hyper `{name}`",
        "a hyperparameter's default is a plain number such as `1e-3` or `-0.5`",
        (
            "optimizer a\nhyper lr =\n",
            "optimizer a\nhyper lr = x\n",
            "optimizer a\nhyper lr = (1)\n",
            "optimizer a\nhyper lr = - x\n",
            "optimizer a\nhyper lr = -\n",
        ),
    ),
    (
        "expected the end of the line after the value of hyper `{name}`",
        "a hyperparameter's default is a plain number, not an expression",
        (
            "optimizer a\nhyper lr = 1 x\n",
            "optimizer a\nhyper lr = 1 * 2\n",
            "optimizer a\nhyper lr = 1 / 2\n",
            "optimizer a\nhyper lr = 1 + 2\n",
            "optimizer a\nhyper lr = 1 - 2\n",
            "optimizer a\nhyper lr = 1 ^ 2\n",
            "optimizer a\nhyper lr = 1 (\n",
            "optimizer a\nhyper lr = 1 2\n",
            "optimizer a\nhyper lr = -1 x\n",
            "optimizer a\nhyper lr = -1 * 2\n",
        ),
    ),
    (
        "expected a name after `state`",
        "write `state NAME = EXPR`",
        ("optimizer a\nstate\n", "optimizer a\nstate 3 = 1\n", "optimizer a\nstate = 1\n"),
    ),
    (
        "expected `=` or `: scalar` after `state {name}`",
        "write `state {name} = EXPR` (per-coordinate) or `state {name} : scalar = EXPR`",
        ("optimizer a\nstate m\n", "optimizer a\nstate m 0\n", "optimizer a\nstate m (\n"),
    ),
    (
        "expected `scalar` after `state {name} :`",
        "`state {name} : scalar = EXPR` declares a scalar state; "
        "without `: scalar` a state is per-coordinate",
        (
            "optimizer a\nstate m :\n",
            "optimizer a\nstate m : vector = 0\n",
            "optimizer a\nstate m : = 0\n",
            "optimizer a\nstate m : 0\n",
        ),
    ),
    (
        "expected `=` after `state {name} : scalar`",
        "write `state {name} : scalar = EXPR`",
        ("optimizer a\nstate m : scalar\n", "optimizer a\nstate m : scalar 0\n"),
    ),
    (
        "expected `{` after `update`",
        "write `update {`, then one statement `NAME = expression` per line, then `}`",
        (
            "optimizer a\nupdate\n",
            "optimizer a\nupdate w = 1\n",
            "optimizer a\nupdate (\n",
            "optimizer a\nupdate\nw = 1\n",
            "optimizer a\nupdate\n(\n",
        ),
    ),
    (
        "expected `=` after `{name}`",
        "a statement of the update block is an assignment `NAME = expression`",
        (
            "optimizer a\nupdate {\nm\n",
            "optimizer a\nupdate {\nm + 1\n",
            "optimizer a\nupdate {\nm 1\n",
            "optimizer a\nupdate {\nm (\n",
            "optimizer a\nupdate {\nm }\n",
        ),
    ),
)


@functools.cache
def _example_states() -> dict[int, tuple[str, str | None]]:
    table: dict[int, tuple[str, str | None]] = {}
    for message, hint, examples in SYNTAX_EXAMPLES:
        for example in examples:
            try:
                _parser().parse(example)
            except UnexpectedInput as exc:
                state = getattr(exc, "state", None)
                position = getattr(state, "position", None)
                if isinstance(position, int):
                    table.setdefault(position, (message, hint))
            except LarkError:  # pragma: no cover
                pass
    return table


def _stack(exc) -> list:
    state = getattr(exc, "state", None)
    stack = getattr(state, "value_stack", None)
    return list(stack) if stack else []


def _last_token(stack: list, types) -> Token | None:
    for value in reversed(stack):
        if isinstance(value, Token) and value.type in types:
            return value
    return None


def _code_end(source: str, line: int) -> int:
    """Column just after the last code character of ``line`` (comments excluded)."""
    lines = source.split("\n")
    if not 1 <= line <= len(lines):
        return 1
    text = lines[line - 1]
    in_string = False
    cut = len(text)
    i = 0
    while i < len(text):
        ch = text[i]
        if in_string and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_string = not in_string
        elif ch == "#" and not in_string:
            cut = i
            break
        i += 1
    return len(text[:cut].rstrip(" \t\f\r")) + 1


def _found(tok: Token) -> str:
    kind = tok.type
    if kind == "$END":
        return "the end of the file"
    if kind == "_NL":
        return "the end of the line"
    if kind == "NUMBER":
        return f"the number `{tok}`"
    if kind == "NAME":
        return f"`{tok}`"
    if kind == "STRING":
        return "a string"
    return f"`{tok}`"


def _unexpected(tok: Token) -> str:
    """``tok`` as the object of "unexpected ..."."""
    kind = tok.type
    if kind == "$END":
        return "end of the file"
    if kind == "_NL":
        return "end of the line"
    if kind == "NUMBER":
        return f"number `{tok}`"
    if kind == "STRING":
        return "string"
    return f"`{tok}`"


def _char(ch: str) -> str:
    if ch.isprintable() and not ch.isspace():
        return f"`{ch}`"
    return f"U+{ord(ch):04X}"


def _expected_words(expected) -> str:
    exp = set(expected) - {"SEMICOLON"}
    if "_NL" in exp:
        exp.discard("$END")
    words: list[str] = []
    if _EXPR_START <= exp:
        words.append("an expression")
        exp -= _EXPR_START
    if {"PLUS", "STAR", "SLASH", "POW"} <= exp:
        words.append("an operator")
        exp -= _OPERATORS
    for name in sorted(exp, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER)):
        words.append(_WORDS.get(name, name))
    if not words:
        return "something else"
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _accepts(exc: UnexpectedInput) -> set[str]:
    """The terminals that would let the parser go on (exact, unlike LALR's ``expected``)."""
    expected = set(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())
    interactive = getattr(exc, "interactive_parser", None)
    try:
        accepts = set(interactive.accepts()) if interactive is not None else set()
    except Exception:  # pragma: no cover - fall back to the parse table's view
        accepts = set()
    if accepts:
        if "$END" in expected:
            accepts.add("$END")
        return accepts
    return expected


def _after(prev) -> str:
    if isinstance(prev, Token):
        if prev.type == "_NL":
            return "at the start of the line"
        return f"after `{prev}`"
    return "here"


def _from_lark(exc: UnexpectedInput, source: str, path: str) -> OptSyntaxError:
    try:
        line, column, message, hint = _explain(exc, source)
    except Exception:  # pragma: no cover - the explanation must never fail
        line = max(getattr(exc, "line", 1) or 1, 1)
        column = max(getattr(exc, "column", 1) or 1, 1)
        message, hint = "syntax error", None
    return _error(path, source, line, column, message, hint)


def _explain(exc: UnexpectedInput, source: str) -> tuple[int, int, str, str | None]:
    stack = _stack(exc)
    state = getattr(getattr(exc, "state", None), "position", None)
    known = _example_states().get(state) if isinstance(state, int) else None
    declared = _last_token(stack, {"NAME"})
    name = str(declared) if declared is not None else "NAME"

    def from_table() -> tuple[str, str | None]:
        msg, hnt = known
        return msg.replace("{name}", name), hnt.replace("{name}", name) if hnt else None

    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream
        ch = source[pos] if 0 <= pos < len(source) else ""
        if ch == '"':
            return (
                exc.line,
                exc.column,
                "unterminated string",
                'close the description with `"` on the same line',
            )
        message = f"unexpected character {_char(ch)}"
        if known is not None:
            hint = from_table()[0]
        elif ch == ".":
            hint = "numbers are written like `0.5`, `.5` or `1e-3`"
        elif ch in "[]":
            hint = "use parentheses `( )` for grouping"
        elif ch.isalpha():
            hint = "names use ASCII letters, digits and `_`"
        else:
            allowed = _accepts(exc)
            hint = f"expected {_expected_words(allowed)}" if allowed else None
        return exc.line, exc.column, message, hint

    if not isinstance(exc, UnexpectedToken):
        lines = source.split("\n")
        last = len(lines) if lines[-1] else max(len(lines) - 1, 1)
        return last, _code_end(source, last), "unexpected end of the file", None

    tok: Token = exc.token
    expected = _accepts(exc)
    prev = stack[-1] if stack else None
    line, column = tok.line or 1, tok.column or 1
    if tok.type in _LINE_END:
        column = _code_end(source, line)

    kind = tok.type
    wants_expr = bool(expected & {"NAME", "NUMBER"}) and "RBRACE" not in expected
    in_block = "RBRACE" in expected and "NAME" in expected

    if kind in _ITEM_START and in_block:
        block = _last_token(stack, {"UPDATE"})
        where = f" (opened at line {block.line})" if block is not None else ""
        return (
            line,
            column,
            f"unexpected `{tok}` inside the update block{where}",
            "declarations go outside `update { ... }`; is the closing `}` missing?",
        )
    if kind in _KEYWORD_TYPES and "NAME" in expected:
        return (
            line,
            column,
            f"`{tok}` is a reserved word and cannot be used as a name",
            f"rename it, e.g. `{tok}_`",
        )
    if known is not None:
        message, hint = from_table()
        return line, column, message, hint
    if wants_expr:
        message = f"expected an expression {_after(prev)}"
        if kind not in _LINE_END:
            message += f", found {_found(tok)}"
        return line, column, message, None
    if kind == "$END" and "RBRACE" in expected:
        block = _last_token(stack, {"UPDATE"})
        hint = "close the block with `}` on its own line"
        if block is not None:
            hint = f"the update block opened at line {block.line} needs a closing `}}`"
        return line, column, "missing `}` at the end of the update block", hint
    if kind == "RPAR" and "RPAR" not in expected:
        return line, column, "unexpected `)`", "it closes no `(`"
    if "RPAR" in expected and kind in _LINE_END | {"SEMICOLON", "RBRACE"}:
        opening = _last_token(stack, {"LPAR"})
        hint = None
        if opening is not None:
            hint = f"the `(` at line {opening.line}, column {opening.column} is never closed"
        return line, column, "missing `)`", hint
    if "RPAR" in expected and "COMMA" in expected and kind in _EXPR_START:
        return (
            line,
            column,
            f"expected `,`, `)` or an operator before {_found(tok)}",
            "function arguments are separated by commas: `max(a, b)`",
        )
    if {"PLUS", "STAR"} <= expected:
        if kind in _EXPR_START:
            hint = "write multiplication explicitly, e.g. `2 * x`"
            if kind == "NUMBER" and str(tok).startswith("."):
                hint = "a number has at most one decimal point"
            message = f"expected an operator or the end of the line before {_found(tok)}"
            return line, column, message, hint
        if kind == "EQUAL":
            return (
                line,
                column,
                "unexpected `=`",
                "a statement assigns one name: `NAME = expression`; is a line break missing?",
            )
        if kind == "COMMA":
            hint = "commas separate the arguments of a function call"
            return line, column, "unexpected `,`", hint
        return (
            line,
            column,
            f"unexpected {_unexpected(tok)}",
            f"expected {_expected_words(expected)}",
        )
    if in_block:
        message = f"expected a statement `NAME = expression` or `}}`, found {_found(tok)}"
        return line, column, message, None
    if expected & _ITEM_START:
        message = (
            f"unexpected {_unexpected(tok)}; expected `optimizer`, `hyper`, `state` or `update`"
        )
        hint = None
        if kind == "NAME":
            close = difflib.get_close_matches(str(tok), KEYWORDS[:4], n=1, cutoff=0.6)
            if close:
                hint = f"did you mean `{close[0]}`?"
            else:
                hint = "statements `NAME = expression` go inside `update { ... }`"
        elif kind == "RBRACE":
            message = "unexpected `}`: no update block is open"
        return line, column, message, hint
    if expected <= {"_NL", "SEMICOLON", "$END"}:
        return (
            line,
            column,
            f"expected the end of the line, found {_found(tok)}",
            "put each declaration and each statement on its own line",
        )
    return (
        line,
        column,
        f"unexpected {_unexpected(tok)}; expected {_expected_words(expected)}",
        None,
    )
