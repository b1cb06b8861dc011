"""`train(config)`: the one training engine, for every task. Builds the loaders and model through the task's adapter
(`resnetkit.tasks`), the optimiser and schedule, runs the epochs, evaluates, logs, checkpoints, and resumes exactly
where a run stopped: after Ctrl-C, a crash, SIGKILL, or a torchrun restart of a failed group.

    resnetkit train --config configs/demo.yaml --set train.epochs=3
    resnetkit train --config configs/detect_cub.yaml
    torchrun --nproc_per_node 2 --max-restarts 1 -m resnetkit train --config configs/demo.yaml

Run folder <output_dir>/<name>/: config.yaml (resolved), last.pt, best.pt, metrics.jsonl, curves.png, tb/, train.log.
Checkpoint keys are the same for every task; `epoch` counts completed epochs and `step` the batches done within the
next one (0 at an epoch's end).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from resnetkit.checkpoint import load_checkpoint, save_checkpoint
from resnetkit.config import Config, ScheduleConfig, config_from_dict, load_config, save_config
from resnetkit.train import distributed
from resnetkit.train.budget import Budget
from resnetkit.train.loop import NonFiniteLoss, Parts, keep_freed_memory, resolve_amp, train_one_epoch
from resnetkit.train.monitor import Progress, RunLogger, format_fields
from resnetkit.train.optim import LRSchedule, ModelEMA, build_optimizer
from resnetkit.train.optim import switched as switched_optim


@dataclass
class RunResult:
    run_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    """The last epoch's row of metrics.jsonl, plus best_<metric> and best_epoch."""
    interrupted: bool = False
    model: nn.Module | None = None
    """The trained model itself (bare: no DDP or compile wrapper), on the training device."""


class _FirstBatches:
    """The first `n` batches of a loader, as a loader (with its classes): what timing an evaluation looks at."""

    def __init__(self, loader, n: int) -> None:
        self.batches, self.classes = [], getattr(loader, "classes", None)
        for batch in loader:
            self.batches.append(batch)
            if len(self.batches) == n:
                break

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def in_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> ScheduleConfig:
    """The schedule with its lengths counted in optimizer steps (a budget lays it over planned steps)."""
    if cfg.per == "step":
        return cfg
    k = steps_per_epoch
    return dataclasses.replace(
        cfg, per="step", step_size=cfg.step_size * k, milestones=[m * k for m in cfg.milestones], warmup=cfg.warmup * k
    )


def as_config(config: Config | str | Path | dict) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """Every global RNG as plain data (so `weights_only=True` loads it)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(keys), gauss],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves at the next optimizer-step boundary and returns."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _sum_across_ranks(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([float(flag)], device=device)
    return bool(distributed.all_reduce_sum(t).item() > 0)


def _check_resumable(ckpt: dict[str, Any], cfg: Config, path: Path) -> None:
    """The settings whose state a checkpoint holds must not change across a resume (epochs, lr etc. may)."""
    old = ckpt.get("config") or {}
    if (old.get("task") or "classification") != cfg.task:
        raise ValueError(f"--resume: {path} was trained for task {old.get('task')!r} but the config says {cfg.task!r}")
    for section, key in (
        ("model", "name"),
        ("optim", "name"),
        ("data", "name"),
        ("train", "ema"),
        ("train", "amp"),
        ("model", "freeze"),
    ):
        was, now = old.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if was is not None and was != now:
            raise ValueError(f"--resume: {path} was trained with {section}.{key}={was!r} but the config says {now!r}")


def train(
    config: Config | str | Path | dict,
    *,
    resume: bool = False,
    quiet: bool = False,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """Train as `config` says; with resume=True, continue from <run_dir>/last.pt exactly where it stopped.

    A worker group that torchrun restarted after a failure (`--max-restarts`) resumes from last.pt by itself.
    callbacks: objects with `on_step(run, info)` (after every optimizer step; info: step, epoch, loss of the batch,
    lr) and/or `on_epoch(run, epoch, row)` (after each epoch's row is logged and saved); returning True from either
    stops the run there, as the end of a time budget would (the last epoch evaluated and saved). Exceptions they
    raise (e.g. optuna.TrialPruned) end the run and reach the caller.
    """
    started = time.perf_counter()  # a time budget counts the whole run, loaders and model included
    cfg = as_config(config)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and (cfg.run_dir / "last.pt").is_file():
        resume = True
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    with distributed.process_group(cfg.train.device) as info:
        budget = Budget(cfg.train.budget, started=started) if cfg.train.budget else None
        return _Run(cfg, info, resume, quiet, budget, callbacks).run()


class _Run:
    """One training run's state; `run()` is the epoch loop."""

    def __init__(
        self,
        cfg: Config,
        info: distributed.DistInfo,
        resume: bool,
        quiet: bool,
        budget: Budget | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.cfg, self.info, self.resume, self.quiet = cfg, info, resume, quiet
        self.budget, self.callbacks = budget, list(callbacks)
        self.stop_requested = False
        self.run_dir = cfg.run_dir
        self.last_path, self.best_path = self.run_dir / "last.pt", self.run_dir / "best.pt"

    # ---- messages: stdout and train.log, rank 0 only
    def say(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if not self.quiet:
            print(msg, flush=True)
        with (self.run_dir / "train.log").open("a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def _check_run_dir(self) -> None:
        if self.resume and not self.last_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {self.last_path}")
        if not self.resume and self.last_path.is_file():
            raise ValueError(
                f"{self.run_dir} already holds a run (last.pt): pass --resume to continue it, or "
                f"--set name=NEW for a new run"
            )

    def run(self) -> RunResult:
        from resnetkit.data.splits import prepare_splits

        info = self.info
        self._check_run_dir()
        # data.val_fraction: the split lists in <run>/splits (made once, reused on resume), named by data.splits.
        cfg = self.cfg = prepare_splits(self.cfg, self.run_dir, resume=self.resume, write=info.is_main)
        t = cfg.train
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        distributed.barrier()
        seed_everything(cfg.seed, t.deterministic)
        ckpt = load_checkpoint(self.last_path) if self.resume else None
        if ckpt is not None:
            _check_resumable(ckpt, cfg, self.last_path)

        from resnetkit.tasks import get_task

        task = self.task = get_task(cfg.task)
        if cfg.data.batch_size % info.world_size:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} is not divisible by the {info.world_size} processes"
            )
        self.metric = t.metric or task.metric
        train_loader, val_loader = task.build_loaders(cfg, info)
        self.train_loader, self.val_loader = train_loader, val_loader
        model, self.model_name, self.model_kwargs = task.build_model(cfg, load_weights=ckpt is None)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        if t.sync_bn and info.enabled and info.device.type != "cuda":
            raise ValueError("train.sync_bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation")
        if t.sync_bn and info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        frozen_norms = task.freeze(model, cfg.model.freeze)
        model.to(info.device, memory_format=torch.channels_last if t.channels_last else torch.preserve_format)
        self.bare_model = model
        ema = ModelEMA(model, t.ema_decay) if t.ema else None
        switch = cfg.optim.switch
        self.switched = bool(ckpt is not None and ckpt.get("switched"))  # the optimiser the checkpoint's state is of
        optimizer = self._optimizer(model, self.switched)
        steps_per_epoch = max(len(train_loader) // t.accum_steps + (len(train_loader) % t.accum_steps > 0), 1)
        self.steps_per_epoch = steps_per_epoch
        self.cap = steps_per_epoch * t.epochs if t.max_steps is None else min(t.max_steps, steps_per_epoch * t.epochs)
        self.max_steps = t.max_steps
        schedule_cfg = cfg.schedule
        if self.budget is not None:  # the schedule is laid over the planned steps: its lengths are counted in steps
            schedule_cfg = in_steps(cfg.schedule, steps_per_epoch)
            self.max_steps = self.cap  # until the first plan
        ticks = self.cap if schedule_cfg.per == "step" else t.epochs
        maximize = not self.metric.endswith("loss")
        schedule = LRSchedule(
            optimizer,
            schedule_cfg,
            self._optim_cfg(self.switched).lr,
            ticks,
            maximize=maximize,
            momentum_warmup=cfg.optim.momentum_warmup,
            steps_per_tick=1 if schedule_cfg.per == "step" else steps_per_epoch,
        )
        amp = resolve_amp(t.amp, info.device)
        scaler = torch.amp.GradScaler(info.device.type, enabled=amp == "fp16")
        wrapped: nn.Module = model
        if info.enabled:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None
            )
        if t.compile:
            wrapped = torch.compile(wrapped)
        parts = Parts(wrapped, task, optimizer, scaler, schedule, ema, cfg, info.device, frozen_norms)

        start_epoch, start_step, totals, self.best = 0, 0, None, None
        self.best_epoch = None
        if ckpt is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            schedule.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            if ema is not None and ckpt.get("model_ema") is not None:
                ema.load_state_dict(ckpt["model_ema"], ckpt.get("ema_updates", 0))
            start_epoch, start_step, totals = ckpt["epoch"], ckpt["step"], ckpt.get("totals")
            parts.global_step = ckpt["global_step"]
            self.best, self.best_epoch = ckpt.get("best"), ckpt.get("best_epoch")
            rngs = ckpt["rng"]
            set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
            if self.budget is not None and ckpt.get("budget"):
                spent = ckpt["budget"]
                self.budget.spent_before, self.budget.eval_seconds = spent["spent"], spent.get("eval_seconds")
                if spent.get("total") is not None:
                    self.budget.total = self.max_steps = spent["total"]
            self.say(f"resumed {self.last_path} at epoch {start_epoch + 1}, step {start_step}")

        logger = RunLogger(self.run_dir, enabled=info.is_main)
        self.parts, self.logger = parts, logger
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_val = val_loader.num_samples if val_loader is not None else 0
        self.say(
            f"training {cfg.task} {self.model_name} ({n_params:,} parameters, {n_train:,} trainable) on "
            f"{cfg.data.name}: {train_loader.num_samples} train / {n_val} val images, {len(task.classes)} classes, "
            f"{info.world_size} process(es) on {info.device}, mixed precision {amp}"
            + (" (train.amp auto)" if t.amp == "auto" else "")
            + f", run folder {self.run_dir}"
        )
        row: dict[str, Any] = {}
        interrupted = False
        try:
            with _StopFlag() as stop:
                for epoch in range(start_epoch, t.epochs):
                    if self.stop_requested or (self.max_steps is not None and parts.global_step >= self.max_steps):
                        break
                    if switch is not None and epoch == switch.epoch and not self.switched:
                        self._switch_optimizer()
                    train_loader.set_epoch(epoch)
                    if epoch == start_epoch and ckpt is not None and start_step > 0:
                        train_loader.load_state_dict(ckpt["loader"])
                    row, interrupted = self._epoch(
                        epoch, start_step if epoch == start_epoch else 0, totals if epoch == start_epoch else None, stop
                    )
                    if interrupted:
                        break
        except NonFiniteLoss as e:
            self.say(
                f"stopped: {e}. The last good checkpoint is {self.last_path if self.last_path.exists() else 'none'}"
                "; lower optim.lr, set train.grad_clip, or check the data"
            )
            logger.close()
            raise
        finally:  # worker processes stop with the run, however it ends
            for loader in (train_loader, val_loader):
                if hasattr(loader, "close"):
                    loader.close()
        logger.log_hparams(cfg.to_dict(), {k: v for k, v in row.items() if k.startswith("val_")})
        logger.close()
        metrics = {**row, f"best_{self.metric}": self.best, "best_epoch": self.best_epoch}
        if not interrupted:
            self.say(
                f"done: best {self.metric} {self.best} at epoch {self.best_epoch}; outputs in {self.run_dir}/ "
                f"(best.pt, last.pt, metrics.jsonl, curves.png, tb/, train.log)"
            )
        return RunResult(
            self.run_dir,
            self.best_path if self.best_path.exists() else None,
            self.last_path if self.last_path.exists() else None,
            metrics,
            interrupted,
            self.bare_model,
        )

    def _epoch(self, epoch: int, start_step: int, totals, stop: _StopFlag) -> tuple[dict[str, Any], bool]:
        p, t = self.parts, self.cfg.train
        loader = self.train_loader
        n_batches = len(loader)
        lr_trace: list[tuple[float, float]] = []
        trace_every = max(n_batches // 50, 1)
        state = {"interrupted": False, "images": 0, "done": start_step}
        t0 = time.perf_counter()

        with Progress(
            n_batches - start_step,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            enabled=self.info.is_main and not self.quiet,
            every_s=t.log_every_s,
        ) as bar:

            def after_step(done: int, running: dict[str, float], synced: bool, batch: dict[str, float]) -> bool:
                n_images = running["count"] - state["images"]
                state["images"], state["done"] = running["count"], done
                lr = p.optimizer.param_groups[-1]["lr"]
                shown = {k.removeprefix("train_"): v for k, v in self.task.train_metrics(running).items()}
                bar.update(images=int(n_images), **shown, lr=lr)
                if done % trace_every == 0:
                    lr_trace.append((epoch + done / n_batches, lr))
                if not synced:
                    return False
                if p.global_step % 50 == 0:
                    self.logger.log_scalars(
                        p.global_step,
                        {"train/loss": shown["loss"], "train/lr": lr, "train/images_per_s": bar.rate()},
                    )
                if _sum_across_ranks(stop.raised, self.info.device) if self.info.enabled else stop.raised:
                    state["interrupted"] = True
                    return True
                if t.checkpoint_every and p.global_step % t.checkpoint_every == 0 and done < n_batches:
                    self._save(epoch, done, running, {}, best=False)
                if self.budget is not None:
                    self._follow_budget(epoch, done)
                info = {"step": p.global_step, "epoch": epoch, "loss": batch["loss"] / max(batch["count"], 1), "lr": lr}
                if any(cb.on_step(self, info) for cb in self.callbacks if hasattr(cb, "on_step")):
                    self.stop_requested = True
                    self.max_steps = p.global_step  # the epoch ends here: evaluated and saved
                return self.max_steps is not None and p.global_step >= self.max_steps

            peek = self._log_image_grid if t.log_images and epoch == 0 and start_step == 0 else None
            running = train_one_epoch(
                p, loader, epoch, start_step=start_step, totals=totals, after_step=after_step, peek=peek
            )
        elapsed = time.perf_counter() - t0
        if state["interrupted"]:
            done = state["done"]
            self._save(epoch, done, running, {}, best=False)
            self.say(f"interrupted at epoch {epoch + 1}, step {done}: saved {self.last_path}; continue with --resume")
            return {}, True

        if p.schedule.cfg.per == "epoch":
            p.schedule.tick()
        distributed.broadcast_buffers(self.bare_model)  # every rank evaluates and holds the same model
        if p.ema is not None:
            distributed.broadcast_buffers(p.ema.module)
        count = max(running.get("count", 0), 1)
        row: dict[str, Any] = {
            **self.task.train_metrics(running),
            "lr": p.optimizer.param_groups[-1]["lr"],
            "images_per_s": count / elapsed,
            "epoch_time_s": elapsed,
            "step": p.global_step,
        }
        last_epoch = epoch + 1 == t.epochs or (self.max_steps is not None and p.global_step >= self.max_steps)
        if self.budget is not None:
            self.budget.pause()  # the epoch's end is not a step: timed apart
            end_started = time.perf_counter()
        evaluated = self.val_loader is not None and ((epoch + 1) % t.eval_every == 0 or last_epoch)
        if evaluated:
            eval_started = time.perf_counter()
            row.update(self._evaluate())
            if self.budget is not None:
                self.budget.eval_seconds = time.perf_counter() - eval_started
        p.schedule.epoch_end(row.get(self.metric))
        self.logger.log_epoch(epoch + 1, {**row, "lr_trace": lr_trace + [(epoch + 1.0, row["lr"])]})
        metric = row.get(self.metric)
        improved = metric is not None and (
            self.best is None or (metric < self.best if self.metric.endswith("loss") else metric > self.best)
        )
        if improved:
            self.best, self.best_epoch = metric, epoch + 1
        self.say(f"epoch {epoch + 1}/{t.epochs} " + format_fields({k: v for k, v in row.items() if k != "step"}))
        self._save(epoch + 1, 0, None, row, best=improved)
        if self.budget is not None:  # what an epoch's end costs besides its evaluation; re-plan with it measured
            evaluation = self.budget.eval_seconds if evaluated else 0.0
            self.budget.epoch_end_seconds = time.perf_counter() - end_started - evaluation
            self.budget.planned_at = -(10**9)
        if any(cb.on_epoch(self, epoch + 1, row) for cb in self.callbacks if hasattr(cb, "on_epoch")):
            self.stop_requested = True
        return row, False

    # ---- optimisers: the first one, and the one optim.switch puts in its place

    def _optim_cfg(self, switched: bool):
        return switched_optim(self.cfg.optim, self.cfg.optim.switch) if switched else self.cfg.optim

    def _optimizer(self, model: nn.Module, switched: bool) -> torch.optim.Optimizer:
        return build_optimizer(model, self._optim_cfg(switched), self.cfg.model, self.task.head_parameters(model))

    def _switch_optimizer(self) -> None:
        p = self.parts
        p.optimizer = self._optimizer(self.bare_model, switched=True)
        p.schedule.use(p.optimizer, self._optim_cfg(True).lr)
        self.switched = True
        new = self._optim_cfg(True)
        self.say(f"optim.switch: {new.name} (lr {new.lr:g}) from epoch {self.cfg.optim.switch.epoch + 1} on")

    # ---- a time budget: plan the steps, re-plan them, stop at the edge

    def _follow_budget(self, epoch: int, done: int) -> None:
        budget, p = self.budget, self.parts
        budget.step_done()
        step = p.global_step
        if budget.due(step):
            first = budget.total is None
            if budget.eval_seconds is None:
                budget.eval_seconds = self._time_evaluation()
            t = self.cfg.train
            evals = 1 / t.eval_every if self.val_loader is not None else 0.0
            total = budget.plan(step, done // t.accum_steps, self.steps_per_epoch, evals, self.cap)
            total = distributed.broadcast_object(total)  # rank 0's measurements decide for every rank
            budget.total = self.max_steps = total
            p.schedule.set_total(total)
            if first:
                self.say(budget.describe(self.steps_per_epoch, self.cfg.data.batch_size))
        elif not self.info.enabled and budget.over():  # the hard edge (every rank re-plans in step under DDP)
            budget.total = self.max_steps = step

    def _time_evaluation(self) -> float:
        """One evaluation's wall time, estimated from timing the task's evaluation of two validation batches."""
        if self.val_loader is None:
            return 0.0
        sample = _FirstBatches(self.val_loader, 2)
        started = time.perf_counter()
        self.task.evaluate(self.parts.model, sample, self.cfg, self.info.device)
        if self.parts.ema is not None:
            self.task.evaluate(self.parts.ema.module, sample, self.cfg, self.info.device)
        seconds = (time.perf_counter() - started) * len(self.val_loader) / max(len(sample), 1)
        self.budget.pause()
        return seconds

    def _evaluate(self) -> dict[str, float]:
        p, task, device = self.parts, self.task, self.info.device
        out = {f"val_{k}": v for k, v in task.evaluate(p.model, self.val_loader, self.cfg, device).items()}
        if p.ema is not None:
            out.update(
                {f"val_ema_{k}": v for k, v in task.evaluate(p.ema.module, self.val_loader, self.cfg, device).items()}
            )
        return {k: v for k, v in out.items() if not k.endswith("count")}

    def _log_image_grid(self, images) -> None:
        if not isinstance(images, torch.Tensor):  # detection batches are lists of images of different sizes
            return
        pre = self.task.preprocess
        normalised = pre.get("preset") != "detection"
        self.logger.log_images(
            "train/augmented_batch",
            images,
            0,
            pre.get("mean") if normalised else None,
            pre.get("std") if normalised else None,
        )

    def _save(self, epoch: int, step: int, totals, metrics: dict[str, Any], best: bool) -> None:
        """Write last.pt (and best.pt) from rank 0; every rank takes part, since each one's RNG state is kept."""
        from resnetkit._version import __version__

        p = self.parts
        rngs = [rng_state()]
        if self.info.enabled:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng_state())
        if not self.info.is_main:
            return
        state = {
            "task": self.cfg.task,
            "model": self.bare_model.state_dict(),
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "classes": self.task.classes,
            "preprocess": dict(self.task.preprocess),
            "config": self.cfg.to_dict(),
            "epoch": epoch,
            "step": step,
            "global_step": p.global_step,
            "totals": totals,
            "optimizer": p.optimizer.state_dict(),
            "scheduler": p.schedule.state_dict(),
            "scaler": p.scaler.state_dict(),
            "model_ema": p.ema.state_dict() if p.ema is not None else None,
            "ema_updates": p.ema.updates if p.ema is not None else 0,
            "rng": rngs,
            "loader": self.train_loader.state_dict(),
            "metrics": metrics,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "budget": self.budget.state_dict() if self.budget is not None else None,
            "switched": self.switched,
            "version": __version__,
            **self.task.checkpoint_extras(),
        }
        save_checkpoint(self.last_path, state)
        if best:
            save_checkpoint(self.best_path, state)
