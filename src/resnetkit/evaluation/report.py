"""The run report: one self-contained HTML file (every image embedded as base64, no external resource) and a
Markdown twin.

    resnetkit report runs/demo            # writes runs/demo/report.html and runs/demo/report.md

The report shows the recipe and resolved config, the training curves and learning-rate schedule (curves.png and
metrics.jsonl written by training), the final metrics with the per-class table beside the class distribution of
each split, the confusion matrix, the reliability diagram (before and after temperature scaling too, once
`resnetkit calibrate` has written RUN_DIR/calibration/), the misclassified grid (a multi-label model: per-class AP,
F1 and thresholds, and the precision-recall curves), the environment and the wall time. It evaluates best.pt first
(into RUN_DIR/eval/) unless eval/eval.json is already there.
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnetkit.fileio import write_atomic


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

    from resnetkit._version import __version__

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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows in epoch order, [] when there is none. An epoch logged twice (a run stopped after
    writing its row but before saving its checkpoint redoes the epoch when resumed) keeps its newest row."""
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[Any, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON row ({e.msg})") from None
            rows.pop(row.get("epoch"), None)
            rows[row.get("epoch")] = row
    return list(rows.values())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s" if h else f"{rem // 60}m {rem % 60:02d}s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def data_uri(path: Path) -> str:
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
        from resnetkit.evaluation.evaluate import evaluate

        evaluate(checkpoint, out_dir=eval_dir, **eval_kwargs)
    try:
        result = json.loads((eval_dir / "eval.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{eval_dir / 'eval.json'}: not valid JSON ({e.msg})") from None
    rows = read_metrics(run / "metrics.jsonl")
    curves = run / "curves.png"
    if rows and not curves.is_file():
        from resnetkit.train.monitor import plot_curves

        plot_curves(rows, eval_dir / "curves.png", title=run.name)
        curves = eval_dir / "curves.png"
    config_text = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else None
    train_seconds = sum(float(r.get("epoch_time_s", 0.0)) for r in rows)
    calibration = _read_calibration(run / "calibration" / "calibration.json")
    figures = {
        "curves": curves if curves.is_file() else None,
        "confusion": eval_dir / "confusion_matrix.png",
        "reliability": eval_dir / "reliability.png",
        "misclassified": eval_dir / "misclassified.png",
        "pr": eval_dir / "pr_curves.png",
        "reliability_before": run / "calibration" / "reliability_before.png",
        "reliability_after": run / "calibration" / "reliability_after.png",
    }
    return {
        "name": run.name,
        "run_dir": str(run),
        "config_text": config_text,
        "recipe": _recipe(config_text),
        "rows": rows,
        "eval": result,
        "calibration": calibration,
        "figures": {k: v for k, v in figures.items() if v is not None and v.is_file()},
        "train_seconds": train_seconds,
        "environment": environment(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _read_calibration(path: Path) -> dict[str, Any] | None:
    """calibration.json of `resnetkit calibrate` (None when the run was never calibrated)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None


def _calibration_rows(c: dict[str, Any]) -> list[tuple[str, str, str]]:
    before, after = c["before"], c["after"]
    kept = [("mAP", "map"), ("F1 (macro)", "f1_macro"), ("exact match", "exact_match")]
    kept = kept if c.get("multilabel") else [("top-1 accuracy", "top1")]
    return [
        ("temperature", f"{before['temperature']:.4g}", f"{after['temperature']:.4g}"),
        ("expected calibration error", _pct(before["ece"]), _pct(after["ece"])),
        ("negative log-likelihood", f"{before['nll']:.4f}", f"{after['nll']:.4f}"),
        *[(name, _pct(before[key]), _pct(after[key])) for name, key in kept],
    ]


def _calibration_note(c: dict[str, Any], evaluated_at: float) -> str:
    """Which images the temperature was fitted on, which checkpoint holds it, and the T of the final metrics."""
    return (
        f"Temperature scaling (resnetkit calibrate) fitted on {c['data']} [{c['split']}], {c['num_samples']:,} "
        f"images, written into {c['checkpoint']}. The final metrics above were evaluated at temperature "
        f"{evaluated_at:.4g}."
    )


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
        ("loss", named("loss", "class_weights") if cfg.get("task") in ("classification", "multilabel") else ""),
        ("training", fields("train", "epochs", "label_smoothing", "ema", "amp")),
        ("seed", str(cfg.get("seed", ""))),
    ]
    return [(k, v.strip()) for k, v in rows if v.strip()]


def _summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    if result.get("multilabel"):
        return [
            ("samples", f"{result['num_samples']:,}"),
            ("mAP (macro)", f"{result['map']:.4f}"),
            ("F1 (macro)", _pct(result["f1_macro"])),
            ("precision / recall (macro)", f"{_pct(result['precision_macro'])} / {_pct(result['recall_macro'])}"),
            ("exact-match ratio", _pct(result["exact_match"])),
            ("Hamming loss", f"{result['hamming_loss']:.4f}"),
            ("labels per image", f"{result['label_cardinality']:.2f}"),
            ("decision thresholds", result.get("thresholds_from", "-")),
        ]
    return [
        ("samples", f"{result['num_samples']:,}"),
        ("top-1 accuracy", _pct(result["top1"])),
        ("top-5 accuracy", _pct(result["top5"])),
        ("mean cross-entropy", f"{result['loss']:.4f}"),
        ("precision (macro / weighted)", f"{_pct(result['precision_macro'])} / {_pct(result['precision_weighted'])}"),
        ("recall (macro / weighted)", f"{_pct(result['recall_macro'])} / {_pct(result['recall_weighted'])}"),
        ("F1 (macro / weighted)", f"{_pct(result['f1_macro'])} / {_pct(result['f1_weighted'])}"),
        ("balanced accuracy", _pct(result.get("balanced_accuracy"))),
        ("expected calibration error", _pct(result["ece"])),
    ]


def per_class_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The per-class table (header, rows): the metrics, then how many samples of the class each split holds
    (multi-label: images with the label), the evaluated split's being the support."""
    split = result.get("split", "")
    others = [name for name in (result.get("class_distribution") or {}) if name != split]
    distribution = result.get("class_distribution") or {}
    if result.get("multilabel"):
        header = ["class", "AP", "precision", "recall", "F1", "threshold"]
    else:
        header = ["class", "precision", "recall", "F1"]
    header += [f"{split} (support)", *others]
    rows = []
    for c, r in enumerate(result["per_class"]):
        if result.get("multilabel"):
            ap = "-" if r["ap"] is None else f"{r['ap']:.4f}"
            row = [r["class"], ap, _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"]), f"{r['threshold']:.3f}"]
        else:
            row = [r["class"], _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"])]
        counts = [distribution[name][c] if c < len(distribution[name]) else "-" for name in others]
        rows.append([*row, str(r["support"]), *map(str, counts)])
    return header, rows


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
    write_atomic(html_path, render_html(info))
    write_atomic(md_path, render_markdown(info, md_path.parent))
    return html_path, md_path


def table_html(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """An HTML table of any number of columns, every cell escaped."""

    def cells(tag: str, row: Sequence[Any]) -> str:
        return "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)

    head = f"<tr>{cells('th', header)}</tr>" if header else ""
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


PAGE_CSS = """
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
        return f'<img alt="{esc(alt)}" src="{data_uri(fig[key])}">' if key in fig else "<p class=muted>(missing)</p>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>resnetkit report: {esc(info['name'])}</title><style>{PAGE_CSS}</style></head><body>",
        f"<h1>Run report: {esc(info['name'])}</h1>",
        f"<p class=muted>{esc(info['run_dir'])} &middot; written {esc(info['written'])}</p>",
        "<h2>Recipe</h2>",
        table_html(info["recipe"]) if info["recipe"] else "<p class=muted>no config.yaml in the run folder</p>",
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
        parts.append("<p>Last epoch:</p>" + table_html(_last_epoch_rows(info["rows"])))
    where = f"{r['data']} / {r['split']}" + (f", test-time augmentation: {r['tta']}" if r.get("tta") else "")
    parts += [
        "<h2>Final metrics</h2>",
        f"<p>{esc(r.get('checkpoint') or r['model'])} on {esc(where)}</p>",
        table_html(_summary_rows(r), ("metric", "value")),
        "<h3>Per class</h3>",
        "<p class=muted>beside the metrics: the samples of each class in every split (multi-label: the images "
        "carrying the label)</p>",
        table_html(per_class_rows(r)[1], per_class_rows(r)[0]),
    ]
    if r.get("top_confusions"):
        rows = [(f"{c['true']} → {c['predicted']}", str(c["count"])) for c in r["top_confusions"]]
        parts += ["<h3>Most frequent confusions</h3>", table_html(rows, ("true → predicted", "count"))]
    if r.get("multilabel"):
        parts += ["<h2>Precision-recall curves</h2>", image("pr", "precision-recall curves per class")]
        if info.get("calibration"):
            parts += ["<h2>Calibration</h2>", *_calibration_html(info, image)]
    else:
        parts += [
            "<h2>Confusion matrix</h2>",
            image("confusion", "confusion matrix"),
            "<h2>Calibration</h2>",
            image("reliability", "reliability diagram"),
            *_calibration_html(info, image),
            "<h2>Most confidently misclassified</h2>",
            image("misclassified", "misclassified images"),
        ]
    parts += [
        "<h2>Environment and time</h2>",
        table_html(
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


def _calibration_html(info: dict[str, Any], image) -> list[str]:
    c = info.get("calibration")
    if not c:
        return []
    return [
        "<h3>Before and after temperature scaling</h3>",
        f"<p>{html.escape(_calibration_note(c, info['eval'].get('temperature', 1.0)))}</p>",
        table_html(_calibration_rows(c), ("", "before", "after")),
        image("reliability_before", "reliability diagram before temperature scaling"),
        image("reliability_after", "reliability diagram after temperature scaling"),
    ]


def _calibration_md(info: dict[str, Any], image) -> list[str]:
    c = info.get("calibration")
    if not c:
        return []
    return [
        "### Before and after temperature scaling",
        "",
        _calibration_note(c, info["eval"].get("temperature", 1.0)),
        "",
        table_md(_calibration_rows(c), ("", "before", "after")),
        "",
        image("reliability_before", "reliability before temperature scaling"),
        image("reliability_after", "reliability after temperature scaling"),
        "",
    ]


def table_md(rows: Sequence[Sequence[Any]], header: Sequence[str] = ("", "")) -> str:
    """A Markdown table of any number of columns ("|" in a cell becomes "/")."""

    def line(row: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])


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
        table_md(info["recipe"], ("", "")) if info["recipe"] else "no config.yaml",
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
        lines += ["Last epoch:", "", table_md(_last_epoch_rows(info["rows"]), ("", "")), ""]
    lines += [
        "## Final metrics",
        "",
        f"`{r.get('checkpoint') or r['model']}` on {r['data']} / {r['split']}"
        + (f", test-time augmentation: {r['tta']}" if r.get("tta") else ""),
        "",
        table_md(_summary_rows(r), ("metric", "value")),
        "",
        "### Per class",
        "",
        table_md(per_class_rows(r)[1], per_class_rows(r)[0]),
        "",
    ]
    if r.get("multilabel"):
        lines += ["## Precision-recall curves", "", image("pr", "precision-recall curves per class"), ""]
        if info.get("calibration"):
            lines += ["## Calibration", "", *_calibration_md(info, image)]
    else:
        lines += [
            "## Confusion matrix",
            "",
            image("confusion", "confusion matrix"),
            "",
            "## Calibration",
            "",
            image("reliability", "reliability diagram"),
            "",
            *_calibration_md(info, image),
            "## Most confidently misclassified",
            "",
            image("misclassified", "misclassified images"),
            "",
        ]
    lines += [
        "## Environment and time",
        "",
        table_md(
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
