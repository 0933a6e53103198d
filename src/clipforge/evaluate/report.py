"""Markdown reports (report.md + results.json) and matplotlib PNG plots for evaluation results.

matplotlib is imported inside the plot functions only, so `import clipforge` stays fast and matplotlib
stays optional. Figures are built with `matplotlib.figure.Figure` on an Agg canvas, never through
pyplot: no global figure registry to leak into, and a caller's interactive backend is left alone.
"""
from __future__ import annotations

import json
import math
import numbers
import shutil
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from clipforge.errors import EvaluationError
from clipforge.io import json_safe, write_atomic

DPI = 100
# 20 distinct colours: the demo's robustness plot has 13 methods (the data ablation adds CLIPs), and a
# repeated colour made two of them indistinguishable.
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
          "tab:olive", "tab:cyan", "black", "gold", "navy", "lime", "teal", "magenta", "maroon", "darkkhaki",
          "slateblue", "salmon")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _scalar(value: Any) -> Any:
    """Python scalar from a 0-d tensor / numpy scalar; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str) -> str:
    value = _scalar(value)
    if value is None:
        return ""
    if _is_number(value) and not isinstance(value, numbers.Integral):
        text = format(float(value), floatfmt)
    else:
        text = str(value)
    # A raw pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".3f") -> str:
    """GitHub-flavoured Markdown table of `rows` (numeric columns right-aligned, missing cells empty)."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    numeric = [all(_is_number(_scalar(row.get(c))) for row in rows if _scalar(row.get(c)) is not None)
               and any(row.get(c) is not None for row in rows) for c in columns]
    lines = ["| " + " | ".join(_cell(c, floatfmt) for c in columns) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(c), floatfmt) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One report section: a heading, free Markdown text, an optional table and optional images."""

    title: str
    text: str = ""
    rows: list[dict] | None = None
    columns: list[str] | None = None
    images: list[Path] = field(default_factory=list)


def _image_link(image: Path, out_dir: Path) -> str:
    """Path of `image` relative to out_dir, copying it in when it lives elsewhere (a self-contained report)."""
    image = Path(image)
    if not image.is_absolute() and not image.exists() and (out_dir / image).exists():
        return image.as_posix()
    source = image.resolve()
    try:
        return source.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        pass
    if not source.exists():
        warnings.warn(f"report image {image} not found; linking it by name", stacklevel=3)
        return image.name
    shutil.copy2(source, out_dir / image.name)
    return image.name


def write_report(out_dir: Path, title: str, sections: list[Section], results: dict) -> Path:
    """Write out_dir/report.md and out_dir/results.json (both atomically); returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        if section.text:
            parts.append(section.text.strip())
        if section.rows:
            parts.append(markdown_table(section.rows, section.columns))
        for image in section.images:
            alt = Path(image).stem.replace("_", " ").replace("-", " ")
            # Percent-encoded: a space or parenthesis in a file name would end the Markdown link.
            parts.append(f"![{alt}]({quote(_image_link(Path(image), out_dir))})")
    report = out_dir / "report.md"
    write_atomic(report, "\n\n".join(parts) + "\n")
    write_atomic(out_dir / "results.json", json.dumps(json_safe(results), indent=2, default=str) + "\n")
    return report


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _short(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_robustness(points: list[dict], path: Path, title: str = "Effective robustness: OOD vs ID accuracy") -> Path:
    """Scatter of OOD vs ID accuracy, colour = method (`name`), marker = `domain`, with the y = x line."""
    if not points:
        raise EvaluationError("no points to plot")
    from matplotlib.lines import Line2D

    fig = _figure(6.5, 6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, zorder=1)
    names = list(dict.fromkeys(str(p["name"]) for p in points))
    domains = list(dict.fromkeys(str(p.get("domain", "")) for p in points))
    for p in points:
        ax.scatter(float(p["id_acc"]), float(p["ood_acc"]), s=60, zorder=3, edgecolors="black", linewidths=0.5,
                   color=COLORS[names.index(str(p["name"])) % len(COLORS)],
                   marker=MARKERS[domains.index(str(p.get("domain", ""))) % len(MARKERS)])
    methods = [Line2D([], [], ls="", marker="o", color=COLORS[i % len(COLORS)], label=n) for i, n in enumerate(names)]
    legend = ax.legend(handles=methods + [Line2D([], [], ls="--", color="gray", label="y = x")],
                       title="method", loc="upper left", fontsize=9)
    if len(domains) > 1:  # a second legend for the markers: the first must be re-added to survive
        ax.add_artist(legend)
        ax.legend(handles=[Line2D([], [], ls="", marker=MARKERS[i % len(MARKERS)], color="black", label=d)
                           for i, d in enumerate(domains)], title="OOD domain", loc="lower right", fontsize=9)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="in-distribution accuracy", ylabel="out-of-distribution accuracy",
           title=title, aspect="equal")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(groups: dict[str, dict[str, float]], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bar chart: one cluster per outer key, one coloured bar per inner key (series)."""
    if not groups:
        raise EvaluationError("no groups to plot")
    series = list(dict.fromkeys(key for values in groups.values() for key in values))
    fig = _figure(max(6.0, 1.0 + 0.5 * len(groups) * len(series)), 4.5)
    ax = fig.subplots()
    width = 0.8 / len(series)
    values = [float(_scalar(v)) for g in groups.values() for v in g.values() if v is not None]
    for i, name in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ys = [math.nan if g.get(name) is None else float(_scalar(g[name])) for g in groups.values()]
        bars = ax.bar(xs, ys, width, label=name, color=COLORS[i % len(COLORS)])
        if len(groups) * len(series) <= 40:
            ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=1)
    slanted = max(map(len, groups)) > 12  # long names would overlap their neighbours
    ax.set_xticks(range(len(groups)), [_short(g, 20) for g in groups],
                  rotation=30 if slanted else 0, ha="right" if slanted else "center")
    if values and all(0 <= v <= 1 for v in values if math.isfinite(v)):
        ax.set_ylim(0, 1.08)  # room for the value labels over a 1.0 bar
    ax.set(title=title, ylabel=ylabel)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=9)
    return _save(fig, path)


def plot_confusion(matrix: Any, classnames: Sequence[str], path: Path, max_classes: int = 30,
                   title: str = "Confusion matrix") -> Path:
    """Row-normalised heat map (row = true class); only the `max_classes` most frequent true classes if more."""
    import numpy as np

    matrix = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(classnames):
        raise EvaluationError(f"need a square [C, C] matrix for {len(classnames)} classes, got {matrix.shape}")
    total = len(classnames)
    keep = np.arange(total)
    if total > max_classes:
        # Stable sort: ties keep class order, so the picked classes do not depend on the sort algorithm.
        keep = np.sort(np.argsort(-matrix.sum(axis=1), kind="stable")[:max_classes])
        title = f"{title} (top {max_classes} of {total} classes by frequency)"
    sub = matrix[np.ix_(keep, keep)]
    rates = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1)
    n = len(keep)
    side = max(5.0, 2.5 + 0.28 * n)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")
    names = [_short(str(classnames[i]), 22) for i in keep]
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    if n <= 15:  # counts stay legible only on small matrices
        for (i, j), count in np.ndenumerate(sub):
            if count:
                ax.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set(title=title, xlabel="predicted class", ylabel="true class")
    return _save(fig, path)


def _read_metrics(path: Path) -> dict[str, dict[float, float]]:
    """{key: {step: value}} of numeric fields; the last record for a step wins (a resumed run re-logs)."""
    series: dict[str, dict[float, float]] = defaultdict(dict)
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run still writing may leave a partial last line
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            continue
        for key, value in record.items():
            if key != "step" and _is_number(value) and math.isfinite(value):
                series[key][record["step"]] = float(value)
    return series


def plot_training_curves(metrics_jsonl: Path | list[Path], path: Path, labels: list[str] | None = None) -> Path:
    """Loss vs step (training line, `val_loss` markers) plus a panel of the other `val_*` metrics, per run."""
    files = [Path(metrics_jsonl)] if isinstance(metrics_jsonl, (str, Path)) else [Path(p) for p in metrics_jsonl]
    if labels is not None and len(labels) != len(files):
        raise EvaluationError(f"{len(labels)} labels for {len(files)} runs")
    labels = labels or [f.parent.name or f.name for f in files]
    runs = [_read_metrics(f) for f in files]
    if not any(run.get("loss") for run in runs):
        raise EvaluationError(f"no 'loss' records in {[str(f) for f in files]}")
    # val_loss shares the training loss's scale; R@1 / accuracies (0-1) get their own panel.
    val_keys = list(dict.fromkeys(k for run in runs for k in run
                                  if k.startswith("val_") and k not in ("val_loss", "val_pairs")))
    fig = _figure(11 if val_keys else 6.5, 4.5)
    axes = fig.subplots(1, 2 if val_keys else 1, squeeze=False)[0]
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = COLORS[i % len(COLORS)]
        steps = sorted(run.get("loss", {}))
        axes[0].plot(steps, [run["loss"][s] for s in steps], color=color, lw=1.2, label=f"{label}: train")
        if run.get("val_loss"):
            axes[0].plot(*zip(*sorted(run["val_loss"].items())), color=color, ls="--", marker="o", lw=1,
                         label=f"{label}: val")
        for j, key in enumerate(val_keys):
            points = sorted(run.get(key, {}).items())
            if points:
                axes[1].plot(*zip(*points), color=color, marker=MARKERS[j % len(MARKERS)], lw=1,
                             ls=("-", "--", ":", "-.")[j % 4], label=f"{label}: {key[4:]}")
    axes[0].set(title="loss", xlabel="step", ylabel="loss")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    if val_keys:
        axes[1].set(title="validation", xlabel="step", ylabel="value")
        axes[1].legend(fontsize=8)
        axes[1].grid(alpha=0.3)
    return _save(fig, path)


def plot_examples(images: list[Any], titles: list[str], predictions: list[list[tuple[str, float]]], path: Path,
                  cols: int = 4, title_prefix: str = "true") -> Path:
    """Grid of images, each titled with its true label over its top-3 predictions (the correct one green)."""
    if not images or not (len(images) == len(titles) == len(predictions)):
        raise EvaluationError(f"need equally many images, titles and predictions, got "
                         f"{len(images)}, {len(titles)}, {len(predictions)}")
    from clipforge.data.images import load_image

    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    # Fixed cell geometry (inches) instead of a layout engine: the prediction lines hang below each
    # image, outside the axes, where constrained layout does not reserve room for them.
    cell_w, cell_h, side, below = 2.8, 3.4, 2.2, 0.75
    fig = _figure(cell_w * cols, cell_h * rows, layout=None)
    for index, (image, title, preds) in enumerate(zip(images, titles, predictions)):
        row, col = divmod(index, cols)
        ax = fig.add_axes(((col * cell_w + (cell_w - side) / 2) / fig.get_figwidth(),
                           ((rows - 1 - row) * cell_h + below) / fig.get_figheight(),
                           side / fig.get_figwidth(), side / fig.get_figheight()))
        ax.axis("off")
        # RGBA over a white figure: transparent emoji backgrounds show as white, as in the eval pixels.
        ax.imshow(load_image(image).convert("RGBA"))
        ax.set_title(f"{title_prefix}: {_short(str(title), 28)}", fontsize=9, fontweight="bold")
        for k, (label, score) in enumerate(list(preds)[:3]):
            correct = str(label) == str(title)
            ax.annotate(f"{k + 1}. {_short(str(label), 24)}  {float(score):.2f}", (0.5, 0), xycoords="axes fraction",
                        xytext=(0, -6 - 13 * k), textcoords="offset points", ha="center", va="top", fontsize=8,
                        color="green" if correct else "dimgray", fontweight="bold" if correct else "normal")
    return _save(fig, path)


def plot_trend(trends: dict[str, Any], models: dict[str, dict[str, tuple[float, float]]], path: Path,
               title: str) -> Path:
    """One panel per shifted style: baseline points and their logit trend (`evaluate.trend.Trend`), each
    model's (in-distribution, shifted) point, and y = x."""
    fig = _figure(5 * len(trends), 4.6)
    axes = fig.subplots(1, len(trends), squeeze=False)[0]
    for ax, (style, trend) in zip(axes, trends.items()):
        values = [v for p in trend.points for v in p] + [v for by in models.values() for v in by.get(style, ())]
        top = min(1.0, max(values) * 1.15)
        xs = [top * i / 100 for i in range(1, 100)]
        ax.plot(xs, xs, color="0.7", ls=":", lw=1, label="y = x")
        ax.plot(xs, [trend.predict(x) for x in xs], color="0.3", lw=1.2, label="supervised trend (logit fit)")
        ax.scatter(*zip(*trend.points), color="0.3", marker="x", s=30, label="supervised models")
        for i, (name, by_style) in enumerate(models.items()):
            if style in by_style:
                ax.scatter(*by_style[style], color=COLORS[i % len(COLORS)], marker=MARKERS[i % len(MARKERS)], s=60,
                           label=name, zorder=3)
        ax.set(title=f"{title}: {style}", xlabel="in-distribution top-1", ylabel=f"{style} top-1", xlim=(0, top),
               ylim=(0, top))
        ax.legend(fontsize=7)
    return _save(fig, path)
