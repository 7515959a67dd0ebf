"""The differential fuzzer: flowgen against an independent interpreter, and the CLI against
mutated input (issue 11).

1. :func:`test_generated_step_matches_the_reference`: random well-formed programs
   (``opt_fuzz.programs``) are compiled by flowgen into the module ``codegen``
   writes, run for several steps, and compared with ``opt_reference`` (lark +
   numpy, no flowgen code): every state and ``w`` equal to 1e-9 (relative; NaN
   matches NaN, infinities match equal infinities), of the same shape, real
   float64. A program the reference says must be refused (a documented limit,
   a float64 overflow of a constant) must be refused with a located error;
   any other must be accepted.
2. :func:`test_cli_survives_mutated_files_and_bad_sets`: library files and
   reproducers of the issue, mutated, with bad ``--set`` values, through
   ``flowgen derive --json`` and ``flowgen codegen``: exit status 0 or 2, never a
   traceback, within a bounded time.

The fast suite runs a few hundred examples; ``pytest -m slow`` runs 5,000 of each
and prints the counts (``FUZZ_EXAMPLES`` overrides the number).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import opt_reference as R
import pytest
from conftest import OPTIMIZERS
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from opt_fuzz import mutated, programs, set_values

from flowgen.cli import main
from flowgen.codegen import generate, load_module
from flowgen.errors import FlowgenError
from flowgen.flow import build_flow
from flowgen.flow.discrete import build_discrete
from flowgen.language import check_program, parse_text

RTOL = 1e-9
STEPS = 4
CPU_SECONDS = 10.0  # bound on the CPU time of one CLI call (the derivation's budget is 4 s)
WALL_SECONDS = 120.0  # a generous wall-clock bound: the machine may be shared

FAST = int(os.environ.get("FUZZ_EXAMPLES", "200"))
SLOW = int(os.environ.get("FUZZ_EXAMPLES", "5000"))


# ------------------------------------------------------------ comparison


def same_values(ours, ref) -> str | None:
    """None when ``ours`` (flowgen) equals ``ref`` (the interpreter), else why not."""
    a = np.asarray(ours)
    b = np.asarray(ref)
    if np.iscomplexobj(a) or a.dtype != np.float64:
        return f"dtype {a.dtype}, expected float64"
    if a.shape != b.shape:
        return f"shape {a.shape}, expected {b.shape}"
    ok = np.isclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True) | np.isclose(
        b, a, rtol=RTOL, atol=0.0, equal_nan=True
    )
    if not np.all(ok):
        i = np.argwhere(~ok)[0]
        return f"value {a[tuple(i)]!r}, expected {b[tuple(i)]!r} at {tuple(i)}"
    return None


def run_program(text: str, overrides: dict, rng_seed: int, *, full_codegen: bool = False):
    """Compile ``text`` with flowgen and run it against the reference.

    Returns an outcome: "match", "refused as required", or raises AssertionError
    ("wrong value", "refused a well-formed program", "accepted what must be refused").
    ``full_codegen`` runs the derivation as ``flowgen codegen`` does (slow).
    """
    ref = R.parse(text)
    hyper = {**ref.hypers, **overrides}
    must_refuse = R.refusal(ref, hyper)
    try:
        prog = parse_text(text, "fuzz.opt")
        check_program(prog)
        if full_codegen:
            spec = build_flow(prog, overrides, require_central=False, require_flow=False)
        else:
            spec = build_discrete(prog, overrides)
    except FlowgenError as err:
        if must_refuse:
            assert err.location is not None and err.line >= 1, err.format()
            return "refused as required"
        raise AssertionError(f"refused a well-formed program:\n{text}\n{err.format()}") from None
    if must_refuse:
        raise AssertionError(f"accepted a program that must be refused ({must_refuse}):\n{text}")
    mod = load_module(generate(spec), "fuzz")
    rng = np.random.default_rng(rng_seed)
    n = int(rng.integers(1, 6))
    w_ref = rng.normal(size=n)
    w = jnp.asarray(w_ref)
    s_ref = R.init(ref, w_ref, hyper)
    state = mod.init_state(w)
    for name in s_ref:
        why = same_values(state[name], s_ref[name])
        assert why is None, f"init of `{name}`: {why}\n{text}"
    for t in range(1, STEPS + 1):
        g_ref = 0.5 * np.nan_to_num(w_ref, nan=0.0, posinf=1.0, neginf=-1.0) + rng.normal(size=n)
        w, state = mod.step(w, state, jnp.asarray(g_ref), t)
        w_ref, s_ref = R.step(ref, w_ref, s_ref, g_ref, t, hyper)
        why = same_values(w, w_ref)
        assert why is None, f"w after step {t}: {why}\n{text}"
        for name in s_ref:
            why = same_values(state[name], s_ref[name])
            assert why is None, f"`{name}` after step {t}: {why}\n{text}"
        w_ref = np.asarray(w)  # continue both from flowgen's iterate: no drift between them
        s_ref = {k: np.asarray(v) if np.ndim(v) else np.float64(v) for k, v in state.items()}
    return "match"


@st.composite
def cases(draw):
    prog = draw(programs())
    overrides = {}
    for h in prog.hyper_names:
        if draw(st.integers(0, 5)) == 0:
            overrides[h] = draw(st.sampled_from([0.3, 1e-4, 0.99, -1.0, 5.0, 1e300, 0.0]))
    return prog.text, overrides, draw(st.integers(0, 2**31 - 1))


# ------------------------------------------------------------ CLI robustness

EXTRA_SOURCES = [
    # the reproducers, as seeds for mutation
    "optimizer amsgrad\nhyper lr = 1e-3\nhyper b1 = 0.9\nhyper b2 = 0.999\nhyper eps = 1e-8\n"
    "state m = 0\nstate v = 0\nstate vm = 0\nupdate {\n    m = b1 * m + (1 - b1) * g\n"
    "    v = b2 * v + (1 - b2) * g^2\n    vm = max(vm, v)\n"
    "    w = w - lr * m / (sqrt(vm) + eps)\n}\n",
    "optimizer ngd\nhyper lr = 0.1\nupdate {\n    w = w - lr * g / norm(g)\n}\n",
    "optimizer ssum\nhyper lr = 0.1\nstate s : scalar = 0\nupdate {\n"
    "    s = 0.9 * s + sum(g)\n    w = w - lr * g * s\n}\n",
    "optimizer ogd\nhyper lr = 0.1\nstate gp = 0\nupdate {\n"
    "    d = 2 * g - gp\n    gp = g\n    w = w - lr * d\n}\n",
]


def _sources() -> list[str]:
    return [p.read_text() for p in OPTIMIZERS] + EXTRA_SOURCES


def run_cli(text: str, sets: list[str], command: str) -> tuple[int, float, float, str]:
    """``flowgen COMMAND file --set ...`` in-process: (exit status, CPU seconds, wall
    seconds, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.opt"
        path.write_text(text)
        argv = [command, str(path), *sets] + (["--json"] if command == "derive" else [])
        out, err = io.StringIO(), io.StringIO()
        tic, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except Exception as exc:  # a traceback: what must never happen
                raise AssertionError(
                    f"flowgen {command} raised {type(exc).__name__}: {exc}\n--- file ---\n{text}"
                    f"\n--- --set {sets}"
                ) from exc
        return rc, time.process_time() - cpu, time.perf_counter() - tic, err.getvalue()


def check_cli(text: str, sets: list[str], command: str) -> tuple[str, float]:
    """Run one CLI case; returns its outcome ("exit 0", "exit 2", "exit 2 (budget)",
    "exit 2 (internal error)") and its CPU time."""
    rc, seconds, wall, err = run_cli(text, sets, command)
    assert rc in (0, 2), f"exit status {rc}\n{text}\n{sets}\n{err}"
    assert "Traceback" not in err, err
    if rc == 2:
        assert "error" in err, err
    assert seconds < CPU_SECONDS and wall < WALL_SECONDS, f"{seconds:.1f} s\n{text}\n{sets}"
    outcome = f"exit {rc}"
    if "time budget" in err:
        outcome += " (budget)"
    elif "internal error" in err:
        outcome += " (internal error)"
    return outcome, seconds


def _hyper_names(text: str) -> tuple[str, ...]:
    words = (line.split() for line in text.splitlines())
    return tuple(sorted({w[1] for w in words if len(w) > 1 and w[0] == "hyper"}))


@st.composite
def cli_cases(draw):
    """A mutated library file or issue reproducer, a random program (mutated or not),
    with ``--set`` values, for ``derive --json`` or ``codegen``."""
    text = draw(
        st.one_of(
            mutated(_sources()),
            programs().map(lambda p: p.text),
            programs().flatmap(lambda p: mutated([p.text])),
        )
    )
    return text, draw(set_values(_hyper_names(text))), draw(st.sampled_from(["derive", "codegen"]))


# ------------------------------------------------------------ the properties

_FAST_SETTINGS = settings(
    max_examples=FAST,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@seed(11)
@_FAST_SETTINGS
@given(cases())
def test_generated_step_matches_the_reference(case):
    text, overrides, rng_seed = case
    run_program(text, overrides, rng_seed)


@seed(11)
@settings(_FAST_SETTINGS, max_examples=max(FAST // 2, 20))
@given(cli_cases())
def test_cli_survives_mutated_files_and_bad_sets(case):
    check_cli(*case)


# ------------------------------------------------------------ the slow run


def _tally(strategy, fn, n: int, seed_value: int) -> tuple[Counter, dict[str, str]]:
    """Run ``fn`` on ``n`` examples of ``strategy``, counting outcomes (no shrinking),
    with the slowest case in CPU and wall-clock milliseconds; and the whole message
    (program included) of the first failure of each kind."""
    counts: Counter = Counter()
    first: dict[str, str] = {}
    slowest = {"cpu": 0.0, "wall": 0.0}

    @seed(seed_value)
    @settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=["generate"],
    )
    @given(strategy)
    def body(case):
        tic, cpu = time.perf_counter(), time.process_time()
        try:
            counts[fn(case)] += 1
        except AssertionError as err:
            kind = "FAIL " + str(err).split("\n", 1)[0][:80]
            counts[kind] += 1
            first.setdefault(kind, str(err))
        slowest["cpu"] = max(slowest["cpu"], time.process_time() - cpu)
        slowest["wall"] = max(slowest["wall"], time.perf_counter() - tic)

    body()
    counts["slowest case, CPU (ms)"] = int(1000 * slowest["cpu"])
    counts["slowest case, wall (ms)"] = int(1000 * slowest["wall"])
    return counts, first


def _check_tally(label: str, tally: tuple[Counter, dict[str, str]]) -> None:
    """Print the counts; fail with the first failing case of each kind, in full."""
    counts, first = tally
    print(f"\n{label}:", dict(counts))
    assert not first, "\n\n".join(f"{k} ({counts[k]}):\n{msg}" for k, msg in first.items())
    assert counts["slowest case, CPU (ms)"] < 10_000


@pytest.mark.slow
def test_fuzz_slow_programs():
    """5,000 random programs against the reference, with the derivation, as `codegen`
    runs it; prints the counts for the closing note."""
    run = lambda c: run_program(*c, full_codegen=True)  # noqa: E731
    _check_tally("programs", _tally(cases(), run, SLOW, seed_value=2024))


@pytest.mark.slow
def test_fuzz_slow_cli():
    """5,000 mutated CLI calls (a separate test from the programs' so that the two
    halves run on both of CI's workers); prints the counts for the closing note."""
    _check_tally("cli", _tally(cli_cases(), lambda c: check_cli(*c)[0], SLOW, seed_value=2025))


# ------------------------------------------------------------ cases the fuzzer found

OVERFLOW_AT_DEFAULT = (
    'optimizer fuzz "found by the slow fuzz, seed 2024"\n'
    "hyper v_hat = 1.5\nupdate {\n    w = 100 ^ v_hat ^ 100 ^ v_hat\n}\n"
)


@pytest.mark.parametrize(
    "text, sets",
    [
        (OVERFLOW_AT_DEFAULT, {"v_hat": 0.99}),  # the file overflows, --set would not
        (OVERFLOW_AT_DEFAULT.replace("1.5", "0.99"), {"v_hat": 1.5}),  # the reverse
    ],
)
def test_an_overflow_at_the_files_values_or_at_set_is_refused(text, sets):
    """The file is checked with its own values, the step with --set's (docs/language.md,
    "Numbers"); the reference agrees with both."""
    assert run_program(text, sets, 0, full_codegen=True) == "refused as required"
    assert run_program(text.replace("1.5", "0.99"), {"v_hat": 0.98}, 0) == "match"
