"""Figures of an evaluation (confusion matrix, reliability diagram, misclassified grid) and the run report: one
self-contained HTML file (every image embedded as base64, no external resource) and a Markdown twin.

    resnetkit report runs/demo            # writes runs/demo/report.html and runs/demo/report.md

The report shows the recipe and resolved config, the training curves and learning-rate schedule (curves.png and
metrics.jsonl written by training), the final metrics with the per-class table, the confusion matrix, the
reliability diagram, the misclassified grid, the environment and the wall time. It evaluates best.pt first
(into RUN_DIR/eval/) unless eval/eval.json is already there.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DPI = 100
MANY_CLASSES = 30  # beyond this, the confusion matrix drops per-cell numbers and most tick labels


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def confusion_figsize(num_classes: int) -> tuple[float, float]:
    """Inches: grows with the class count up to 30 classes (room for names), fixed at 10 x 9 beyond."""
    if num_classes > MANY_CLASSES:
        return 10.0, 9.0
    side = min(max(5.0, 0.42 * num_classes + 3.0), 15.6)
    return side + 1.0, side


def write_confusion_csv(confusion: list[list[int]], classes: list[str], path: str | Path) -> Path:
    """Counts: one row per true class, one column per predicted class, class names as headers."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        for name, row in zip(classes, confusion):
            writer.writerow([name, *row])
    return path


def plot_confusion_matrix(confusion: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (each row: where a true class's samples went), classes sorted by recall,
    best first, so the weak classes and their confusions gather at the bottom right. Up to 30 classes every cell
    shows its percentage and every class is named; beyond, the matrix is drawn as an image with sparse ticks."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=np.float64)
    num_classes = len(classes)
    support = counts.sum(1, keepdims=True)
    normalised = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    recall = normalised.diagonal()
    order = np.argsort(-recall, kind="stable")
    matrix = normalised[order][:, order]
    names = [classes[i] for i in order]

    from matplotlib.colors import Normalize, PowerNorm

    fig, ax = plt.subplots(figsize=confusion_figsize(num_classes), layout="constrained")
    # With many classes most mass sits in small off-diagonal fractions: a square-root scale makes them visible.
    norm = PowerNorm(0.5, vmin=0, vmax=1) if num_classes > MANY_CLASSES else Normalize(vmin=0, vmax=1)
    image = ax.imshow(matrix, cmap="Blues", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    if num_classes <= MANY_CLASSES:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(ticks, names)
        fontsize = 9 if num_classes <= 12 else 7 if num_classes <= 20 else 5.5
        for i in range(num_classes):
            for j in range(num_classes):
                value = matrix[i, j]
                if value > 0 or i == j:  # a cell under half a percent reads "<1", not a misleading "0"
                    percent = int(value * 100 + 0.5)  # half up: 1 of 200 is "1", not Python's "0"
                    text = "<1" if percent == 0 and value > 0 else str(percent)
                    color = "white" if value > 0.5 else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    else:
        step = int(np.ceil(num_classes / 20))  # ~20 position ticks, so a cell can be found by its rank
        ticks = np.arange(0, num_classes, step)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("predicted class (rank by recall)")
        ax.set_ylabel("true class (rank by recall)")
    if num_classes <= MANY_CLASSES:
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
    scale = " (square-root colour scale)" if num_classes > MANY_CLASSES else ""
    ax.set_title(f"{title}\n" * bool(title) + f"row-normalised %, classes sorted by recall{scale}", fontsize=10)
    return _save(fig, path)


def plot_reliability(calibration: list[dict[str, Any]], ece: float, path: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin (a perfectly calibrated model lies on the
    diagonal), the gap shaded, and below it how many samples fall in each bin."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.0), height_ratios=(3, 1), sharex=True, layout="constrained")
    lower = np.array([b["lower"] for b in calibration])
    width = np.array([b["upper"] - b["lower"] for b in calibration])
    count = np.array([b["count"] for b in calibration])
    filled = count > 0
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in calibration])
    confidence = np.array([b["confidence"] if b["count"] else 0.0 for b in calibration])
    top.bar(
        lower[filled],
        accuracy[filled],
        width=width[filled],
        align="edge",
        color="tab:blue",
        edgecolor="black",
        linewidth=0.5,
        label="accuracy",
    )
    gap_bottom = np.minimum(accuracy, confidence)[filled]
    top.bar(
        lower[filled],
        np.abs(confidence - accuracy)[filled],
        bottom=gap_bottom,
        width=width[filled],
        align="edge",
        color="tab:red",
        alpha=0.35,
        edgecolor="tab:red",
        hatch="//",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram: ECE {ece * 100:.2f}%")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(lower, count, width=width, align="edge", color="gray", edgecolor="black", linewidth=0.5)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("samples")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def misclassified_figsize(count: int) -> tuple[float, float]:
    if count == 0:
        return 5.0, 1.6  # room for the title and the "no misclassified images" note
    cols = min(5, max(count, 1))
    rows = max(1, int(np.ceil(count / cols)))
    return 2.1 * cols, 2.45 * rows


def plot_misclassified(images: torch.Tensor, labels: list[tuple[str, str, float]], path: str | Path) -> Path:
    """A grid (5 per row) of the most confidently misclassified images, each titled with its true class and the
    predicted class with its probability. images: uint8 (N, 3, H, W); labels: (true, predicted, confidence)."""
    plt = _pyplot()
    count = len(labels)
    cols = min(5, max(count, 1))
    rows = max(1, int(np.ceil(count / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=misclassified_figsize(count), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    if count == 0:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=11)
    for ax, image, (true, predicted, confidence) in zip(axes.flat, images, labels):
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest" if image.shape[-1] < 96 else "antialiased")
        ax.set_title(
            f"true: {_short(true)}\npred: {_short(predicted)} ({confidence:.0%})", fontsize=9, color="firebrick"
        )
    fig.suptitle("most confidently misclassified", fontsize=11)
    return _save(fig, path)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# The run report


def _cpu_name() -> str:
    try:  # Linux: the model name lscpu shows; platform.processor() is often empty or just the architecture
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment() -> dict[str, str]:
    """Versions and the device of this process (the one writing the report and running the evaluation)."""
    import torchvision

    from resnetkit import __version__

    env = {
        "resnetkit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["gpu"] = "none"
    return env


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON row ({e.msg})") from None
    return rows


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s" if h else f"{rem // 60}m {rem % 60:02d}s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def gather_run(run_dir: str | Path, evaluate_if_missing: bool = True, **eval_kwargs) -> dict[str, Any]:
    """Everything the report shows, read from the run folder (and evaluating best.pt when eval/ is missing)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    checkpoint = run / "best.pt" if (run / "best.pt").is_file() else run / "last.pt"
    eval_dir = run / "eval"
    if not (eval_dir / "eval.json").is_file():
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{run} holds neither eval/eval.json nor best.pt / last.pt to evaluate")
        if not evaluate_if_missing:
            raise FileNotFoundError(
                f"{eval_dir / 'eval.json'} not found: run `resnetkit eval --checkpoint "
                f"{checkpoint} --out {eval_dir}` first"
            )
        from resnetkit.evaluate import evaluate

        evaluate(checkpoint, out_dir=eval_dir, **eval_kwargs)
    try:
        result = json.loads((eval_dir / "eval.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{eval_dir / 'eval.json'}: not valid JSON ({e.msg})") from None
    rows = _read_rows(run / "metrics.jsonl")
    curves = run / "curves.png"
    if rows and not curves.is_file():
        from resnetkit.train.monitor import plot_curves

        plot_curves(rows, eval_dir / "curves.png", title=run.name)
        curves = eval_dir / "curves.png"
    config_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else None
    train_seconds = sum(float(r.get("epoch_time_s", 0.0)) for r in rows)
    figures = {
        "curves": curves if curves.is_file() else None,
        "confusion": eval_dir / "confusion_matrix.png",
        "reliability": eval_dir / "reliability.png",
        "misclassified": eval_dir / "misclassified.png",
    }
    return {
        "name": run.name,
        "run_dir": str(run),
        "config_text": config_text,
        "recipe": _recipe(config_text),
        "rows": rows,
        "eval": result,
        "figures": {k: v for k, v in figures.items() if v is not None and v.is_file()},
        "train_seconds": train_seconds,
        "environment": environment(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _recipe(config_text: str | None) -> list[tuple[str, str]]:
    """The few config fields that say what was trained how, as (label, value) rows."""
    if not config_text:
        return []
    import yaml

    try:
        cfg = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        return []

    def fields(section: str, *keys: str) -> str:
        values = cfg.get(section) or {}
        return " ".join(f"{k.replace('_', ' ')} {values[k]}" for k in keys if values.get(k) not in (None, {}, []))

    def named(section: str, *keys: str) -> str:
        name = (cfg.get(section) or {}).get("name")
        return f"{name} {fields(section, *keys)}" if name else ""

    rows = [
        ("model", named("model", "options", "weights")),
        ("data", named("data", "preset", "batch_size", "augment")),
        ("optimiser", named("optim", "lr", "momentum", "weight_decay")),
        ("schedule", named("schedule", "warmup")),
        ("training", fields("train", "epochs", "label_smoothing", "ema", "amp")),
        ("seed", str(cfg.get("seed", ""))),
    ]
    return [(k, v.strip()) for k, v in rows if v.strip()]


def _summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("samples", f"{result['num_samples']:,}"),
        ("top-1 accuracy", _pct(result["top1"])),
        ("top-5 accuracy", _pct(result["top5"])),
        ("mean cross-entropy", f"{result['loss']:.4f}"),
        ("precision (macro / weighted)", f"{_pct(result['precision_macro'])} / {_pct(result['precision_weighted'])}"),
        ("recall (macro / weighted)", f"{_pct(result['recall_macro'])} / {_pct(result['recall_weighted'])}"),
        ("F1 (macro / weighted)", f"{_pct(result['f1_macro'])} / {_pct(result['f1_weighted'])}"),
        ("expected calibration error", _pct(result["ece"])),
    ]


def _last_epoch_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    if not rows:
        return []
    last = rows[-1]
    keys = [k for k in last if k not in ("epoch", "step") and isinstance(last[k], (int, float))]
    return [("epoch", str(last.get("epoch")))] + [(k, f"{last[k]:.4g}") for k in keys]


def write_report(run_dir: str | Path, out: str | Path | None = None, **gather_kwargs) -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md into `out` (default: the run folder); returns both paths."""
    info = gather_run(run_dir, **gather_kwargs)
    out_dir = Path(out) if out else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    html_path.write_text(render_html(info))
    md_path.write_text(render_markdown(info, md_path.parent))
    return html_path, md_path


def _table_html(rows: list[tuple[str, str]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{head}{body}</table>"


def _per_class_html(per_class: list[dict[str, Any]]) -> str:
    head = "<tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
    body = "".join(
        f"<tr><td>{html.escape(r['class'])}</td><td>{_pct(r['precision'])}</td><td>{_pct(r['recall'])}</td>"
        f"<td>{_pct(r['f1'])}</td><td>{r['support']}</td></tr>"
        for r in per_class
    )
    return f"<table>{head}{body}</table>"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; } th { background: #f5f5f5; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: .4em 0; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: 13px; }
.muted { color: #777; font-size: 13px; }
"""


def render_html(info: dict[str, Any]) -> str:
    """The report as one HTML document: inline CSS, images as data: URIs, no scripts, no links out."""
    r = info["eval"]
    fig = info["figures"]
    esc = html.escape

    def image(key: str, alt: str) -> str:
        return f'<img alt="{esc(alt)}" src="{_data_uri(fig[key])}">' if key in fig else "<p class=muted>(missing)</p>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>resnetkit report: {esc(info['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: {esc(info['name'])}</h1>",
        f"<p class=muted>{esc(info['run_dir'])} &middot; written {esc(info['written'])}</p>",
        "<h2>Recipe</h2>",
        _table_html(info["recipe"]) if info["recipe"] else "<p class=muted>no config.yaml in the run folder</p>",
    ]
    if info["config_text"]:
        parts.append(
            f"<details><summary>resolved config (config.yaml)</summary><pre>{esc(info['config_text'])}</pre></details>"
        )
    parts += [
        "<h2>Training curves and learning-rate schedule</h2>",
        image("curves", "training curves") if "curves" in fig else "<p class=muted>no curves.png</p>",
    ]
    if info["rows"]:
        parts.append("<p>Last epoch:</p>" + _table_html(_last_epoch_rows(info["rows"])))
    where = f"{r['data']} / {r['split']}" + (f", test-time augmentation: {r['tta']}" if r.get("tta") else "")
    parts += [
        "<h2>Final metrics</h2>",
        f"<p>{esc(r.get('checkpoint') or r['model'])} on {esc(where)}</p>",
        _table_html(_summary_rows(r), ("metric", "value")),
        "<h3>Per class</h3>",
        _per_class_html(r["per_class"]),
    ]
    if r.get("top_confusions"):
        rows = [(f"{c['true']} → {c['predicted']}", str(c["count"])) for c in r["top_confusions"]]
        parts += ["<h3>Most frequent confusions</h3>", _table_html(rows, ("true → predicted", "count"))]
    parts += [
        "<h2>Confusion matrix</h2>",
        image("confusion", "confusion matrix"),
        "<h2>Calibration</h2>",
        image("reliability", "reliability diagram"),
        "<h2>Most confidently misclassified</h2>",
        image("misclassified", "misclassified images"),
        "<h2>Environment and time</h2>",
        _table_html(
            [
                *info["environment"].items(),
                ("training wall time", _duration(info["train_seconds"]) if info["rows"] else "-"),
                ("training epochs", str(len(info["rows"]))),
                ("evaluation wall time", _duration(r.get("seconds", 0.0))),
                ("evaluation device", r.get("device", "-")),
            ]
        ),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _table_md(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {str(k).replace('|', '/')} | {str(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def render_markdown(info: dict[str, Any], base: Path) -> str:
    """The same report in Markdown; images are linked by path relative to the report."""
    r = info["eval"]
    fig = info["figures"]

    def image(key: str, alt: str) -> str:
        if key not in fig:
            return "(missing)"
        target = Path(fig[key]).resolve()
        try:
            rel = target.relative_to(base.resolve())
        except ValueError:
            rel = target
        return f"![{alt}]({rel.as_posix()})"

    lines = [
        f"# Run report: {info['name']}",
        "",
        f"`{info['run_dir']}`, written {info['written']}",
        "",
        "## Recipe",
        "",
        _table_md(info["recipe"], ("", "")) if info["recipe"] else "no config.yaml",
        "",
    ]
    if info["config_text"]:
        lines += [
            "<details><summary>resolved config</summary>",
            "",
            "```yaml",
            info["config_text"].rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += ["## Training curves and learning-rate schedule", "", image("curves", "training curves"), ""]
    if info["rows"]:
        lines += ["Last epoch:", "", _table_md(_last_epoch_rows(info["rows"]), ("", "")), ""]
    lines += [
        "## Final metrics",
        "",
        f"`{r.get('checkpoint') or r['model']}` on {r['data']} / {r['split']}"
        + (f", test-time augmentation: {r['tta']}" if r.get("tta") else ""),
        "",
        _table_md(_summary_rows(r), ("metric", "value")),
        "",
        "### Per class",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {c['class']} | {_pct(c['precision'])} | {_pct(c['recall'])} | {_pct(c['f1'])} | {c['support']} |"
        for c in r["per_class"]
    ]
    lines += [
        "",
        "## Confusion matrix",
        "",
        image("confusion", "confusion matrix"),
        "",
        "## Calibration",
        "",
        image("reliability", "reliability diagram"),
        "",
        "## Most confidently misclassified",
        "",
        image("misclassified", "misclassified images"),
        "",
        "## Environment and time",
        "",
        _table_md(
            [
                *info["environment"].items(),
                ("training wall time", _duration(info["train_seconds"]) if info["rows"] else "-"),
                ("evaluation wall time", _duration(r.get("seconds", 0.0))),
                ("evaluation device", r.get("device", "-")),
            ],
            ("", ""),
        ),
        "",
    ]
    return "\n".join(lines)
