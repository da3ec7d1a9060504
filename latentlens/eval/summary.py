"""What an evaluation says: % interpretable per method and visual layer, with a 95% interval.

The interval is Wilson's score interval for a binomial proportion: it stays
inside [0, 100] and behaves at 0% and 100% and for small counts, where the
normal approximation does not. It treats patches as independent draws;
patches of one image are not quite (they share the image), so with few
images read it as a lower bound on the uncertainty.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from latentlens.errors import InputError

Z95 = 1.959963984540054
COLUMNS = ("method", "visual_layer", "judged", "interpretable", "pct", "ci_low", "ci_high")


@dataclass
class SummaryRow:
    method: str
    visual_layer: int
    judged: int
    interpretable: int
    pct: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials, as percentages."""
    if n <= 0:
        return (0.0, 100.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (100 * max(0.0, centre - half), 100 * min(1.0, centre + half))


def summarize(counts: Sequence[tuple[str, int, int, int]], methods: Sequence[str] | None = None) -> list[SummaryRow]:
    """Rows from (method, visual_layer, judged, interpretable), methods in run order then by layer."""
    order = {m: i for i, m in enumerate(methods or [])}
    rows = []
    for method, layer, n, k in counts:
        lo, hi = wilson(k, n)
        rows.append(SummaryRow(method, int(layer), int(n), int(k), round(100 * k / n, 2) if n else 0.0,
                               round(lo, 2), round(hi, 2)))
    return sorted(rows, key=lambda r: (order.get(r.method, len(order)), r.method, r.visual_layer))


def write_csv(rows: Sequence[SummaryRow], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow(r.to_dict())
    return path


PLOT_FORMATS = ("png", "pdf", "svg")


def judge_label(judge: str, settings: dict | None) -> str:
    """The judge as a figure names it: its model when it has one (never the run's hash)."""
    settings = settings or {}
    if settings.get("model"):
        return str(settings["model"])
    if settings.get("annotations"):
        return f"{judge} ({Path(str(settings['annotations'])).name})"
    return judge


def figure_text(model: str, judge: str, judge_settings: dict | None, n_images: int, n_patches: int,
                run: str = "") -> tuple[str, str]:
    """(title, caption) of a summary figure: what was judged by whom, and how much of it."""
    title = f"{model}, judged by {judge_label(judge, judge_settings)}"
    caption = (f"n = {n_images} image{'s' if n_images != 1 else ''}, {n_patches} "
               f"patch{'es' if n_patches != 1 else ''} (each judged per method and visual layer); "
               "shaded: 95% Wilson interval" + (f"; run {run}" if run else ""))
    return title, caption


def write_plot(rows: Sequence[SummaryRow], path: str | Path, *, title: str = "", caption: str = "",
               fmt: str = "png") -> Path:
    """% interpretable vs visual layer, one line per method, its 95% interval shaded and in the legend.

    ``fmt``: png, pdf or svg (vector formats for a paper); ``caption`` goes under the axes.
    """
    if fmt not in PLOT_FORMATS:
        raise InputError(f"unknown figure format '{fmt}' (use {', '.join(PLOT_FORMATS)})")
    try:
        import matplotlib
    except ImportError:
        raise InputError("the summary plot needs matplotlib: pip install 'latentlens-db[eval]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch as Swatch

    fig, ax = plt.subplots(figsize=(7, 4.6 if caption else 4.2), dpi=150)
    try:
        # a marker and dash per method: equal percentages must not hide a line behind another
        styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
        for i, method in enumerate(dict.fromkeys(r.method for r in rows)):
            rs = [r for r in rows if r.method == method]
            xs = [r.visual_layer for r in rs]
            marker, dash = styles[i % len(styles)]
            line, = ax.plot(xs, [r.pct for r in rs], marker=marker, linestyle=dash, label=method,
                            markersize=7 - 1.5 * (i % 3))
            ax.fill_between(xs, [r.ci_low for r in rs], [r.ci_high for r in rs], alpha=0.15,
                            color=line.get_color(), linewidth=0)
        ax.set_xlabel("visual layer (0 = projector output)")
        ax.set_ylabel("% interpretable patches")
        ax.set_ylim(0, 100)
        layers = sorted({r.visual_layer for r in rows})
        if layers and len(layers) <= 20:
            ax.set_xticks(layers)
        ax.grid(True, alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        handles.append(Swatch(facecolor="0.5", alpha=0.3, linewidth=0))
        labels.append("95% interval (Wilson)")
        ax.legend(handles, labels, loc="best", fontsize=8)
        if title:
            ax.set_title(title, fontsize=10)
        if caption:
            fig.text(0.5, 0.01, caption, ha="center", va="bottom", fontsize=7.5, color="0.3", wrap=True)
            fig.tight_layout(rect=(0, 0.05, 1, 1))
        else:
            fig.tight_layout()
        fig.savefig(path, format=fmt)
    finally:
        plt.close(fig)
    return Path(path)


def write_jsonl(records: Sequence[dict], path: str | Path) -> Path:
    """Verdicts as JSON lines, written to a temp file then renamed (never half a file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e}") from None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
    return path
