"""Files written next to every run: JSON (series + exact configuration), NPZ
arrays, PNG figures, and the provenance of the run (source hash, version, command)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np

from flowgen import __version__


def provenance(opt, command) -> dict:
    spec = opt.spec
    return {
        "flowgen_version": __version__,
        "source": spec.path,
        "sha256": spec.sha256,
        "hyper": dict(spec.hyper),
        "command": list(command) if command else None,
        "python": platform.python_version(),
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_run(res, out: Path, *, opt, command=None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = res.to_json()
    data["provenance"] = provenance(opt, command)
    (out / "run.json").write_text(json.dumps(data, indent=1))
    np.savez(out / "run.npz", **res.series, **{f"w_final_{k}": v for k, v in res.w_final.items()})
    (out / "optimizer.py").write_text(opt.source)
    return [out / "run.json", out / "run.npz", *plot_run(res, out)]


def plot_run(res, out: Path) -> list[Path]:
    plt = _plt()
    s = res.series
    x = s["step"]
    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(x, s["loss_discrete"], lw=1, color="C0", label="discrete")
    ax.plot(x, s["loss_stable"], lw=1.5, color="C2", ls="--", label="stable flow")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    m = np.isfinite(s["sharpness_discrete"])
    ax.plot(x[m], s["sharpness_discrete"][m], lw=1, color="C0", label="discrete")
    m2 = np.isfinite(s["sharpness_stable"])
    ax.plot(x[m2], s["sharpness_stable"][m2], lw=1.5, color="C2", ls="--", label="stable flow")
    if res.threshold is not None:
        ax.axhline(res.threshold, color="k", ls=":", label=f"threshold c = {res.threshold:g}")
    ax.set_xlabel("step")
    ax.set_title(r"effective sharpness $\lambda_{\max}(P^{-1}H)$")
    ax.legend()
    ax = axes[2]
    ax.plot(x, s["distance"], color="C2", label="‖discrete − stable‖")
    ax.plot(x, s["distance_travelled"], color="0.5", ls=":", label="‖discrete − start‖")
    ax.set_xlabel("step")
    ax.set_title("distance")
    ax.legend()
    fig.suptitle(f"{res.optimizer} on {res.problem}")
    fig.tight_layout()
    path = out / "run.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files


def run_summary(res, out: Path, console) -> None:
    from rich.table import Table

    s = res.series
    last = int(np.nanmax(s["step"]))
    tab = Table(title=f"flowgen run: {res.optimizer} on {res.problem} ({last} steps)",
                title_justify="left")
    tab.add_column("")
    tab.add_column("discrete", justify="right")
    tab.add_column("stable flow", justify="right")

    def f(x):
        return "—" if x is None or not np.isfinite(x) else f"{x:.4g}"

    def lastf(key):
        v = s[key]
        v = v[np.isfinite(v)]
        return v[-1] if len(v) else None

    tab.add_row("final loss", f(lastf("loss_discrete")), f(lastf("loss_stable")))
    tab.add_row("final grad norm", f(lastf("grad_norm_discrete")), f(lastf("grad_norm_stable")))
    tab.add_row("final eff. sharpness", f(lastf("sharpness_discrete")), f(lastf("sharpness_stable")))
    tab.add_row("max eff. sharpness", f(np.nanmax(s["sharpness_discrete"])),
                f(np.nanmax(s["sharpness_stable"])))
    console.print(tab)
    d, trav = lastf("distance"), lastf("distance_travelled")
    rel = d / trav if d is not None and trav else None
    thr = "—" if res.threshold is None else f"{res.threshold:g}"
    console.print(
        f"threshold c = {thr};  ‖discrete − stable‖ = {f(d)} ({f(rel)} of the distance travelled);  "
        f"time: discrete {res.timings.get('discrete_s', 0):.1f}s, stable flow "
        f"{res.timings.get('stable_s', 0):.1f}s, sharpness {res.timings.get('sharpness_s', 0):.1f}s"
    )
    console.print(f"wrote {out}/run.json, run.npz, run.png, optimizer.py")
