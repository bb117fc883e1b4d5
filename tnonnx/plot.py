"""Pictures of a rewrite report and of a bench comparison (PNG, matplotlib's Agg backend).

`plot_report(report.to_dict(), "rewrite.png")` draws, per layer of the report, the
parameters, MACs, times (when the report has any) and error before and after the
rewrite; `plot_bench(bench.compare(...), "bench.png")` the latency percentiles of the
two models. matplotlib is optional (`pip install 'tnonnx[plot]'`) and imported only here.
"""

from __future__ import annotations

import importlib
import math
import os
import tempfile
from pathlib import Path

from .errors import TnonnxError
from .model import _umask
from .report import _n, _speed

MISSING = "--plot needs matplotlib: pip install 'tnonnx[plot]'"

BEFORE = "#8c8c8c"  # the original, dense layer
AFTER = "#1f77b4"  # its replacement
WORSE = "#d62728"  # more parameters / MACs / time than before
OUTPUT_ERR = "#2ca02c"
WEIGHT_ERR = "#ff7f0e"
WIDTH = 0.4  # of one bar; a layer's pair takes 0.8 of its slot


def require_matplotlib() -> None:
    """Raise the TnonnxError of a missing matplotlib now, before a long rewrite or bench."""
    _figure_class()


def plot_report(report: dict, path) -> Path:
    """Write one PNG picturing a rewrite report (`RewriteReport.to_dict()`); returns its path."""
    Figure = _figure_class()
    layers = list(report.get("layers") or [])
    n = max(len(layers), 1)
    labels = _short_names([str(r.get("name", "?")) for r in layers])
    rewritten = [bool(r.get("format")) for r in layers]

    timed = any(r.get("ms_before") is not None or r.get("ms_after") is not None for r in layers)
    errors = [_error(r) for r in layers]
    has_errors = any(e is not None for e, _ in errors)
    panels = ["params", "macs"] + (["ms"] if timed else []) + (["error"] if has_errors else [])

    width = min(max(7.5, 1.5 + 0.42 * n), 60.0)
    fig = Figure(figsize=(width, 1.2 + 2.3 * len(panels) + _label_height(labels)), dpi=110,
                 layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    xs = list(range(len(layers)))

    for ax, panel in zip(axes, panels):
        if panel == "params":
            _pair(ax, xs, [r.get("params_before") for r in layers], [_after(r, "params_after") for r in layers],
                  rewritten, "parameters")
        elif panel == "macs":
            batch = report.get("batch")
            _pair(ax, xs, [r.get("macs_before") for r in layers], [_after(r, "macs_after") for r in layers],
                  rewritten, f"MACs (batch {batch})" if batch else "MACs")
        elif panel == "ms":
            _times(ax, xs, layers, rewritten, report.get("latency"))
        else:
            _errors(ax, xs, errors, rewritten)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
        ax.set_xlim(-0.6, max(len(layers) - 0.4, 0.6))

    bottom = axes[-1]
    bottom.set_xticks(xs)
    bottom.set_xticklabels(labels, rotation=45 if n <= 12 else 70, ha="right", rotation_mode="anchor",
                           fontsize=9 if n <= 30 else 7)
    for tick, done in zip(bottom.get_xticklabels(), rewritten):
        if not done:
            tick.set_color("#888888")
            tick.set_fontstyle("italic")
    if layers and not all(rewritten):
        bottom.set_xlabel("layer (grey italic: left dense)", fontsize=9)
    else:
        bottom.set_xlabel("layer", fontsize=9)
    fig.suptitle(_title(report, int(width * 11)), fontsize=10)
    return _save(fig, path)


def plot_bench(result: dict, path) -> Path:
    """Write one PNG of `tnonnx.bench.compare(...)`'s result: p50/p90/p99 of both models."""
    Figure = _figure_class()
    fig = Figure(figsize=(6.5, 4.0), dpi=110, layout="constrained")
    ax = fig.subplots()
    stats = (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))
    for i, (key, color) in enumerate((("reference", BEFORE), ("candidate", AFTER))):
        lat = result.get(key) or {}
        values = [_num(lat.get(k)) for _, k in stats]
        xs = [j + (i - 0.5) * WIDTH for j in range(len(stats))]
        runs = lat.get("runs")
        bars = ax.bar(xs, [0 if v is None else v for v in values], WIDTH, color=color,
                      label=f"{key}" + (f" ({runs} runs)" if runs else ""))
        ax.bar_label(bars, labels=["" if v is None else f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.set_xticks(range(len(stats)))
    ax.set_xticklabels([s for s, _ in stats])
    ax.set_ylabel("latency (ms)")
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left")
    speedup = _num(result.get("speedup"))
    where = [f"batch {result.get('batch')}"] if result.get("batch") is not None else []
    shapes = result.get("shapes") or {}
    if shapes:
        where.append(", ".join(f"{k} {'x'.join(str(d) for d in v)}" for k, v in shapes.items()))
    threads = result.get("threads")
    where.append(f"{threads} threads" if threads else "onnxruntime's default threads")
    if speedup is None:
        head = "speed-up (p50) -"
    else:
        head = f"speed-up (p50) {speedup:.2f}x: the candidate is " + (
            "faster" if speedup > 1 else "SLOWER" if speedup < 1 else "as fast")
    fig.suptitle(head + "\n" + _wrap("; ".join(where), 90), fontsize=10)
    return _save(fig, path)


# -- panels ---------------------------------------------------------------------------------------

def _pair(ax, xs, before, after, rewritten, ylabel):
    """Before/after bars side by side on a log scale, the reduction written above each pair."""
    before = [_pos(v) for v in before]
    after = [_pos(v) for v in after]
    ax.bar([x - WIDTH / 2 for x in xs], _zeros(before), WIDTH, color=BEFORE, label="before")
    colors = [WORSE if a is not None and b is not None and a > b else AFTER for a, b in zip(after, before)]
    ax.bar([x + WIDTH / 2 for x in xs], _zeros(after), WIDTH, color=colors, label="after")
    _log_scale(ax, before + after)
    for x, b, a, done in zip(xs, before, after, rewritten):
        if done and a is not None and b is not None and len(xs) <= 60:
            top = max(a, b)
            text = f"{b / a:.1f}x" if a <= b else f"{a / b:.1f}x more"
            ax.annotate(text, (x, top), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7, color=WORSE if a > b else "black")
        elif not done:
            _dense_mark(ax, x)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=8, loc="upper right", ncols=2, framealpha=0.8)


def _times(ax, xs, layers, rewritten, latency):
    """Per-layer time, before and after; hatched where the cost model predicted it."""
    measured_run = bool(latency and latency.get("measured"))
    before = [_pos(r.get("ms_before")) for r in layers]
    after = [_pos(_after(r, "ms_after")) for r in layers]
    after_measured = [bool(r.get("ms_measured")) for r in layers]
    for x, b, a, done, meas in zip(xs, before, after, rewritten, after_measured):
        if b is not None:
            ax.bar(x - WIDTH / 2, b, WIDTH, color=BEFORE, hatch=None if measured_run else "///",
                   edgecolor="white" if not measured_run else None, linewidth=0)
        if a is not None:
            color = WORSE if b is not None and a > b else AFTER
            ax.bar(x + WIDTH / 2, a, WIDTH, color=color, hatch=None if meas else "///", edgecolor="white",
                   linewidth=0)
            if b is not None and len(xs) <= 60:
                speed = b / a
                ax.annotate(f"{speed:.2f}x", (x, max(a, b)), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, color=WORSE if speed < 1 else "black")
        # the cost model's prediction beside a measured time
        predicted = _pos(layers[x].get("ms_predicted"))
        if meas and a is not None and predicted is not None:
            ax.plot([x + WIDTH / 2], [predicted], marker="_", markersize=10, markeredgewidth=2, color="black")
        if not done:
            _dense_mark(ax, x)
    _log_scale(ax, before + after)
    ax.set_ylabel("time (ms)", fontsize=9)
    _log_labels(ax, lambda v: f"{v:g}")
    from matplotlib.patches import Patch  # matplotlib is there: _figure_class succeeded
    from matplotlib.lines import Line2D
    handles = [Patch(color=BEFORE, label="before"), Patch(color=AFTER, label="after")]
    if not all(after_measured[i] for i, a in enumerate(after) if a is not None) or not measured_run:
        handles.append(Patch(facecolor="#cccccc", hatch="///", edgecolor="white", label="predicted (cost model)"))
    if any(m and a is not None and _pos(r.get("ms_predicted")) is not None
           for m, a, r in zip(after_measured, after, layers)):
        handles.append(Line2D([], [], marker="_", markersize=10, markeredgewidth=2, color="black", linestyle="",
                              label="cost model's prediction"))
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncols=len(handles), framealpha=0.8)


def _errors(ax, xs, errors, rewritten):
    """Relative error per layer (output error on calibration data where known, else weight error)."""
    positive = [v for v, _ in errors if v]
    floor = min(positive) / 10 if positive else 1e-3  # where an exact (zero) error is drawn
    for x, (value, kind), done in zip(xs, errors, rewritten):
        if value is None:
            if not done:
                _dense_mark(ax, x)
            continue
        ax.bar(x, max(value, floor), 2 * WIDTH * 0.7, color=OUTPUT_ERR if kind == "output" else WEIGHT_ERR)
        ax.annotate(f"{value:.2g}", (x, max(value, floor)), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    values = [max(v, floor) for v, _ in errors if v is not None] + [1.0]
    _log_limits(ax, min(values) / 2, max(values))
    _log_labels(ax, lambda v: f"{v:g}")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D
    kinds = {k for v, k in errors if v is not None}
    handles = [Patch(color=OUTPUT_ERR, label="output error (calibration data)")] if "output" in kinds else []
    handles += [Patch(color=WEIGHT_ERR, label="weight error")] if "weight" in kinds else []
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1, label="1: no better than zero"))
    ax.legend(handles=handles, fontsize=8, loc="upper right", ncols=len(handles), framealpha=0.8)
    ax.set_ylabel("relative error", fontsize=9)


def _dense_mark(ax, x):
    """'dense' in the empty slot of a layer left alone."""
    ax.text(x + WIDTH / 2, 0.04, "dense", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
            va="bottom", fontsize=7, color="#888888", fontstyle="italic")


def _log_labels(ax, fmt):
    """Plain numbers (1k, 0.01) on the decades of a log axis, no labels between them."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(_round(v))))
    low, high = ax.get_ylim()
    if low > 0 and math.log10(high / low) < 2:  # few decades in view: label 2x and 5x too
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _pos: fmt(float(f"{v:.1g}")) if f"{v:.1e}"[0] in "25" else ""))
        ax.tick_params(axis="y", which="minor", labelsize=8)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _round(v: float):
    """A decade as an int where it is one (1000, not 1000.0000001)."""
    return int(round(v)) if v >= 1 else float(f"{v:.1g}")


def _log_limits(ax, low: float, high: float, headroom: float = 0.4):
    """Log y limits from `low` to above `high`, leaving `headroom` of the decades shown free
    at the top for the legend and the labels above the bars."""
    lo, hi = math.log10(low), math.log10(high)
    span = max(hi - lo, 0.5)
    ax.set_ylim(10 ** lo, 10 ** (hi + span * headroom / (1 - headroom)))


def _log_scale(ax, values):
    present = [v for v in values if v is not None]
    ax.set_yscale("log")
    if present:
        _log_limits(ax, min(present) / 2, max(present))
    _log_labels(ax, _compact)


# -- text -----------------------------------------------------------------------------------------

def _title(report: dict, chars: int) -> str:
    t = report.get("totals") or {}
    layers = report.get("layers") or []
    done = sum(1 for r in layers if r.get("format"))
    rule = ", ".join(str(v) for v in (report.get("format"), report.get("rank_rule")) if v)
    fit = report.get("fit")
    if fit and fit != "data-free":
        rule += f", fit {fit}"
    lines = [f"tnonnx rewrite: {rule}: {done} of {len(layers)} layers rewritten" if rule
             else f"tnonnx rewrite: {done} of {len(layers)} layers rewritten"]
    pb, pa = t.get("params_before"), t.get("params_after")
    totals = [f"parameters {_n(pb)} → {_n(pa)} ({_ratio(pb, pa, 'smaller')})"]
    mb, ma = t.get("macs_before"), t.get("macs_after")
    if mb is not None and ma is not None:
        totals.append(f"MACs {_n(mb)} → {_n(ma)} ({_ratio(mb, ma, 'fewer')})")
    lines.append(", ".join(totals))
    sb, sa = _num(t.get("ms_before")), _num(t.get("ms_after"))
    latency = report.get("latency") or {}
    if sb is not None and sa is not None:
        how = "measured p50" if latency.get("measured") else "predicted by the cost model"
        line = f"latency {sb:.3f} ms → {sa:.3f} ms ({_speed(sb, sa)}, {how})"
        if latency.get("deployment"):
            line += f" at {latency['deployment']}"
        lines.append(_wrap(line, chars))
    elif latency.get("deployment"):
        lines.append(_wrap(f"at {latency['deployment']}", chars))
    return "\n".join(lines)


def _short_names(names: list[str]) -> list[str]:
    """Each name cut to its last path parts: as few as keep the names apart (at most all)."""
    parts = [[p for p in name.replace("\\", "/").split("/") if p] or [name] for name in names]
    keep = [min(2, len(p)) for p in parts]
    while True:
        short = ["/".join(p[-k:]) for p, k in zip(parts, keep)]
        seen: dict[str, list[int]] = {}
        for i, s in enumerate(short):
            seen.setdefault(s, []).append(i)
        clashes = [i for group in seen.values() if len(group) > 1 for i in group if keep[i] < len(parts[i])]
        if not clashes:
            break
        for i in clashes:
            keep[i] += 1
    return [s if len(s) <= 40 else "…" + s[-39:] for s in short]


def _label_height(labels: list[str]) -> float:
    longest = max((len(s) for s in labels), default=4)
    return min(0.07 * longest, 3.0)


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or text


def _compact(v) -> str:
    """An axis label: 100k, 1M, 2.5G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:g}"


def _ratio(before, after, word: str) -> str:
    if not before or not after:
        return "-"
    return f"{before / after:.2f}x {word}" if after <= before else f"{after / before:.2f}x more"


# -- values ---------------------------------------------------------------------------------------

def _error(row: dict) -> tuple[float | None, str]:
    if not row.get("format"):
        return None, ""
    for key, kind in (("output_error", "output"), ("weight_error", "weight")):
        v = _num(row.get(key))
        if v is not None:
            return max(v, 0.0), kind
    return None, ""


def _after(row: dict, key: str):
    """A layer left dense has no 'after' bar, whatever its row says."""
    return row.get(key) if row.get("format") else None


def _num(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pos(v) -> float | None:
    v = _num(v)
    return v if v is not None and v > 0 else None


def _zeros(values):
    """Bars for missing values are drawn at height 0, which a log axis leaves out."""
    return [0.0 if v is None else v for v in values]


# -- output ---------------------------------------------------------------------------------------

def _figure_class():
    try:
        from matplotlib.figure import Figure  # no pyplot: no display, no global backend switch
        importlib.import_module("matplotlib.backends.backend_agg")  # what Figure.savefig renders with
    except ImportError:
        raise TnonnxError(MISSING) from None
    return Figure


def _save(fig, path) -> Path:
    """Atomic write: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a picture is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
