"""The ``flowgen`` command line.

Every user error is a :class:`~flowgen.errors.FlowgenError`: printed like a
compiler error on stderr, exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from flowgen import __version__
from flowgen.errors import FlowgenError, UsageError


def parse_sets(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set expects NAME=VALUE, got `{item}`", hint="e.g. --set lr=0.01")
        k, v = item.split("=", 1)
        k = k.strip()
        try:
            value = float(v)
        except ValueError:
            raise UsageError(
                f"--set {k}: `{v}` is not a number", hint="e.g. --set lr=3e-4"
            ) from None
        if not math.isfinite(value):
            raise UsageError(
                f"--set {k}={v}: the value of `{k}` must be a finite number",
                hint="float64 numbers reach about 1.8e308",
            )
        out[k] = value
    return out


def library_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [
        d
        for d in (Path.cwd() / "optimizers", here / "optimizers", here.parent / "optimizers")
        if d.is_dir()
    ]


def _console(stderr=False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# ------------------------------------------------------------------- commands


def cmd_derive(args) -> int:
    from flowgen.api import load
    from flowgen.report.derive import derive_latex, derive_report

    spec = load(args.file).derive(**parse_sets(args.set))
    if args.json:
        print(json.dumps(spec.to_json(), indent=2))
    elif args.latex:
        print(derive_latex(spec))
    else:
        derive_report(spec, _console())
    return 0


def cmd_list(args) -> int:
    from rich.table import Table

    from flowgen.language import load_program

    dirs = [Path(args.dir)] if args.dir else library_dirs()[:1]
    if not dirs or not dirs[0].is_dir():
        raise UsageError(f"no optimizer library at {dirs[0] if dirs else 'optimizers/'}")
    tab = Table(title=f"optimizers in {dirs[0]}", title_justify="left", box=None)
    for col in ("name", "states", "description"):
        tab.add_column(col, no_wrap=True, overflow="ellipsis")
    for f in sorted(dirs[0].glob("*.opt")):
        try:
            p = load_program(str(f))
        except FlowgenError as err:
            tab.add_row(f.stem, "", f"[red]invalid: {err.message}[/red]")
            continue
        states = ", ".join(s.name + (" (scalar)" if s.scalar else "") for s in p.states) or "—"
        tab.add_row(p.name, states, p.description)
    _console().print(tab)
    return 0


def cmd_codegen(args) -> int:
    from flowgen.api import load
    from flowgen.codegen import generate

    of = load(args.file)
    sets = parse_sets(args.set)
    if args.optax:  # the discrete rule as an optax transformation: no derivation needed
        src = of.optax_source(**sets)
        spec = None
    else:
        spec = of.spec(**sets)
        src = generate(spec)
    if args.output in (None, "-"):
        sys.stdout.write(src)
    else:
        Path(args.output).write_text(src)
        _console(stderr=True).print(f"wrote {args.output} ({len(src.splitlines())} lines)")
    if spec is None:
        pass
    elif not spec.has_flow:
        print(
            "note: the module has the discrete step only (init_state, step); no flow parts, "
            f"because the derivation refused the file:\n  {spec.flow_reason}",
            file=sys.stderr,
        )
    elif not spec.has_central:
        reason = spec.central_reason
        print(f"note: the module has no central flow (drift): {reason}", file=sys.stderr)
    return 0


def _check_counts(args) -> None:
    for name in ("steps", "chunk", "eig_every", "substeps", "stationary_substeps"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def _problem(args):
    from flowgen.problems import get_problem, parse_problem_options

    opts = parse_problem_options(args.problem_opt or [], args.problem)
    return get_problem(args.problem, **opts)


def cmd_problems(args) -> int:
    from flowgen.problems import describe_problems
    from flowgen.problems.base import USER_SPEC

    items = describe_problems()
    if args.json:
        print(json.dumps({"problems": items, "user_problems": USER_SPEC}, indent=2))
        return 0
    from rich.table import Table

    tab = Table(title="built-in problems (--problem NAME)", title_justify="left", box=None)
    for col in ("name", "data", "params", "options (defaults)", "description"):
        tab.add_column(col, overflow="fold")
    for it in items:
        opts = " ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in it["options"].items()
        )
        desc = f"alias of {it['alias_of']}" if it["alias_of"] else it["description"]
        tab.add_row(it["name"], it["data"], str(it["n_params"]), opts, desc)
    con = _console()
    con.print(tab)
    con.print(f"or your own: --problem {USER_SPEC} (examples/my_problem.py, docs/problems.md)")
    return 0


def _progress(label: str):
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console(stderr=True),
        transient=False,
    )
    return prog


class _StopOnSigint:
    """SIGINT handling for long runs: the first Ctrl-C asks the run to stop after the
    chunk in progress (its checkpoint is then complete; exit 130); a second one stops
    at once (the previous chunk's checkpoint remains). Installed only by the CLI."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        import signal

        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        _console(stderr=True).print(
            "[yellow]interrupt: stopping after this chunk and writing the checkpoint "
            "(Ctrl-C again to stop now)[/yellow]"
        )

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False

    def __call__(self) -> bool:
        return self.requested


def _with_phases(fn, opt, problem, cfg, *, command: str, out: Path, resume: bool):
    """Run ``fn(opt, problem, cfg, progress=..., store=..., resume=..., should_stop=...)``
    with one progress bar per phase, a checkpoint in ``out`` and SIGINT handling;
    records the wall time in ``res.timings``."""
    from flowgen.runtime.checkpoint import CheckpointStore, run_identity

    store = CheckpointStore(out, run_identity(command, opt, problem, cfg))
    tic = time.perf_counter()
    with _progress(f"{opt.name} on {problem.name}") as prog, _StopOnSigint() as stop:
        tasks = {}

        def cb(phase, t, n):
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=n)
            prog.update(tasks[phase], completed=t, description=phase)

        res = fn(opt, problem, cfg, progress=cb, store=store, resume=resume, should_stop=stop)
    res.timings["wall_s"] = time.perf_counter() - tic
    return res


def cmd_run(args) -> int:
    from flowgen.api import load
    from flowgen.report.outputs import run_summary, write_run
    from flowgen.runtime.run import RunConfig, run_stable

    _check_counts(args)
    of = load(args.file)
    sets = parse_sets(args.set)
    opt = of.optimizer(**sets)
    problem = _problem(args)
    cfg = RunConfig(steps=args.steps, chunk=args.chunk, eig_every=args.eig_every or 5)
    out = Path(args.out or f"runs/{opt.name}-{problem.name}")
    res = _with_phases(run_stable, opt, problem, cfg, command="run", out=out, resume=args.resume)
    write_run(res, out, opt=opt, command=sys.argv)
    run_summary(res, out, _console())
    return 0


def _central_config(args):
    """The central flow's configuration: the defaults and the options given here."""
    from flowgen.runtime.central import CentralConfig

    return CentralConfig.given(substeps=args.substeps, refine_tol=_refine_tol(args))


def _refine_tol(args) -> float | None:
    if args.refine_tol is not None and not args.refine_tol >= 0.0:  # also refuses nan
        raise UsageError(
            f"--refine-tol must be 0 (off) or a positive number, got {args.refine_tol}"
        )
    return args.refine_tol


def _add_refine_tol(p) -> None:
    p.add_argument(
        "--refine-tol",
        type=float,
        default=None,
        metavar="TOL",
        help="central flow's step control: a substep that pushes the effective sharpness past "
        "max(c, its value before)·(1 + TOL) is rejected and the substeps doubled (default "
        "0.02; 0: off)",
    )


def cmd_validate(args) -> int:
    from flowgen.api import load
    from flowgen.report.outputs import validation_summary, write_validation
    from flowgen.runtime.validate import ValidateConfig, validate

    _check_counts(args)
    of = load(args.file)
    opt = of.optimizer(**parse_sets(args.set))
    problem = _problem(args)
    restart = args.restart_at
    if restart not in (None, "auto"):
        try:
            restart = int(restart)
        except ValueError:
            raise UsageError(
                f"--restart-at expects a step number or `auto`, got `{restart}`"
            ) from None
    cfg = ValidateConfig(
        steps=args.steps,
        restart_at=restart,
        chunk=args.chunk,
        eig_every=args.eig_every or 1,
        central=_central_config(args),
        check_expansion=args.check_expansion,
    )
    out = Path(args.out or f"runs/validate-{opt.name}-{problem.name}")
    res = _with_phases(validate, opt, problem, cfg, command="validate", out=out, resume=args.resume)
    write_validation(res, out, opt=opt, command=sys.argv)
    validation_summary(res, out, _console())
    if args.strict and res.summary["verdict"] != "pass":
        return 1
    return 0


def _step_arg(value, flag: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{flag} expects a step number, got `{value}`") from None


def cmd_explain(args) -> int:
    from flowgen.api import load
    from flowgen.report.explain import explain_report, write_explain
    from flowgen.runtime.explain import ExplainConfig, explain

    _check_counts(args)
    of = load(args.file)
    opt = of.optimizer(**parse_sets(args.set))
    problem = _problem(args)
    restart = args.restart_at
    if restart is not None:
        try:
            restart = int(restart)
        except ValueError:
            raise UsageError(f"--restart-at expects a step number, got `{restart}`") from None
    cfg = ExplainConfig(
        steps=args.steps,
        restart_at=restart,
        substeps=args.substeps or ExplainConfig.substeps,
        refine_tol=_refine_tol(args),
        eig_every=args.eig_every or 5,
        chunk=args.chunk,
        relax_tol=args.relax_tol,
        default_form=not args.no_default_form,
        sdp_k=args.sdp_k,
        stationary_flow=args.stationary_flow,
        stationary_from=_step_arg(args.stationary_from, "--stationary-from"),
        stationary_substeps=args.stationary_substeps,
        stationary_method=args.stationary_method,
    )
    out = Path(args.out or f"runs/explain-{opt.name}-{problem.name}")
    res = _with_phases(explain, opt, problem, cfg, command="explain", out=out, resume=args.resume)
    write_explain(res, out, opt=opt, command=sys.argv)
    explain_report(res, out, _console())
    return 0


def cmd_sweep(args) -> int:
    from flowgen.report.sweep import sweep_summary, write_sweep
    from flowgen.runtime.sweep import FLOWS, SweepConfig, parse_sweep_sets, sweep

    _check_counts(args)
    sets = parse_sweep_sets(args.set)
    flows = tuple(f.strip() for f in args.flows.split(",") if f.strip())
    bad = [f for f in flows if f not in FLOWS]
    if bad or not flows:
        raise UsageError(
            f"--flows: `{bad[0] if bad else args.flows}` is not a list of {', '.join(FLOWS)}",
            hint="e.g. --flows discrete,central",
        )
    if "discrete" not in flows:
        flows = ("discrete", *flows)
    problem = _problem(args)
    cfg = SweepConfig(
        steps=args.steps,
        flows=flows,
        eig_every=args.eig_every or 10,
        chunk=args.chunk,
        batch=args.batch,
        substeps=args.substeps,
        refine_tol=_refine_tol(args),
        flow_start="auto"
        if args.flow_start == "auto"
        else _step_arg(args.flow_start, "--flow-start"),
    )
    out = Path(args.out or f"runs/sweep-{problem.name}")
    tic = time.perf_counter()
    with _progress(f"sweep on {problem.name}") as prog, _StopOnSigint() as stop:
        tasks = {}

        def cb(phase, t, n):
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=n)
            prog.update(tasks[phase], completed=t, description=phase)

        res = sweep(
            args.files, problem, sets, cfg, out=out, resume=args.resume, progress=cb,
            should_stop=stop,
        )  # fmt: skip
    res.timings["wall_s"] = time.perf_counter() - tic
    write_sweep(res, out, command=sys.argv)
    if args.json:
        print(json.dumps(res.to_json(), indent=1))
    else:
        sweep_summary(res, out, _console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="flowgen",
        description="Derive, generate and validate central flows of optimizers "
        "at the edge of stability.",
    )
    ap.add_argument("--version", action="version", version=f"flowgen {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def with_set(p):
        p.add_argument(
            "--set",
            action="append",
            metavar="NAME=VALUE",
            help="override a hyperparameter (repeatable)",
        )

    p = sub.add_parser("derive", help="derive the stability threshold and the central flow")
    p.add_argument("file")
    with_set(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--latex", action="store_true", help="print the equations as LaTeX")
    p.set_defaults(func=cmd_derive)

    p = sub.add_parser("list", help="list the optimizer library")
    p.add_argument("dir", nargs="?")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("problems", help="list the built-in problems and their options")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_problems)

    p = sub.add_parser("codegen", help="write the generated JAX module")
    p.add_argument("file")
    with_set(p)
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    p.add_argument(
        "--optax",
        action="store_true",
        help="write an optax GradientTransformation (transformation(**hyper)) instead",
    )
    p.set_defaults(func=cmd_codegen)

    from flowgen.problems.registry import builtin_names

    def with_problem(p):
        p.add_argument(
            "--problem",
            default="digits-mlp",
            help=f"built-in ({', '.join(builtin_names())}; see `flowgen problems`) "
            "or path/file.py:func or module:func",
        )
        p.add_argument(
            "--problem-opt",
            action="append",
            metavar="KEY=VALUE",
            help="problem option, e.g. n=200 or init_scales=0.2,1,0.1 (repeatable)",
        )
        p.add_argument("--steps", type=int, default=1000)
        p.add_argument("--out", help="output directory")
        p.add_argument(
            "--eig-every",
            type=int,
            default=None,
            help="effective sharpness every K steps (run: 5, validate: 1)",
        )
        p.add_argument(
            "--chunk",
            type=int,
            default=25,
            help="steps per lockstep chunk (progress and checkpoint granularity)",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue from the checkpoint in --out (the same command, file, "
            "hyperparameters and problem)",
        )

    p = sub.add_parser("run", help="run the discrete optimizer and its stable flow")
    p.add_argument("file")
    with_set(p)
    with_problem(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="validate the central flow against the discrete optimizer")
    p.add_argument("file")
    with_set(p)
    with_problem(p)
    p.add_argument(
        "--restart-at",
        metavar="T|auto",
        help="restart both flows from the discrete iterate at step T (auto: 100 steps "
        "after the edge of stability)",
    )
    p.add_argument("--substeps", type=int, default=None, help="Euler substeps per step (default 2)")
    _add_refine_tol(p)
    p.add_argument(
        "--check-expansion",
        action="store_true",
        help="once the flows run, measure at every chunk how far the gradient's time "
        "average over the discrete oscillation is from the flow's second-order expansion "
        "(tells a failure of the theory from one of the flow)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 unless the verdict is pass")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "explain",
        help="interpret the flow at a step: threshold, critical "
        "directions, implicit penalty, stationary preconditioner (relaxation, SDP)",
    )
    p.add_argument("file")
    with_set(p)
    with_problem(p)
    p.add_argument(
        "--restart-at",
        metavar="T",
        help="start the central flow from the discrete iterate at step T (default: the "
        "common start)",
    )
    p.add_argument(
        "--substeps", type=int, default=None, help="Euler substeps per step (the run; default 2)"
    )
    _add_refine_tol(p)
    p.add_argument(
        "--relax-tol",
        type=float,
        default=1e-7,
        help="relaxation stops when the state changes by less than this per unit time",
    )
    p.add_argument(
        "--no-default-form",
        action="store_true",
        help="skip the second relaxation with the derivation's default ν-rate",
    )
    p.add_argument(
        "--sdp-k", type=int, default=12, help="LMI size of the SDP (eigenpairs per model)"
    )
    p.add_argument(
        "--stationary-flow",
        action="store_true",
        help="also integrate the stationary flows (exact and simplified) and the stable flow, "
        "side by side with the discrete run and the central flow",
    )
    p.add_argument(
        "--stationary-from",
        metavar="T",
        help="start the stationary flows from the central flow's w̄ at step T (default: the "
        "central flow's start)",
    )
    p.add_argument(
        "--stationary-substeps",
        type=int,
        default=2,
        help="Euler substeps per step of the stationary flows",
    )
    p.add_argument(
        "--stationary-method",
        choices=("auto", "kkt", "sdp", "relax", "scalar"),
        default="auto",
        help="how P* is recomputed along the stationary flows (auto: Newton on the SDP's KKT "
        "system where the SDP applies, else relaxation)",
    )
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "sweep",
        help="every combination of files and hyperparameter values: final loss, sharpness, "
        "harmonic mean of the effective step sizes, flows' distances (sweep.json, sweep.png)",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=V1,V2,...",
        help="values of a hyperparameter (repeatable; several lists: every combination)",
    )
    with_problem(p)
    p.add_argument(
        "--flows",
        default="discrete",
        help="comma-separated: discrete (always), central, stationary (default: discrete)",
    )
    p.add_argument(
        "--batch",
        choices=("auto", "vmap", "sequential"),
        default="auto",
        help="discrete runs of one file batched with jax.vmap (auto: where the module allows)",
    )
    p.add_argument("--substeps", type=int, default=4, help="central flow: Euler substeps per step")
    _add_refine_tol(p)
    p.add_argument(
        "--flow-start",
        metavar="T|auto",
        default="auto",
        help="the flows start from the discrete iterate at step T (auto: 100 steps after the "
        "edge of stability, else step 1); the stationary flows from the central flow's there",
    )
    p.add_argument("--json", action="store_true", help="print sweep.json's content on stdout")
    p.set_defaults(func=cmd_sweep)

    return ap


COMPILE_CACHE_ENV = "FLOWGEN_COMPILE_CACHE"
_COMPILING = {"run", "validate", "explain", "sweep"}


def compile_cache_dir() -> Path | None:
    """Where the command line keeps compiled XLA code between runs, or None (off).

    ``$FLOWGEN_COMPILE_CACHE`` names the directory, or turns the cache off with
    ``off``/``0``; by default ``$XDG_CACHE_HOME/flowgen/xla`` (``~/.cache/…``)."""
    val = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if val.lower() in ("0", "off", "no", "false", "none"):
        return None
    if val:
        return Path(val).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flowgen" / "xla"


def _use_compile_cache() -> None:
    """JAX's persistent compilation cache for a command that compiles. The command
    line is an application, so it may configure JAX; ``import flowgen`` never does
    (the Python API leaves this to the user: ``jax.config.update(
    "jax_compilation_cache_dir", ...)``). A cached executable is the one XLA would
    compile, so outputs do not depend on the cache; only the start-up does
    (measured in ``benchmarks/central_flow.py --validate``). A directory the user
    set in JAX's own config wins."""
    path = compile_cache_dir()
    if path is None:
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    if args.command in _COMPILING:
        _use_compile_cache()
    try:
        return args.func(args)
    except FlowgenError as err:
        print(err.format(), file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(
            "interrupted: the checkpoint of the last complete chunk remains in --out; "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
