"""The Python API, mirroring the CLI.

>>> import flowgen
>>> opt = flowgen.load("optimizers/adam.opt")
>>> spec = opt.derive(beta1=0.9)            # FlowSpec: threshold, drifts, ...
>>> print(opt.codegen())                     # the generated JAX module
>>> res = opt.run("digits-mlp", steps=200, lr=3e-3)   # discrete + stable flow
>>> val = opt.validate("digits-mlp", steps=1000, restart_at="auto", lr=3e-3, beta2=0.99)
>>> ex = flowgen.load("optimizers/rmsprop.opt").explain("digits-mlp", steps=600, lr=3e-4)
>>> sw = flowgen.sweep(["optimizers/rmsprop.opt"], "digits-mlp", 600, lr=[1e-4, 1e-3])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowgen.flow import FlowSpec, build_flow
from flowgen.language import Program, load_program


@dataclass(frozen=True)
class OptFile:
    """A parsed and checked `.opt` file."""

    program: Program

    @property
    def name(self) -> str:
        return self.program.name

    def derive(self, *, require_central: bool = True, **hyper: float) -> FlowSpec:
        """Symbolic derivation at the given hyperparameters (``--set``)."""
        return build_flow(self.program, hyper, require_central=require_central)

    def spec(self, **hyper: float) -> FlowSpec:
        """What ``codegen`` and ``run`` use: the derived flow when the derivation succeeds,
        else the discrete step alone (``spec.has_flow`` is False and ``spec.flow_reason``
        says why). Never needs the derivation; bad hyperparameters raise ``UsageError``."""
        return build_flow(self.program, hyper, require_central=False, require_flow=False)

    def codegen(self, **hyper: float) -> str:
        """Source of the generated JAX module: the discrete step always, the flow parts
        when the derivation succeeds (the module's docstring says why they are absent)."""
        from flowgen.codegen import generate

        return generate(self.spec(**hyper))

    def optax_source(self, **hyper: float) -> str:
        """Source of the module defining ``transformation(**hyper)``, an optax
        ``GradientTransformation`` (``flowgen codegen --optax``); ``hyper`` become its
        defaults. Needs only the parsed rule, not the derivation."""
        from flowgen.codegen.optaxgen import generate_optax

        return generate_optax(self.program, hyper)

    def optax(self, **hyper: float):
        """The update rule as an ``optax.GradientTransformation`` on any pytree of
        parameters (imports JAX and optax): step counter in its state, jit-able,
        ``optax.chain``-able; ``sum``/``mean``/``norm`` span the whole pytree, and the
        update is the step ``w_new − w`` for ``optax.apply_updates``. Dtypes follow the
        gradients (float32 stays float32).

        >>> tx = flowgen.load("optimizers/adan.opt").optax(lr=1e-3)
        """
        from flowgen.codegen import load_module

        mod = load_module(self.optax_source(**hyper), f"{self.name}_optax")
        return mod.transformation()

    def optimizer(self, **hyper: float):
        """The runtime :class:`~flowgen.runtime.optimizer.Optimizer` (imports JAX)."""
        from flowgen.runtime.optimizer import Optimizer

        return Optimizer.from_spec(self.spec(**hyper))

    def run(
        self,
        problem="digits-mlp",
        steps: int = 1000,
        *,
        problem_options=None,
        eig_every: int = 5,
        chunk: int = 50,
        progress=None,
        out=None,
        resume: bool = False,
        **hyper: float,
    ):
        """Discrete optimizer and stable flow in lockstep; returns a ``RunResult``.

        With ``out``: checkpoints there after every chunk, ``resume=True`` continues
        from the checkpoint, and run.json, run.npz and run.png are written there."""
        from flowgen.runtime.run import RunConfig, run_stable

        prob = _problem(problem, problem_options)
        opt = self.optimizer(**hyper)
        cfg = RunConfig(steps=steps, eig_every=eig_every, chunk=chunk)
        store = _store(out, "run", opt, prob, cfg)
        res = run_stable(opt, prob, cfg, progress=progress, store=store, resume=resume)
        if out is not None:
            from flowgen.report.outputs import write_run

            write_run(res, Path(out), opt=opt)
        return res

    def validate(
        self,
        problem="digits-mlp",
        steps: int = 1000,
        *,
        restart_at=None,
        problem_options=None,
        substeps: int | None = None,
        chunk: int = 25,
        eig_every: int = 1,
        progress=None,
        out=None,
        resume: bool = False,
        refine_tol: float | None = None,
        check_expansion: bool = False,
        **hyper: float,
    ):
        """Discrete, central and stable processes compared (``flowgen validate``).

        ``refine_tol``: the central flow's step control (``CentralConfig.refine_tol``,
        default 0.02; 0 turns it off). ``check_expansion``: measure the flow's
        second-order average against the discrete run (``--check-expansion``).

        Returns a ``ValidationResult``; with ``out`` also checkpoints there after
        every chunk (``resume=True`` continues from it) and writes report.json,
        series.npz and validate.png there.
        """
        from flowgen.runtime.central import CentralConfig
        from flowgen.runtime.validate import ValidateConfig, validate

        prob = _problem(problem, problem_options)
        opt = self.optimizer(**hyper)
        cfg = ValidateConfig(
            steps=steps,
            restart_at=restart_at,
            chunk=chunk,
            eig_every=eig_every,
            central=CentralConfig.given(substeps=substeps, refine_tol=refine_tol),
            check_expansion=check_expansion,
        )
        store = _store(out, "validate", opt, prob, cfg)
        res = validate(opt, prob, cfg, progress=progress, store=store, resume=resume)
        if out is not None:
            from flowgen.report.outputs import write_validation

            write_validation(res, Path(out), opt=opt)
        return res

    def explain(
        self,
        problem="digits-mlp",
        steps: int = 600,
        *,
        restart_at=None,
        problem_options=None,
        substeps: int = 2,
        refine_tol: float | None = None,
        default_form: bool = True,
        stationary_flow: bool = False,
        stationary_from: int | None = None,
        stationary_substeps: int = 2,
        stationary_method: str = "auto",
        progress=None,
        out=None,
        resume: bool = False,
        **hyper: float,
    ):
        """Interpret the flow at step ``steps`` (``flowgen explain``): threshold, critical
        directions, implicit curvature penalty, the stationary preconditioner by relaxation
        and (where the derivation says the SDP applies) by SDP, compared with each other and
        with the discrete run. With ``stationary_flow=True`` also the stable flow and the
        stationary flows (exact and simplified) from the central flow's ``w̄`` at
        ``stationary_from`` (default: the central flow's start), side by side.

        ``refine_tol``: the central flow's step control, as for :meth:`validate`.

        Returns an ``Explanation``; with ``out`` also writes report.json, explain.npz and
        the PNG figures there.
        """
        from flowgen.runtime.explain import ExplainConfig, explain

        prob = _problem(problem, problem_options)
        opt = self.optimizer(**hyper)
        cfg = ExplainConfig(
            steps=steps,
            restart_at=restart_at,
            substeps=substeps,
            refine_tol=refine_tol,
            default_form=default_form,
            stationary_flow=stationary_flow,
            stationary_from=stationary_from,
            stationary_substeps=stationary_substeps,
            stationary_method=stationary_method,
        )
        store = _store(out, "explain", opt, prob, cfg)
        res = explain(opt, prob, cfg, progress=progress, store=store, resume=resume)
        if out is not None:
            from flowgen.report.explain import write_explain

            write_explain(res, Path(out), opt=opt)
        return res


def sweep(
    files,
    problem="digits-mlp",
    steps: int = 1000,
    *,
    problem_options=None,
    flows=("discrete",),
    eig_every: int = 10,
    chunk: int = 50,
    batch: str = "auto",
    substeps: int = 4,
    refine_tol: float | None = None,
    flow_start="auto",
    progress=None,
    out=None,
    resume: bool = False,
    **values,
):
    """Every file × every combination of hyperparameter values (``flowgen sweep``).

    ``values`` map a hyperparameter to a value or a list of values, e.g.
    ``flowgen.sweep(["optimizers/rmsprop.opt"], "digits-mlp", 600, lr=[1e-4, 1e-3],
    beta2=0.99)``. ``refine_tol``: the central flow's step control, as for
    ``OptFile.validate``. Returns a ``SweepResult`` (``.runs``: one dict per run, as in
    sweep.json); with ``out`` also checkpoints there, resumes with ``resume=True`` and
    writes sweep.json and sweep.png.
    """
    from flowgen.runtime.sweep import SweepConfig, parse_sweep_sets
    from flowgen.runtime.sweep import sweep as run_sweep

    if isinstance(files, str | Path | OptFile):
        files = [files]
    items = [
        f"{k}={','.join(repr(float(x)) for x in (v if isinstance(v, list | tuple) else [v]))}"
        for k, v in values.items()
    ]
    sets = parse_sweep_sets(items)
    flows = tuple(flows)
    if "discrete" not in flows:
        flows = ("discrete", *flows)
    cfg = SweepConfig(
        steps=steps,
        flows=flows,
        eig_every=eig_every,
        chunk=chunk,
        batch=batch,
        substeps=substeps,
        refine_tol=refine_tol,
        flow_start=flow_start,
    )
    prob = _problem(problem, problem_options)
    res = run_sweep(list(files), prob, sets, cfg, out=out, resume=resume, progress=progress)
    if out is not None:
        from flowgen.report.sweep import write_sweep

        write_sweep(res, Path(out))
    return res


def _problem(problem, options):
    """A :class:`Problem` from a name/spec (with options) or as given."""
    from flowgen.problems import Problem, get_problem

    return problem if isinstance(problem, Problem) else get_problem(problem, **(options or {}))


def _store(out, command: str, opt, problem, config):
    """The run's checkpoint store in ``out`` (None without ``out``)."""
    if out is None:
        return None
    from flowgen.runtime.checkpoint import CheckpointStore, run_identity

    return CheckpointStore(Path(out), run_identity(command, opt, problem, config))


def load(path: str | Path) -> OptFile:
    """Parse and check an `.opt` file (raises :class:`flowgen.errors.FlowgenError`)."""
    return OptFile(load_program(str(path)))
