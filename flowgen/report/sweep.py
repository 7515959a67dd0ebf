"""The ``flowgen sweep`` report: ``sweep.json``, a table in the terminal and the talk's figure.

* ``sweep.json`` — :meth:`~flowgen.runtime.sweep.SweepResult.to_json` plus provenance
  (fields in ``docs/outputs.md``);
* ``sweep.png`` — the talk's layout ("acceleration via regularization"): train loss,
  raw sharpness ``λ_max(H)`` and the harmonic mean of the effective step sizes
  ``n / Σ 1/p_i`` against the step, one colour per run (one line style per file).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from flowgen import __version__
from flowgen.report.outputs import _atomic_write, _plt


def _label(run: dict, multi_file: bool) -> str:
    vals = ", ".join(f"{k}={v:g}" for k, v in run["swept"].items())
    if multi_file:
        return f"{run['optimizer']} {vals}".strip()
    return vals or run["optimizer"]


def write_sweep(res, out: Path, *, command=None) -> list[Path]:
    """``sweep.json`` and ``sweep.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = res.to_json()
    data["provenance"] = {
        "flowgen_version": __version__,
        "command": list(command) if command else None,
        "python": platform.python_version(),
    }
    _atomic_write(out / "sweep.json", lambda fh: fh.write(json.dumps(data, indent=1)))
    return [out / "sweep.json", plot_sweep(res, out / "sweep.png")]


def plot_sweep(res, path: Path) -> Path:
    plt = _plt()
    runs = res.runs
    files = list(dict.fromkeys(r["file"] for r in runs))
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    cmap = plt.get_cmap("viridis" if len(runs) > 10 else "tab10")
    for i, run in enumerate(runs):
        colour = cmap(i / max(len(runs) - 1, 1)) if len(runs) > 10 else cmap(i % 10)
        ls = styles[files.index(run["file"]) % len(styles)]
        s = {k: np.array([np.nan if x is None else x for x in v]) for k, v in run["series"].items()}
        x = np.arange(len(s["loss"]))
        lab = _label(run, len(files) > 1)
        axes[0].plot(x, s["loss"], color=colour, ls=ls, lw=1, label=lab)
        m = np.isfinite(s["sharpness"])
        axes[1].plot(x[m], s["sharpness"][m], color=colour, ls=ls, lw=1.2, label=lab)
        m = np.isfinite(s["hmean"])
        axes[2].plot(x[m], s["hmean"][m], color=colour, ls=ls, lw=1.2, label=lab)
    axes[0].set_yscale("log")
    axes[0].set_title("train loss")
    axes[1].set_title(r"sharpness $\lambda_{\max}(H)$")
    axes[1].set_yscale("log")
    axes[2].set_title(r"harmonic mean of effective step sizes $n / \sum_i 1/p_i$")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sweep on {res.problem}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(x, fmt=".4g") -> str:
    return "—" if x is None or not np.isfinite(x) else format(x, fmt)


def sweep_summary(res, out: Path | None, console) -> None:
    """One row per run: the final values and the flows' distances."""
    from rich.table import Table

    multi = len({r["file"] for r in res.runs}) > 1
    tab = Table(title=f"sweep on {res.problem}, {res.config.steps} steps", title_justify="left")
    for col in (
        "run",
        "loss",
        "mean loss",
        "λ_max(H)",
        "λ_max(P⁻¹H)",
        "hmean p",
        "flows: dist/travelled",
    ):
        tab.add_column(col, justify="left" if col == "run" else "right")
    for r in res.runs:
        f = r["final"]
        fl = ", ".join(
            f"{k} {_f(v.get('distance_to_discrete_rel'), '.3f')}"
            for k, v in r.get("flows", {}).items()
            if "skipped" not in v
        )
        tab.add_row(
            _label(r, multi),
            _f(f["loss"]),
            _f(f["mean_loss"]),
            _f(f["sharpness"]),
            _f(f["effective_sharpness"]),
            _f(f["harmonic_mean_step"]),
            fl or "—",
        )
    console.print(tab)
    for b in res.batching:
        console.print(f"{b['file']}: {b['runs']} runs, {b['mode']} ({b['reason']})")
    if out is not None:
        console.print(f"wrote {Path(out) / 'sweep.json'} and {Path(out) / 'sweep.png'}")
