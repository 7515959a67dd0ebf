"""Files written next to every run: JSON (series + exact configuration), NPZ
arrays, PNG figures, and the provenance of the run (source hash, version, command)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flowgen import __version__


def provenance(opt, command, devices=None) -> dict:
    spec = opt.spec
    out = {
        "flowgen_version": __version__,
        "source": spec.path,
        "sha256": spec.sha256,
        "hyper": dict(spec.hyper),
        "command": list(command) if command else None,
        "python": platform.python_version(),
    }
    try:
        import jax

        out["devices"] = list(devices) if devices else [str(d) for d in jax.devices()[:1]]
        out["jax_version"] = jax.__version__
    except Exception:  # noqa: BLE001 - provenance is best effort
        pass
    return out


def _atomic_write(path: Path, write: Callable[[object], None], binary: bool = False) -> None:
    """Write through a temporary file renamed into place (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb" if binary else "w") as fh:
        write(fh)
    os.replace(tmp, path)


def write_outputs(
    out: Path,
    *,
    opt,
    command,
    json_name: str,
    data: dict,
    npz_name: str,
    arrays: dict[str, np.ndarray],
    figures: list[Callable[[Path], Path | None]] = (),
    devices: list[str] | None = None,
) -> list[Path]:
    """The one writer of a command's outputs: ``json_name`` (``data`` + provenance),
    ``npz_name`` (``arrays``), the generated ``optimizer.py`` and the figures
    (each ``figure(out)`` returns the path it wrote, or None)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(data)
    data["provenance"] = provenance(opt, command, devices)
    _atomic_write(out / json_name, lambda fh: fh.write(json.dumps(data, indent=1)))
    _atomic_write(out / npz_name, lambda fh: np.savez(fh, **arrays), binary=True)
    (out / "optimizer.py").write_text(opt.source)
    files = [out / json_name, out / npz_name]
    for fig in figures:
        path = fig(out)
        if path is not None:
            files.append(path)
    return files


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_run(res, out: Path, *, opt, command=None) -> list[Path]:
    arrays = {**res.series, **{f"w_final_{k}": v for k, v in res.w_final.items()}}
    return write_outputs(
        out,
        opt=opt,
        command=command,
        json_name="run.json",
        data=res.to_json(),
        npz_name="run.npz",
        arrays=arrays,
        figures=[lambda o: plot_run(res, o)[0]],
        devices=getattr(res, "devices", None),
    )


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
    tab = Table(
        title=f"flowgen run: {res.optimizer} on {res.problem} ({last} steps)", title_justify="left"
    )
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
    tab.add_row(
        "final eff. sharpness", f(lastf("sharpness_discrete")), f(lastf("sharpness_stable"))
    )
    tab.add_row(
        "max eff. sharpness",
        f(np.nanmax(s["sharpness_discrete"])),
        f(np.nanmax(s["sharpness_stable"])),
    )
    console.print(tab)
    d, trav = lastf("distance"), lastf("distance_travelled")
    rel = d / trav if d is not None and trav else None
    thr = "—" if res.threshold is None else f"{res.threshold:g}"
    console.print(
        f"threshold c = {thr};  ‖discrete − stable‖ = {f(d)} "
        f"({f(rel)} of the distance travelled);  "
        f"time: discrete {res.timings.get('discrete_s', 0):.1f}s, stable flow "
        f"{res.timings.get('stable_s', 0):.1f}s, sharpness {res.timings.get('sharpness_s', 0):.1f}s"
    )
    console.print(f"wrote {out}/run.json, run.npz, run.png, optimizer.py")


# ------------------------------------------------------------------ validate


def write_validation(res, out: Path, *, opt, command=None) -> list[Path]:
    return write_outputs(
        out,
        opt=opt,
        command=command,
        json_name="report.json",
        data=res.to_json(),
        npz_name="series.npz",
        arrays=res.series,
        figures=[lambda o: plot_validation(res, o / "validate.png")],
        devices=getattr(res, "devices", None),
    )


def plot_validation(res, path: Path) -> Path:
    """The paper's kind of figure: loss, effective sharpness, distances, Σ."""
    plt = _plt()
    s = res.series
    x = s["step"]
    c = res.threshold
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    ax.plot(x, s["loss_discrete"], color="C0", lw=0.6, alpha=0.6, label="discrete")
    ax.plot(x, s["loss_discrete_window"], color="C0", lw=1.5, label="discrete, 21-step mean")
    ax.plot(
        x,
        s["loss_pred"],
        color="C3",
        lw=1.5,
        ls="--",
        label=r"central: $L(\bar w)+\frac{1}{2}\langle H,\Sigma\rangle$",
    )
    ax.plot(x, s["loss_central"], color="C3", lw=0.8, ls=":", label=r"central: $L(\bar w)$")
    ax.plot(x, s["loss_stable"], color="C2", lw=1.2, ls="-.", label="stable flow")
    ax.set_yscale("log")
    ax.set_title("loss")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for key, col, lab, lw in (
        ("sharpness_discrete", "C0", "discrete", 0.7),
        ("sharpness_central", "C3", "central", 1.5),
        ("sharpness_stable", "C2", "stable", 1.2),
    ):
        m = np.isfinite(s[key])
        ax.plot(x[m], s[key][m], color=col, lw=lw, label=lab)
    ax.axhline(c, color="k", ls=":", label=f"threshold c = {c:g}")
    ax.set_title(r"effective sharpness $\lambda_{\max}(P^{-1}H)$")
    top = np.nanmax([np.nanmax(s["sharpness_discrete"]), c * 1.2])
    ax.set_ylim(0, min(top, 3 * c))
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(x, s["distance_central"], color="C3", label="‖discrete − central‖")
    ax.plot(x, s["distance_stable"], color="C2", label="‖discrete − stable‖")
    ax.plot(x, s["distance_travelled"], color="0.5", ls=":", label="‖discrete − start‖")
    if res.restart_at is not None:
        for a in axes.flat:
            a.axvline(res.restart_at, color="0.7", lw=0.8)
    ax.set_title("distance to the discrete run")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    err = s.get("expansion_error")
    if err is not None and np.isfinite(err).any():  # --check-expansion
        from flowgen.runtime.validate import EXPANSION_LIMIT

        m = np.isfinite(err)
        tw = ax.twinx()
        tw.plot(x[m], 100 * err[m], "x", color="C4", label="2nd-order average error")
        tw.axhline(100 * EXPANSION_LIMIT, color="C4", lw=0.6, ls=":")
        tw.set_ylabel("error of the flow's 2nd-order average (%)", color="C4")
        tw.set_ylim(bottom=0, top=max(2 * 100 * EXPANSION_LIMIT, 1.1 * 100 * np.max(err[m])))
        tw.legend(fontsize=8, loc="upper left")
    ax = axes[1, 1]
    from flowgen.runtime.validate import centred_window

    ax.plot(
        x,
        s["sigma_meas"],
        color="C0",
        lw=0.5,
        alpha=0.5,
        label=r"measured $\langle \delta, u_1\rangle_P^2$",
    )
    ax.plot(
        x, centred_window(s["sigma_meas"], 21), color="C0", lw=1.5, label="measured, 21-step mean"
    )
    ax.plot(x, s["sigma_pred"], color="C3", lw=1.5, ls="--", label=r"central flow $X_{11}$")
    ax.set_title(r"oscillation along the top critical direction ($\Sigma$)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    sm = res.summary
    fig.suptitle(
        f"{res.optimizer} on {res.problem}: central {sm['central_distance_rel']:.3f} vs stable "
        f"{sm['stable_distance_rel']:.3f} of the distance travelled — {sm['verdict']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def validation_summary(res, out: Path, console) -> None:
    from rich.table import Table

    sm = res.summary
    tab = Table(title=f"flowgen validate: {res.optimizer} on {res.problem}", title_justify="left")
    tab.add_column("quantity")
    tab.add_column("value", justify="right")
    tab.add_column("criterion")
    tab.add_row("threshold c", f"{res.threshold:g}", "λ_max(P⁻¹H) equilibrates here")
    tab.add_row("edge of stability reached at step", str(res.eos_start), "sharpness ≥ 0.95·c")
    tab.add_row(
        "flows start at step",
        str(res.start),
        "restart" if res.restart_at is not None else "common start",
    )
    tab.add_row(
        "central distance / travelled",
        f"{sm['central_distance_rel']:.4f}",
        f"≤ {sm['criteria']['central_distance_rel_max']}",
    )
    tab.add_row(
        "stable distance / travelled",
        f"{sm['stable_distance_rel']:.4f}",
        f"≥ {sm['criteria']['stable_over_central_min']} × central",
    )
    tab.add_row(
        "loss prediction rel. error",
        f"{sm['loss_pred_rel_err']:.4f}",
        f"≤ {sm['criteria']['loss_pred_rel_err_max']}",
    )
    tab.add_row("sharpness rel. error (median)", f"{sm['sharpness_rel_err']:.4f}", "")
    tab.add_row("stable flow max sharpness", f"{sm['stable_sharpness_max']:.4g}", "")
    med = sm.get("expansion_error_median")
    if med is not None:
        from flowgen.runtime.validate import EXPANSION_LIMIT

        tab.add_row(
            "2nd-order average error (median / max)",
            f"{med:.4f} / {sm['expansion_error_max']:.4f}",
            f"≤ {EXPANSION_LIMIT}: the expansion holds",
        )
    colour = {"pass": "green", "fail": "red", "no-eos": "yellow"}[sm["verdict"]]
    tab.add_row("verdict", f"[bold {colour}]{sm['verdict']}[/]", "")
    console.print(tab)
    if med is not None and sm["verdict"] == "fail":
        if not sm.get("expansion_holds", med <= EXPANSION_LIMIT):
            console.print(
                f"the gradient's time average over the run's oscillation is not its "
                f"second-order expansion (median error {med:.0%}): the central flow, a "
                "second-order theory, cannot follow this run (docs/mathematics.md §5)"
            )
        else:
            console.print(
                f"the second-order expansion holds (median error {med:.1%}): what the flow "
                "misses is the oscillation's own dynamics (Σ) or its integration"
            )
    t = res.timings
    split = t.get("central_split", {})
    tot = sum(split.values()) or 1.0
    console.print(
        f"time: discrete {t.get('discrete_s', 0):.1f}s "
        f"(+ sharpness {t.get('discrete_sharpness_s', 0):.1f}s), "
        f"central {t.get('central_s', 0):.1f}s ({t.get('central_per_step_s', 0):.3f}s/step: "
        + ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in split.items())
        + f"), stable {t.get('stable_s', 0):.1f}s"
    )
    console.print(f"wrote {out}/report.json, series.npz, validate.png, optimizer.py")
