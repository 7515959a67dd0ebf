"""Stage 1: the `.opt` language — parse text into a typed AST, then check it."""

from flowgen.language.ast import Program
from flowgen.language.checks import check_program
from flowgen.language.parser import parse_file, parse_text

__all__ = ["Program", "parse_text", "parse_file", "check_program", "load_program"]


def load_program(path: str) -> Program:
    """Parse and check an `.opt` file; raises :class:`flowgen.errors.FlowgenError`."""
    prog = parse_file(path)
    check_program(prog)
    return prog
