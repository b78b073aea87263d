"""Figures for the A-LQR diagnostics: PNG + JSON + markdown table per figure.

Every function writes ``<name>.png`` (matplotlib, Agg canvas — no pyplot, no global backend
switch), ``<name>.json`` (the plotted numbers; non-finite values become ``null``) and
``<name>.md`` (a markdown table of the same numbers) into ``out_dir``, each atomically (temporary
file + rename), and returns the paths written. matplotlib is imported on first use.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steerlab.diagnostics.linearity import DiagnosticsError
from steerlab.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_alignment", "plot_linearity", "plot_setpoint", "plot_tracking_bound"]

Numbers = torch.Tensor | Sequence[float]


# ---------------------------------------------------------------- file helpers


_atomic = atomic_write


def _write_text(path: Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return _atomic(path, write)


def _clean(x: Any) -> Any:
    """JSON-safe copy: tensors to lists, non-finite floats to None, keys to str."""
    if isinstance(x, torch.Tensor):
        return _clean(x.detach().cpu().tolist())
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str | int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return _clean(float(x))


def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.4g}"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DiagnosticsError("plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _emit(
    out_dir: str | os.PathLike[str], name: str, fig: Figure, data: dict[str, Any], table: str
) -> list[Path]:
    out = Path(out_dir)
    png = _atomic(out / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    js = _write_text(
        out / f"{name}.json", json.dumps(_clean(data), indent=2, allow_nan=False) + "\n"
    )
    md = _write_text(out / f"{name}.md", table)
    return [png, js, md]


def _vec(x: Numbers, what: str) -> list[float]:
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if t.ndim != 1 or t.numel() == 0:
        raise DiagnosticsError(
            f"{what} must be a non-empty 1-D sequence, got shape {tuple(t.shape)}"
        )
    return [float(v) for v in t.to(torch.float64).tolist()]


def _slug(label: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")
    return s or "run"


# ---------------------------------------------------------------- linearity


def plot_linearity(
    residuals_by_layer: Mapping[int, Mapping[float, tuple[float, float]]],
    out_dir: str | os.PathLike[str],
    *,
    name: str = "linearity",
) -> list[Path]:
    """Relative Taylor residual vs. relative step size, one curve per layer (log–log).

    Input: ``{layer: linearity_residuals(...)}``. A dashed ``∝ ε`` guide shows the slope a
    smooth map's first-order residual should follow.
    """
    if not residuals_by_layer:
        raise DiagnosticsError("residuals_by_layer is empty")
    layers = sorted(residuals_by_layer)
    all_eps = sorted({float(e) for lay in layers for e in residuals_by_layer[lay]})
    fig = _new_figure()
    ax = fig.add_subplot()
    data: dict[str, Any] = {"kind": "linearity", "layers": {}}
    firsts: list[tuple[float, float]] = []
    for lay in layers:
        res = residuals_by_layer[lay]
        eps = sorted(float(e) for e in res)
        pairs = {float(e): v for e, v in res.items()}
        mean = [float(pairs[e][0]) for e in eps]
        std = [float(pairs[e][1]) for e in eps]
        # on a log axis a lower bar reaching ≤ 0 is off-scale: clip it at 90 % of the mean
        low = [min(s, 0.9 * m) if m > 0 else s for m, s in zip(mean, std, strict=True)]
        ax.errorbar(eps, mean, yerr=[low, std], marker="o", ms=3, capsize=2, label=f"layer {lay}")
        data["layers"][str(lay)] = [
            {"eps": e, "mean": m, "std": s} for e, m, s in zip(eps, mean, std, strict=True)
        ]
        finite = [(e, m) for e, m in zip(eps, mean, strict=True) if math.isfinite(m) and m > 0]
        if finite:
            firsts.append(finite[0])
    if firsts:
        e0, m0 = min(firsts)
        ax.plot(all_eps, [m0 * e / e0 for e in all_eps], "k--", lw=0.8, label="∝ ε")
    ax.set_xscale("log")
    if any(m > 0 for e, m in firsts):
        ax.set_yscale("log")
    ax.set_xlabel(r"relative step $\|\delta\| / \|z\|$")
    ax.set_ylabel(r"$\|f(z+\delta)-f(z)-A\delta\| \,/\, \|f(z+\delta)-f(z)\|$")
    ax.set_title("Local linearity of the blocks")
    ax.legend(fontsize="small", ncol=2)
    headers = ["layer", *(f"ε={e:g}" for e in all_eps)]
    rows = []
    for lay in layers:
        pairs = {float(e): v for e, v in residuals_by_layer[lay].items()}
        cells = [
            f"{_fmt(pairs[e][0])} ± {_fmt(pairs[e][1])}" if e in pairs else "" for e in all_eps
        ]
        rows.append([str(lay), *cells])
    table = "Relative linearisation residual (mean ± std over directions)\n\n"
    return _emit(out_dir, name, fig, data, table + _md_table(headers, rows))


# ---------------------------------------------------------------- alignment


def _score_stats(value: float | Numbers) -> tuple[float, float, int, torch.Tensor | None]:
    """(mean, std, count, matrix-or-None) for a score, a list of scores or an (n, n) matrix."""
    if isinstance(value, int | float):
        return float(value), 0.0, 1, None
    t = torch.as_tensor(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    t = t.to(torch.float64)
    matrix = None
    if t.ndim == 2 and t.shape[0] == t.shape[1] and t.shape[0] >= 2:
        matrix = t
        t = t[~torch.eye(t.shape[0], dtype=torch.bool)]
    elif t.ndim > 1:
        raise DiagnosticsError(f"alignment scores must be a number, 1-D or (n, n), got {t.shape}")
    t = t.flatten()
    if t.numel() == 0:
        raise DiagnosticsError("empty alignment scores")
    std = float(t.std(correction=1)) if t.numel() > 1 else 0.0
    return float(t.mean()), std, int(t.numel()), matrix


def plot_alignment(
    scores_by_layer: Mapping[int, float | Numbers],
    baseline_by_layer: Mapping[int, float] | float,
    out_dir: str | os.PathLike[str],
    *,
    name: str = "alignment",
) -> list[Path]:
    """Jacobian alignment ``sim_m`` per layer against the random baseline.

    ``scores_by_layer[k]`` is one score, a list of pairwise scores, or an ``alignment_matrix``
    ``(n, n)`` (its off-diagonal entries are used, and a heat-map figure ``<name>_matrices.png``
    is written too). ``baseline_by_layer`` is ``{layer: random_baseline(...)}`` or one number.
    """
    if not scores_by_layer:
        raise DiagnosticsError("scores_by_layer is empty")
    layers = sorted(scores_by_layer)
    stats = {lay: _score_stats(scores_by_layer[lay]) for lay in layers}
    if isinstance(baseline_by_layer, int | float):
        base = {lay: float(baseline_by_layer) for lay in layers}
    else:
        missing = [lay for lay in layers if lay not in baseline_by_layer]
        if missing:
            raise DiagnosticsError(f"baseline_by_layer lacks layer(s) {missing}")
        base = {lay: float(baseline_by_layer[lay]) for lay in layers}

    fig = _new_figure()
    ax = fig.add_subplot()
    means = [stats[lay][0] for lay in layers]
    stds = [stats[lay][1] for lay in layers]
    ax.errorbar(layers, means, yerr=stds, marker="o", capsize=3, label="Jacobian pairs")
    ax.plot(layers, [base[lay] for lay in layers], "k--", marker="x", label="random baseline")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\mathrm{sim}_m$")
    ax.set_title("Alignment of Jacobians across trajectories")
    ax.legend(fontsize="small")
    data = {
        "kind": "alignment",
        "layers": {
            str(lay): {
                "mean": stats[lay][0],
                "std": stats[lay][1],
                "n_pairs": stats[lay][2],
                "baseline": base[lay],
            }
            for lay in layers
        },
    }
    rows = [
        [str(lay), _fmt(stats[lay][0]), _fmt(stats[lay][1]), str(stats[lay][2]), _fmt(base[lay])]
        for lay in layers
    ]
    table = _md_table(["layer", "mean sim", "std", "pairs", "random baseline"], rows)
    paths = _emit(out_dir, name, fig, data, table)

    mats: list[tuple[int, torch.Tensor]] = []
    for lay in layers:
        mat = stats[lay][3]
        if mat is not None:
            mats.append((lay, mat))
    if mats:
        cols = min(4, len(mats))
        nrows = math.ceil(len(mats) / cols)
        hfig = _new_figure(3.0 * cols + 0.8, 2.8 * nrows)
        image = None
        for idx, (lay, mat) in enumerate(mats):
            hax = hfig.add_subplot(nrows, cols, idx + 1)
            image = hax.imshow(mat.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
            hax.set_title(f"layer {lay}", fontsize="small")
            hax.set_xticks([])
            hax.set_yticks([])
        if image is not None:
            hfig.colorbar(image, ax=hfig.axes, shrink=0.8)
        out = Path(out_dir) / f"{name}_matrices.png"
        paths.append(_atomic(out, lambda tmp: hfig.savefig(tmp, format="png", dpi=120)))
    return paths


# ---------------------------------------------------------------- tracking bound


def plot_tracking_bound(
    bound: Numbers,
    measured: Numbers,
    out_dir: str | os.PathLike[str],
    *,
    measured_mean: Numbers | None = None,
    normalised: bool = False,
    name: str = "tracking_bound",
) -> list[Path]:
    """Worst-case bound vs. measured error envelope per layer (``TrackingBound`` fields)."""
    b = _vec(bound, "bound")
    m = _vec(measured, "measured")
    mm = _vec(measured_mean, "measured_mean") if measured_mean is not None else None
    if len(b) != len(m) or (mm is not None and len(mm) != len(b)):
        raise DiagnosticsError("bound, measured (and measured_mean) need the same length")
    layers = list(range(len(b)))
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(layers, b, marker="o", label="bound (worst rollout)")
    ax.plot(layers, m, marker="s", label="measured (worst rollout)")
    if mm is not None:
        ax.plot(layers, mm, marker=".", ls=":", label="measured (mean)")
    positive = [v for v in (*b, *m) if math.isfinite(v)]
    if positive and min(positive) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("layer k")
    unit = r" / $\|\bar z_k\|_{P_k}$" if normalised else ""
    ax.set_ylabel(r"$\|\delta z_k\|_{P_k}$" + unit)
    ax.set_title("Tracking-error bound")
    ax.legend(fontsize="small")
    holds = [mv <= bv * (1 + 1e-9) + 1e-12 for mv, bv in zip(m, b, strict=True)]
    data: dict[str, Any] = {
        "kind": "tracking_bound",
        "normalised": normalised,
        "bound": b,
        "measured": m,
        "measured_mean": mm,
        "holds": holds,
        "holds_all": all(holds),
    }
    rows = [
        [
            str(k),
            _fmt(b[k]),
            _fmt(m[k]),
            _fmt(mm[k]) if mm is not None else "",
            "yes" if holds[k] else "NO",
        ]
        for k in layers
    ]
    table = _md_table(["layer", "bound", "measured (max)", "measured (mean)", "holds"], rows)
    return _emit(out_dir, name, fig, data, table)


# ---------------------------------------------------------------- setpoint


def plot_setpoint(
    projection: Numbers,
    target: Numbers,
    mu: Numbers,
    out_dir: str | os.PathLike[str],
    label: str,
    *,
    band: float = 0.1,
) -> list[Path]:
    """Feature strength ``v_kᵀ z_k`` vs. the LFS target ``β*_k`` per layer, with ``±band·μ_k``.

    Files are ``setpoint_<label>.*`` (label made filename-safe).
    """
    p = _vec(projection, "projection")
    t = _vec(target, "target")
    u = _vec(mu, "mu")
    if not len(p) == len(t) == len(u):
        raise DiagnosticsError(
            f"projection, target and mu need the same length, got {len(p)}, {len(t)}, {len(u)}"
        )
    if not math.isfinite(band) or band < 0:
        raise DiagnosticsError(f"band must be a non-negative number, got {band!r}")
    layers = list(range(len(p)))
    lo = [ti - band * abs(mi) for ti, mi in zip(t, u, strict=True)]
    hi = [ti + band * abs(mi) for ti, mi in zip(t, u, strict=True)]
    inside = [lo[k] <= p[k] <= hi[k] for k in layers]
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.fill_between(layers, lo, hi, alpha=0.25, label=rf"$\beta^*_k \pm {band:g}\,\mu_k$")
    ax.plot(layers, t, "k--", label=r"target $\beta^*_k$")
    ax.plot(layers, p, marker="o", ms=3, label=r"$v_k^\top z_k$")
    ax.set_xlabel("layer k")
    ax.set_ylabel("feature strength")
    ax.set_title(f"Linear feature setpoint: {label}")
    ax.legend(fontsize="small")
    data: dict[str, Any] = {
        "kind": "setpoint",
        "label": label,
        "band": band,
        "projection": p,
        "target": t,
        "mu": u,
        "within_band": inside,
        "fraction_within_band": sum(inside) / len(inside),
    }
    rows = [
        [str(k), _fmt(p[k]), _fmt(t[k]), _fmt(u[k]), "yes" if inside[k] else "no"] for k in layers
    ]
    table = f"Setpoint tracking — {label} (within {sum(inside)}/{len(inside)} layers)\n\n"
    table += _md_table(["layer", "vᵀz", "β*", "μ", f"within ±{band:g}μ"], rows)
    return _emit(out_dir, f"setpoint_{_slug(label)}", fig, data, table)


# ---------------------------------------------------------------- barrier (ODESteer)


def plot_barrier_path(
    h: torch.Tensor,
    T: float,
    out_dir: str | os.PathLike[str],
    *,
    name: str = "barrier_path",
    label: str = "",
) -> list[Path]:
    """ODESteer's barrier h(a(t)) along the integration path (ODESteer paper, figure 2).

    ``h``: ``(n, steps + 1)`` barrier values of n activations at t = 0, T/steps, …, T. Plots
    the mean with its 10–90 % band and a few individual paths; the table lists the mean, min
    and max per step and the share of paths where h never decreases.
    """
    if h.ndim != 2 or h.shape[1] < 2 or h.shape[0] == 0:
        raise DiagnosticsError(f"h must be (n, steps + 1) with steps >= 1, got {tuple(h.shape)}")
    hd = h.detach().to(torch.float64).cpu()
    steps = hd.shape[1] - 1
    ts = [T * i / steps for i in range(steps + 1)]
    mean = hd.mean(0).tolist()
    lo = hd.quantile(0.1, dim=0).tolist()
    hi = hd.quantile(0.9, dim=0).tolist()
    monotone = (hd[:, 1:] >= hd[:, :-1] - 1e-6).all(dim=1)
    fig = _new_figure()
    ax = fig.add_subplot()
    for row in hd[: min(8, hd.shape[0])]:
        ax.plot(ts, row.tolist(), color="0.7", lw=0.8)
    ax.fill_between(ts, lo, hi, alpha=0.25, label="10–90 %")
    ax.plot(ts, mean, marker="o", ms=3, label="mean h(a(t))")
    ax.axhline(0.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("integration time t")
    ax.set_ylabel("barrier h = log p+/p-")
    ax.set_title(f"Barrier along the ODESteer path {label}".strip())
    ax.legend(fontsize="small")
    data: dict[str, Any] = {
        "kind": "barrier_path",
        "T": T,
        "steps": steps,
        "t": ts,
        "mean": mean,
        "q10": lo,
        "q90": hi,
        "min": hd.min(0).values.tolist(),
        "max": hd.max(0).values.tolist(),
        "fraction_non_decreasing": float(monotone.double().mean()),
        "n": int(hd.shape[0]),
    }
    rows = [[_fmt(t), _fmt(m), _fmt(a), _fmt(b)] for t, m, a, b in
            zip(ts, mean, data["min"], data["max"], strict=True)]
    table = (f"Barrier along the path ({hd.shape[0]} activations; h never decreases on "
             f"{100 * data['fraction_non_decreasing']:.1f} %)\n\n")
    table += _md_table(["t", "mean h", "min h", "max h"], rows)
    return _emit(out_dir, name, fig, data, table)
