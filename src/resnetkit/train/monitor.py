"""Watching a run: a progress bar for the terminal, and a logger that writes what a run leaves behind.

    with Progress(len(loader), desc="epoch 3/30") as bar:
        for images, labels in loader:
            ...
            bar.update(loss=loss, acc=acc, lr=lr)

    logger = RunLogger("runs/demo")
    logger.log_epoch(3, {"train_loss": 0.9, "val_loss": 1.1, "train_acc": 0.7, "val_acc": 0.66, "lr": 0.05})
    logger.close()

`Progress` draws a rich bar (step, fields, images/s, ETA) when stdout is a terminal, and otherwise prints a plain
line every `every_s` seconds and at the end, so CI logs and `train.log` stay readable.
`RunLogger` appends one JSON row per epoch to `metrics.jsonl`, writes TensorBoard events under `tb/`, and redraws
`curves.png` after an epoch (at most every `plot_every_s` seconds, and when it closes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["Progress", "RunLogger", "format_fields", "plot_curves"]


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def format_fields(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """A progress bar over `total` steps that shows the latest fields (loss, acc, lr, ...), images/s and ETA.

    update(n, images=..., **fields): `images` (optional) counts samples for the images/s rate.
    enabled=False prints nothing (non-zero DDP ranks).
    """

    def __init__(self, total: int, desc: str = "", *, enabled: bool = True, every_s: float = 10.0, file=None) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.enabled = enabled
        self.every_s = every_s
        self.file = file if file is not None else sys.stdout
        self.count = 0
        self.images = 0
        self.fields: dict[str, Any] = {}
        self._rich = None
        self._task = None
        self._start = self._last_print = 0.0

    def __enter__(self) -> Progress:
        self._start = self._last_print = time.perf_counter()
        if self.enabled and getattr(self.file, "isatty", lambda: False)():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total or None, info="")
        return self

    def rate(self) -> float:
        """Images per second since the start (steps per second when no image counts were given)."""
        elapsed = time.perf_counter() - self._start
        done = self.images or self.count
        return done / elapsed if elapsed > 0 else 0.0

    def _info(self) -> str:
        unit = "img/s" if self.images else "it/s"
        return f"{format_fields(self.fields)} {self.rate():.1f} {unit}".strip()

    def update(self, n: int = 1, *, images: int = 0, **fields: Any) -> None:
        self.count += n
        self.images += images
        self.fields.update(fields)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, advance=n, info=self._info())
            return
        now = time.perf_counter()
        if now - self._last_print >= self.every_s:
            self._last_print = now
            self._print_line()

    def _print_line(self) -> None:
        elapsed = time.perf_counter() - self._start
        eta = (self.total - self.count) * elapsed / self.count if self.count and self.total else float("nan")
        of = f"/{self.total}" if self.total else ""
        print(
            f"{self.desc} {self.count}{of} {self._info()} elapsed {_duration(elapsed)} ETA {_duration(eta)}",
            file=self.file,
            flush=True,
        )

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled:
            self._print_line()


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def plot_curves(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draw one panel per metric found as train_<m> / val_<m> (loss first), plus the learning rate, side by side.

    rows: metrics.jsonl rows, each with "epoch".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for row in rows:
        for key in row:
            for split in ("train_", "val_"):
                if key.startswith(split) and _scalar(row[key]) is not None and key[len(split) :] not in names:
                    names.append(key[len(split) :])
    names = sorted(names, key=lambda m: m != "loss")  # stable: loss first, the rest in order of appearance
    names = names[:4]  # loss, accuracy and at most two more: the figure stays legible
    has_lr = any("lr" in row for row in rows)
    panels = len(names) + has_lr or 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, names):
        for split, style in (("train", "-o"), ("val", "-s")):
            pts = [(r["epoch"], _scalar(r[f"{split}_{metric}"])) for r in rows if f"{split}_{metric}" in r]
            pts = [(e, v) for e, v in pts if v is not None and math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts), style, markersize=3, label=split)
        ax.set_title({"acc": "accuracy"}.get(metric, metric.replace("_", " ")))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if has_lr:
        ax = axes[len(names)]
        # Rows with a per-step trace give (fractional epoch, lr) pairs; the others give their epoch's last lr.
        pts = sorted(p for r in rows if "lr" in r for p in (r.get("lr_trace") or [(r["epoch"], r["lr"])]))
        ax.plot(*zip(*pts), "-" if len(pts) > len(rows) else "-o", markersize=3, color="tab:green")
        ax.set_title("learning rate")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if not names and not has_lr:
        axes[0].text(0.5, 0.5, "no metrics yet", ha="center", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from resnetkit.evaluation.figures import save_figure

    return save_figure(fig, path)  # atomic: a viewer refreshing curves.png never sees a half-written file


class RunLogger:
    """Writes a run's records into `run_dir`: metrics.jsonl (a row per epoch), tb/ (TensorBoard), curves.png.

    enabled=False makes every method a no-op (non-zero DDP ranks write nothing).
    A row given to `log_epoch` may hold `lr_trace`: [(fractional epoch, lr), ...] for a per-step schedule plot; it is
    drawn, not written to TensorBoard.
    """

    def __init__(
        self, run_dir: str | Path, *, enabled: bool = True, title: str | None = None, plot_every_s: float = 10.0
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.title = self.run_dir.name if title is None else title
        self.rows: list[dict[str, Any]] = []
        self._writer = None
        # Drawing curves.png takes ~0.3 s: with many short epochs, redraw at most this often (and when closing).
        self.plot_every_s = plot_every_s
        self._plotted_at: float | None = None
        self._unplotted = False
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.metrics_path.exists():  # a resumed run keeps its history
            with self.metrics_path.open() as f:
                by_epoch = {row.get("epoch"): row for row in map(json.loads, filter(str.strip, f))}
            self.rows = list(by_epoch.values())

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        return self._writer

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        for key, value in scalars.items():
            v = _scalar(value)
            if v is not None:
                self.writer.add_scalar(key, v, step)

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"epoch": epoch}
        for key, value in metrics.items():
            v = _scalar(value)
            row[key] = value if v is None else (int(value) if isinstance(value, int) else v)
        # A resumed run may repeat an epoch that was cut short: keep the newest row for it.
        self.rows = [r for r in self.rows if r.get("epoch") != epoch] + [row]
        trace = row.pop("lr_trace", None)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            v = _scalar(value)
            if key != "epoch" and v is not None:
                tag = key.replace("train_", "train/", 1).replace("val_", "val/", 1) if "_" in key else key
                self.writer.add_scalar(f"epoch/{tag}", v, epoch)
        self.writer.flush()
        if trace:
            self.rows[-1] = {**row, "lr_trace": trace}
        self._unplotted = True
        if self._plotted_at is None or time.perf_counter() - self._plotted_at >= self.plot_every_s:
            self._plot()

    def _plot(self) -> None:
        plot_curves(self.rows, self.run_dir / "curves.png", title=self.title)
        self._plotted_at, self._unplotted = time.perf_counter(), False

    def log_images(self, tag: str, images: torch.Tensor, step: int, mean=None, std=None) -> None:
        """A grid of a batch of images (N, C, H, W); normalised images are un-normalised with `mean`/`std`."""
        if not self.enabled:
            return
        import torchvision.utils as vutils

        x = images.detach().float().cpu()[:32]
        if mean is not None and std is not None:
            x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        grid = vutils.make_grid(x.clamp(0, 1), nrow=8)
        self.writer.add_image(tag, grid, step)

    def log_hparams(self, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        hparams = {}
        for k, v in _flatten(config).items():
            if isinstance(v, (bool, int, float, str)):
                hparams[k] = v
            elif v is not None:
                hparams[k] = str(v)
        scalars = {f"hparam/{k}": s for k, v in metrics.items() if (s := _scalar(v)) is not None}
        self.writer.add_hparams(hparams, scalars, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.enabled and self._unplotted:
            self._plot()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
