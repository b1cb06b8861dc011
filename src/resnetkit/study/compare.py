"""`compare`: every combination of the varied keys trained from the same seed and data order, each a normal run
folder, then one table, one figure of every run's curves side by side, and a self-contained HTML page.

    resnetkit compare --config configs/cifar10_resnet20.yaml --subset 10000 \\
        --vary optim=sgd,sgdm,nag,adagrad,adadelta,rmsprop,adam

    from resnetkit.study.compare import compare
    result = compare("configs/cifar10_resnet20.yaml", {"optim": ["sgdm", "adam"]}, overrides=["data.subset=1000"])

Output folder (default <output_dir>/<name>-compare/): one run folder per combination, comparison.md and .csv (the
table), comparison.png (the figure), comparison.html (both, images embedded). A run whose folder holds a last.pt is
resumed: a finished one does nothing more, an interrupted one continues, so a stopped comparison restarts where it
was. A run that diverges (a NaN loss) is reported as such and the others go on.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnetkit.config import Config, load_config
from resnetkit.study.recipe import flow, label, parse_values, with_values


@dataclass
class Variant:
    """One combination: its run-folder name, the values it sets, and the resulting config."""

    label: str
    values: dict[str, Any]
    config: Config


@dataclass
class RunSummary:
    label: str
    values: dict[str, Any]
    run_dir: Path
    rows: list[dict[str, Any]]
    """Its metrics.jsonl."""
    status: str
    """"new", "resumed", "reused" (finished before), or "diverged: <why>"."""


@dataclass
class Comparison:
    out_dir: Path
    metric: str
    runs: list[RunSummary] = field(default_factory=list)
    table: Path | None = None
    figure: Path | None = None
    html: Path | None = None
    interrupted: bool = False


def parse_vary(text: str) -> tuple[str, list[Any]]:
    """`KEY=v1,v2,...` (values as YAML, a mapping or list allowed whole) -> (KEY, [v1, v2, ...])."""
    key, eq, values = text.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"--vary {text!r}: expected KEY=v1,v2,..., e.g. optim=sgdm,nag,adam or optim.lr=0.1,0.01")
    try:
        return key.strip(), parse_values(values)
    except ValueError as e:
        raise ValueError(f"--vary {text!r}: {e}") from None


def variants(base: Config, vary: Mapping[str, Sequence[Any]] | Sequence[tuple[str, Sequence[Any]]]) -> list[Variant]:
    """The cross product of the varied keys' values (first key slowest), each applied to `base` in that order.

    Run folders are <base.output_dir>/<label>; every run keeps the base's seed, so every one starts from the same
    initial weights (same model) and sees the same data in the same order.
    """
    items = list(vary.items()) if isinstance(vary, Mapping) else [(k, list(v)) for k, v in vary]
    if not items:
        raise ValueError("nothing to compare: give at least one --vary KEY=v1,v2,...")
    out, seen = [], set()
    for combo in itertools.product(*(values for _, values in items)):
        values = {key: value for (key, _), value in zip(items, combo)}
        name = label(values)
        while name in seen:  # two values with the same name (e.g. 0.1 and "0.1")
            name += "+"
        seen.add(name)
        source = "--vary " + " ".join(f"{k}={flow(v)}" for k, v in values.items())
        cfg = with_values(base, {**values, "name": name}, source)
        out.append(Variant(name, values, cfg))
    return out


def compare(
    config: Config | str | Path,
    vary: Mapping[str, Sequence[Any]] | Sequence[tuple[str, Sequence[Any]]],
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    quiet: bool = False,
) -> Comparison:
    """Train (or resume, or reuse) every combination, then write the table, the figure and the page.

    config: the base recipe (a Config or a YAML path, with `overrides` applied to a path as --set does).
    out: the comparison folder (default <output_dir>/<name>-compare); every run folder is inside it.
    """
    from resnetkit.data.splits import prepare_splits
    from resnetkit.tasks import get_task
    from resnetkit.train.fit import train
    from resnetkit.train.loop import NonFiniteLoss

    base = config if isinstance(config, Config) else load_config(config, list(overrides))
    out_dir = Path(out) if out is not None else Path(base.output_dir) / f"{base.name}-compare"
    base = with_values(base, {"output_dir": str(out_dir)})
    # data.val_fraction: one set of split lists for every run (whatever a run varies, the seed too).
    base = prepare_splits(base, out_dir, resume=False, write=True)
    metric = base.train.metric or get_task(base.task).metric
    result = Comparison(out_dir, metric)
    for variant in variants(base, vary):
        run_dir = variant.config.run_dir
        resume = (run_dir / "last.pt").is_file()
        if resume:
            _check_same_recipe(run_dir, variant.config)
        before = len(_rows(run_dir))
        if not quiet:
            print(f"compare: {variant.label} ({'resuming' if resume else 'training'}) in {run_dir}", flush=True)
        try:
            run = train(variant.config, resume=resume, quiet=quiet)
            status = "new" if not resume else ("reused" if len(_rows(run_dir)) == before else "resumed")
        except NonFiniteLoss as e:  # a learning rate too high for this optimiser: a result, not a failure
            run, status = None, f"diverged: {e}"
        result.runs.append(RunSummary(variant.label, variant.values, run_dir, _rows(run_dir), status))
        if run is not None and run.interrupted:
            result.interrupted = True
            break
    write_comparison(result)
    return result


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from resnetkit.evaluation.report import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _check_same_recipe(run_dir: Path, cfg: Config) -> None:
    """A run folder is reused only for the recipe it was trained with: a comparison must not mix recipes."""
    import yaml

    saved_path = run_dir / "config.yaml"
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else {}
    changed = [k for k in _changed_keys(saved, cfg.to_dict()) if k not in _MACHINE_KEYS]
    if changed or not saved:
        why = f"{', '.join(changed[:5])} differ" if changed else "it has no config.yaml"
        raise ValueError(
            f"{run_dir} holds a run of another recipe ({why}): compare into another --out, or delete that run folder"
        )


# Keys that say where and how a run is watched, not what it trains: a run may be continued with them changed.
_MACHINE_KEYS = {
    "train.threads",
    "train.device",
    "train.keep_freed_memory",
    "train.log_every_s",
    "data.workers",
    "data.cache_dir",
    "data.pixel_cache",
}


def _changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


# ---- the table, the figure, the page


def summary_rows(result: Comparison) -> tuple[list[str], list[list[str]]]:
    """The table: one row per run with its varied values, best (and its epoch) and final validation metric and
    loss, epochs, training wall time (its epochs' epoch_time_s) and mean images/s."""
    keys = list(dict.fromkeys(k for run in result.runs for k in run.values))
    metrics = list(dict.fromkeys([result.metric, "val_loss"]))
    header = ["run", *keys]
    for m in metrics:
        header += [f"best {m}", f"final {m}"]
    header += ["epochs", "train wall s", "images/s", "status"]
    rows = []
    for run in result.runs:
        row = [run.label, *(flow(run.values[k]) if k in run.values else "" for k in keys)]
        for m in metrics:
            points = [(r["epoch"], r[m]) for r in run.rows if isinstance(r.get(m), (int, float))]
            if points:
                pick = min if m.endswith("loss") else max
                epoch, value = pick(points, key=lambda p: p[1])
                row += [f"{value:.4f} (ep {epoch})", f"{points[-1][1]:.4f}"]
            else:
                row += ["-", "-"]
        seconds = sum(float(r.get("epoch_time_s", 0.0)) for r in run.rows)
        speeds = [float(r["images_per_s"]) for r in run.rows if "images_per_s" in r]
        row += [
            str(len(run.rows)),
            f"{seconds:.1f}",
            f"{sum(speeds) / len(speeds):.0f}" if speeds else "-",
            run.status.split(":")[0],
        ]
        rows.append(row)
    return header, rows


def plot_comparison(result: Comparison, path: str | Path) -> Path:
    """Loss and the validation metric against epoch, every run in its own colour: training dashed, validation solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    metric = result.metric.removeprefix("val_")
    panels = list(dict.fromkeys(["loss", metric]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], panels):
        for i, run in enumerate(result.runs):
            colour = colours[i % len(colours)]
            for split, style in (("train", "--"), ("val", "-")):
                pts = [(r["epoch"], r[f"{split}_{name}"]) for r in run.rows if f"{split}_{name}" in r]
                pts = [(e, v) for e, v in pts if isinstance(v, (int, float)) and v == v]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", markersize=3, color=colour, linewidth=1.6)
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        if name == "loss" and values and min(values) > 0 and max(values) > 10 * min(values):
            ax.set_yscale("log")  # an unstable run's early losses would flatten every other curve
        ax.set_title({"acc": "accuracy"}.get(name, name))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[i % len(colours)], label=run.label) for i, run in enumerate(result.runs)]
    handles += [Line2D([], [], color="grey", ls="--", label="train"), Line2D([], [], color="grey", label="val")]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(f"{result.out_dir.name}: {len(result.runs)} runs")
    fig.tight_layout()
    from resnetkit.evaluation.figures import save_figure

    return save_figure(fig, path)


def write_comparison(result: Comparison) -> Comparison:
    """comparison.md, comparison.csv, comparison.png and comparison.html in the comparison folder."""
    import html

    from resnetkit.evaluation.report import PAGE_CSS, data_uri, table_html, table_md

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    header, rows = summary_rows(result)
    result.table = out / "comparison.md"
    result.table.write_text(table_md(rows, header) + "\n")
    with (out / "comparison.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    result.figure = plot_comparison(result, out / "comparison.png")
    notes = [f"<li>{html.escape(r.label)}: {html.escape(r.status)}</li>" for r in result.runs if ":" in r.status]
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>resnetkit compare: {html.escape(out.name)}</title><style>{PAGE_CSS}</style></head><body>",
        f"<h1>Comparison: {html.escape(out.name)}</h1>",
        f"<p class=muted>{html.escape(str(out))} &middot; written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        f" &middot; every run from the same seed and data order</p>",
        table_html(rows, header),
        f"<ul>{''.join(notes)}</ul>" if notes else "",
        f'<img alt="training and validation curves of every run" src="{data_uri(result.figure)}">',
        "</body></html>",
    ]
    result.html = out / "comparison.html"
    result.html.write_text("\n".join(page) + "\n")
    return result
