"""The central flow across architectures: GD, RMSProp and Adam on every built-in network.

    python examples/architectures.py                       # the whole grid
    python examples/architectures.py --arch cnn vit --opt rmsprop
    python examples/architectures.py --table-only          # table and figure from saved runs

Every run is ``flowgen validate optimizers/OPT.opt --problem ARCH --restart-at auto``
with the steps and hyperparameters the problem registry suggests
(``flowgen problems --json``: ``suggested``; chosen so that the optimizer reaches
the edge of stability on the problem's defaults). Runs are checkpointed in
``--runs`` (default ``runs/architectures/<arch>-<opt>``): a killed grid resumes
where it stopped, and a finished run is not redone.

Writes to ``examples/figures/architectures/``:

* ``grid.png`` — one column per architecture, one row pair per optimizer: the loss
  (discrete, its 21-step mean, the central flow's prediction, the stable flow) and
  the effective sharpness λ_max(P⁻¹H) of the three processes against the threshold;
* ``table.md`` — parameters, eos_start, central and stable distance (relative to
  the distance the discrete run travelled after the restart), loss error, verdict
  and wall time per architecture × optimizer (the README's table);
* ``table.json`` — the same, plus every run's summary and timings.

Adam is an optimizer the reference code of the paper has no central flow for;
flowgen derives it (threshold 38/η for β₁ = 0.9). Each run takes one to a few
minutes on 2 CPU cores; the grid about an hour.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import flowgen
from flowgen.problems import REGISTRY, get_problem

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURES = HERE / "figures" / "architectures"
ARCHITECTURES = ("mlp", "cnn", "resnet", "vit", "lstm", "transformer", "mamba")
OPTIMIZERS = ("gd", "rmsprop", "adam")
EIG_EVERY = 5  # the discrete run's effective sharpness every 5 steps (it finds the edge)


def setting(arch: str, opt: str) -> tuple[int, dict] | None:
    """``(steps, hyperparameters)`` the registry suggests, or None."""
    sug = REGISTRY[arch].suggested
    if opt not in sug:
        return None
    steps = int(sug.get("steps_" + opt, sug["steps"]))
    return steps, dict(sug[opt])


def run_one(arch: str, opt: str, runs: Path) -> dict | None:
    """Validate one pair (resuming its checkpoint); the row of the table."""
    s = setting(arch, opt)
    if s is None:
        print(f"{arch} × {opt}: no suggested hyperparameters in the registry, skipped")
        return None
    steps, hyper = s
    out = runs / f"{arch}-{opt}"
    report = out / "report.json"
    if report.exists():  # finished earlier
        return row_from_report(arch, opt, json.loads(report.read_text()))
    f = flowgen.load(ROOT / "optimizers" / f"{opt}.opt")
    tic = time.perf_counter()
    resume = (out / "checkpoint.npz").exists()
    f.validate(
        arch, steps=steps, restart_at="auto", eig_every=EIG_EVERY, out=out, resume=resume, **hyper
    )
    print(f"{arch} × {opt}: {time.perf_counter() - tic:.0f} s")
    return row_from_report(arch, opt, json.loads(report.read_text()))


def _thin(x, every: int = 1) -> list:
    return [None if v is None or not np.isfinite(v) else float(v) for v in x[::every]]


def row_from_report(arch: str, opt: str, rep: dict) -> dict:
    sm = rep["summary"]
    ser = rep["series"]
    tm = rep.get("timings", {})
    hyper = setting(arch, opt)[1] if setting(arch, opt) else {}
    return {
        "architecture": arch,
        "optimizer": opt,
        "hyper": hyper,
        "steps": rep["config"]["steps"],
        "substeps": rep["config"]["central"]["substeps"],
        # after the step control's refinements (older reports: as configured)
        "substeps_final": tm.get("central_substeps") or rep["config"]["central"]["substeps"],
        "refinements": tm.get("central_counters", {}).get("refinements", 0),
        "coarsenings": tm.get("central_counters", {}).get("coarsenings", 0),
        "params": get_problem(arch).n,
        "threshold": rep["threshold"],
        "eos_start": rep["eos_start"],
        "restart_at": rep["restart_at"],
        "central_distance_rel": sm["central_distance_rel"],
        "stable_distance_rel": sm["stable_distance_rel"],
        "loss_pred_rel_err": sm["loss_pred_rel_err"],
        "verdict": sm["verdict"],
        "wall_s": tm.get("total_s")
        or sum(
            tm.get(k, 0.0) for k in ("discrete_s", "discrete_sharpness_s", "central_s", "stable_s")
        ),
        "timings": tm,
        # for the grid figure (every step; a few thousand numbers per run)
        "series": {
            k: _thin(np.asarray([np.nan if v is None else v for v in ser[k]], float))
            for k in (
                "loss_discrete",
                "loss_discrete_window",
                "loss_pred",
                "loss_stable",
                "sharpness_discrete",
                "sharpness_central",
                "sharpness_stable",
            )
            if k in ser
        },
    }


def table_md(rows: list[dict]) -> str:
    head = (
        "| architecture | optimizer | hyperparameters | params | eos_start | restart "
        "| central dist. | stable dist. | loss err. | verdict | wall | substeps |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n"
    )
    lines = []
    for r in rows:
        hyper = ", ".join(f"{k} {v:g}" for k, v in r["hyper"].items())
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] else "—"  # on shared cores
        substeps, final = r.get("substeps", ""), r.get("substeps_final")
        refined, coarsened = r.get("refinements", 0), r.get("coarsenings", 0)
        if final and final != substeps:  # refined by the step control
            substeps = f"{substeps} → {final}"
        elif refined:  # refined, then coarsened back
            substeps = f"{substeps} (refined {refined}×, coarsened {coarsened}×)"
        lines.append(
            f"| {r['architecture']} | {r['optimizer']} | {hyper} | {r['params']:,} "
            f"| {r['eos_start']} | {r['restart_at']} | {r['central_distance_rel']:.3f} "
            f"| {r['stable_distance_rel']:.3f} | {100 * r['loss_pred_rel_err']:.1f} % "
            f"| {r['verdict']} | {wall} | {substeps} |"
        )
    return head + "\n".join(lines) + "\n"


def grid_figure(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = [a for a in ARCHITECTURES if any(r["architecture"] == a for r in rows)]
    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in rows)]
    fig, axes = plt.subplots(
        2 * len(opts), len(archs), figsize=(2.6 * len(archs), 2.1 * 2 * len(opts)), squeeze=False
    )
    by = {(r["architecture"], r["optimizer"]): r for r in rows}
    for j, a in enumerate(archs):
        for i, o in enumerate(opts):
            axl, axs = axes[2 * i, j], axes[2 * i + 1, j]
            r = by.get((a, o))
            if r is None:
                axl.set_axis_off()
                axs.set_axis_off()
                continue
            s = {k: np.asarray([np.nan if v is None else v for v in x], float)
                 for k, x in r["series"].items()}  # fmt: skip
            x = np.arange(len(s["loss_discrete"]))
            lo = r["restart_at"] or 0
            sel = x >= max(lo - 50, 0)
            axl.plot(x[sel], s["loss_discrete"][sel], color="C0", lw=0.4, alpha=0.5)
            axl.plot(x[sel], s["loss_discrete_window"][sel], color="C0", lw=1.2)
            axl.plot(x[sel], s["loss_pred"][sel], color="C3", lw=1.2, ls="--")
            axl.plot(x[sel], s["loss_stable"][sel], color="C2", lw=1.0, ls="-.")
            axl.set_yscale("log")
            axl.set_title(f"{a} · {o} · {r['verdict']}", fontsize=8)
            axl.tick_params(labelsize=6)
            c = r["threshold"]
            for key, col, lw in (
                ("sharpness_discrete", "C0", 0.6),
                ("sharpness_central", "C3", 1.2),
                ("sharpness_stable", "C2", 1.0),
            ):
                m = np.isfinite(s[key]) & sel
                axs.plot(x[m], s[key][m] / c, color=col, lw=lw)
            axs.axhline(1.0, color="k", ls=":", lw=0.8)
            axs.set_ylim(0, 2.5)
            axs.tick_params(labelsize=6)
            if j == 0:
                axl.set_ylabel("loss", fontsize=7)
                axs.set_ylabel(r"$\lambda_{\max}(P^{-1}H)/c$", fontsize=7)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="C0", lw=1.2, label="discrete (21-step mean)"),
        Line2D([], [], color="C3", lw=1.2, ls="--", label="central flow"),
        Line2D([], [], color="C2", lw=1.0, ls="-.", label="stable flow"),
    ]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    ap.add_argument("--opt", nargs="*", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "architectures"))
    ap.add_argument("--table-only", action="store_true", help="no new runs")
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    FIGURES.mkdir(parents=True, exist_ok=True)
    table = FIGURES / "table.json"
    old = {(r["architecture"], r["optimizer"]): r for r in json.loads(table.read_text())} if (
        table.exists()
    ) else {}  # fmt: skip
    for a in args.arch:
        for o in args.opt:
            if args.table_only:
                rep = runs / f"{a}-{o}" / "report.json"
                row = row_from_report(a, o, json.loads(rep.read_text())) if rep.exists() else None
            else:
                row = run_one(a, o, runs)
            if row is not None:
                old[(a, o)] = row
    rows = [old[k] for k in sorted(old, key=lambda k: (OPTIMIZERS.index(k[1]),
                                                       ARCHITECTURES.index(k[0])))]  # fmt: skip
    table.write_text(json.dumps(rows, indent=1) + "\n")
    (FIGURES / "table.md").write_text(table_md(rows))
    grid_figure(rows, FIGURES / "grid.png")
    print(table_md(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
