"""One error hierarchy for every stage of flowgen.

Every error a user can cause is a :class:`FlowgenError`. When it knows where it
comes from (a file, a line, a column), :meth:`FlowgenError.format` renders it
like a compiler does::

    optimizers/bad.opt:7:9: error: undeclared name `bta1`
        m = bta1 * m + (1 - beta1) * g
            ^
    hint: did you mean `beta1`?

The CLI prints ``format()`` and exits with status 2; it never shows a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A point in a source file (1-based line and column)."""

    path: str
    line: int
    column: int
    source_line: str = ""


class FlowgenError(Exception):
    """Base of all errors flowgen reports to users."""

    kind = "error"

    def __init__(self, message: str, *, location: Location | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.location = location
        self.hint = hint

    @property
    def line(self) -> int | None:
        return self.location.line if self.location else None

    @property
    def column(self) -> int | None:
        return self.location.column if self.location else None

    def format(self) -> str:
        loc = self.location
        if loc is None:
            head = f"{self.kind}: {self.message}"
            lines = [head]
        else:
            lines = [f"{loc.path}:{loc.line}:{loc.column}: {self.kind}: {self.message}"]
            if loc.source_line:
                src = loc.source_line.rstrip("\n").expandtabs(1)
                lines.append("    " + src)
                lines.append("    " + " " * (max(loc.column, 1) - 1) + "^")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.format()


class OptSyntaxError(FlowgenError):
    """The `.opt` text does not follow the grammar."""


class OptCheckError(FlowgenError):
    """The `.opt` program parses but is not a valid update rule."""


class DerivationError(FlowgenError):
    """The symbolic derivation cannot be carried out (e.g. no second-order expansion)."""


class CodegenError(FlowgenError):
    """Code generation failed."""


class ProblemError(FlowgenError):
    """A problem specification (built-in or user file) is invalid."""


class SimulationError(FlowgenError):
    """A simulation failed: NaN/inf, solver failure, stiffness."""


class UsageError(FlowgenError):
    """Bad command-line or API arguments (e.g. ``--set`` of an unknown name)."""


def location_in(path: str, source: str, line: int, column: int) -> Location:
    """Build a :class:`Location`, attaching the source line text."""
    lines = source.splitlines()
    text = lines[line - 1] if 1 <= line <= len(lines) else ""
    return Location(path=path, line=line, column=column, source_line=text)
