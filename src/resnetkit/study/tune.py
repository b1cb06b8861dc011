"""`tune`: hyperparameter search with Optuna over runs of the one engine: a TPE sampler, and a median pruner fed the
validation metric after every epoch. Any number of `tune` processes, on one machine or many, share one study
through Optuna's storage: an SQLite file on one machine, a PostgreSQL or MySQL URL across machines.

    resnetkit tune --config configs/cifar10_resnet20.yaml --space space.yaml --trials 40
    resnetkit tune --config ... --space space.yaml --trials 40 --storage postgresql://user:pw@db/optuna --study r20

SPACE.yaml maps dotted config keys (or whole sections, as `compare --vary` takes them) to a range or choices:

    optim.lr: {low: 0.01, high: 1.0, log: true}
    train.epochs: {low: 2, high: 8, int: true}
    optim.name: [sgd, adam, rmsprop]
    optim.momentum_warmup.start: {low: 0.3, high: 0.9}
    optim.switch: [null, {epoch: 3, name: sgd, lr: 0.05}]
    optim: [sgdm, nag, adam]

`--trials N` is the study's total: every process stops once N trials exist, whichever process ran them (each trial
is claimed once, through the number the storage gives it), so a stopped study continues where it was when run
again, and `--trials` above the trials done extends it. A trial interrupted by Ctrl-C is given back (a rerun
replaces it). A trial whose process died (killed, out of memory, a machine lost) stops sending Optuna's heartbeat
(every --heartbeat seconds, 30 by default); once it has been silent for four beats the next worker to ask for a
trial marks it failed and runs it again as a new trial with the same values, resuming the dead run's folder from
its last checkpoint (Optuna's RetryHeartbeatStaleTrialCallback, up to two retries). Trial 0 of a new study is the
base recipe itself (no value sampled): the reference the pruner compares the first sampled trials against, and the
result to beat. The TPE sampler of the process that creates the study is seeded with the recipe's seed, so a study
run by one process samples the same values again; processes that join one draw their own (with one seed they
would all suggest the same values).

Study folder (default <output_dir>/<study>/, the study named <name>-tune by default): trial-NNNN/ (each trial's
run folder), study.db (the default storage), best.yaml (the best trial's recipe, ready for `resnetkit train`),
trials.md and trials.csv, history.png and importance.png (Optuna's optimisation-history and parameter-importance
plots; the latter once two sampled trials have completed).
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resnetkit.config import Config, ConfigError, load_config, save_config
from resnetkit.study.recipe import flow, with_values

_RANGE_KEYS = {"low", "high", "log", "int", "step"}
_PRIMITIVES = (type(None), bool, int, float, str)


@dataclass
class Dimension:
    """One searched key: a float or int range (optionally log-scaled or stepped), or a list of choices."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    int: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @property
    def encoded(self) -> bool:
        """Choices Optuna cannot store as they are (mappings, lists) travel as JSON text."""
        return self.choices is not None and not all(isinstance(c, _PRIMITIVES) for c in self.choices)

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            if self.encoded:
                return json.loads(trial.suggest_categorical(self.key, [json.dumps(c) for c in self.choices]))
            return trial.suggest_categorical(self.key, self.choices)
        if self.int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def value(self, param: Any) -> Any:
        """A trial's stored parameter as the config value it stands for."""
        return json.loads(param) if self.encoded else param

    def corners(self) -> list[Any]:
        """Values that check the key against the config before anything runs: every choice, or both ends."""
        if self.choices is not None:
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.int else [self.low, self.high]


def load_space(space: str | Path | Mapping[str, Any]) -> dict[str, Dimension]:
    """A search space from SPACE.yaml (or its dict), each entry checked for its form."""
    source = "search space"
    if not isinstance(space, Mapping):
        path = Path(space)
        if not path.is_file():
            raise FileNotFoundError(f"search space file not found: {path}")
        source = str(path)
        try:
            space = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(space, Mapping):
            raise ConfigError(f"{path}: expected a mapping of config keys to ranges or choices")
    if not space:
        raise ConfigError(f"{source}: no key to search")
    form = "expected {low: A, high: B} (with log: true, int: true or step: S) or a list of choices"
    dims = {}
    for key, entry in space.items():
        where = f"{source}: {key}"
        if isinstance(entry, list):
            if not entry:
                raise ConfigError(f"{where}: an empty list of choices")
            dims[key] = Dimension(key, choices=entry)
            continue
        if not isinstance(entry, Mapping) or not {"low", "high"} <= set(entry) or set(entry) - _RANGE_KEYS:
            raise ConfigError(f"{where}: {form}, got {entry!r}")
        d = Dimension(
            key, entry["low"], entry["high"], bool(entry.get("log")), bool(entry.get("int")), entry.get("step")
        )
        try:
            d.low, d.high = float(d.low), float(d.high)  # YAML 1.1 reads 1e-3 as text
            d.step = None if d.step is None else float(d.step)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: low, high and step must be numbers, got {entry!r}") from None
        if not d.low < d.high or (d.log and d.low <= 0) or (d.log and d.step is not None):
            raise ConfigError(f"{where}: need low < high (and low > 0 and no step with log: true), got {entry!r}")
        dims[key] = d
    return dims


def check_space(base: Config, space: Mapping[str, Dimension], source: str = "search space") -> None:
    """Every key and each choice (or both ends of a range) must make a valid config: errors come before a trial."""
    for d in space.values():
        for value in d.corners():
            with_values(base, {d.key: value}, f"{source}: {d.key}={flow(value)}")


@dataclass
class TuneResult:
    out_dir: Path
    study_name: str
    storage: str
    metric: str
    trials_run: int = 0
    """Trials this process ran."""
    best_value: float | None = None
    best_values: dict[str, Any] = field(default_factory=dict)
    """The best trial's config values ({} for the base recipe)."""
    best_config: Path | None = None
    table: Path | None = None
    history: Path | None = None
    importance: Path | None = None
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False


class _Pruning:
    """Reports the validation metric to the trial after every epoch; the median pruner may end the run there."""

    def __init__(self, trial, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_epoch(self, run, epoch: int, row: dict[str, Any]) -> None:
        import optuna

        value = row.get(self.metric)
        if value is None:  # not an evaluated epoch (train.eval_every)
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric}={value:.4f}")


MAX_RETRIES = 2
"""How often a trial whose worker died is run again before it counts as failed."""
OPEN_ATTEMPTS, OPEN_RETRY_SECONDS = 5, 0.5
"""How often, and how far apart, a worker tries to open a storage that another worker is creating."""


def _storage(url: str, heartbeat: int):
    """Optuna's RDB storage with its heartbeat: a running trial silent for four beats is failed by the next worker
    and enqueued again with its values. An SQLite file waits for its lock instead of failing when workers write."""
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}

    def open_once():
        with warnings.catch_warnings():  # the heartbeat and its retry callback are marked experimental
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=4 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            )

    for attempt in range(1, OPEN_ATTEMPTS + 1):
        try:
            return open_once()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # Two workers started together both found a new database and both wrote its schema version: the
            # other one won (or is still creating a table), so opening it again succeeds.
            if attempt == OPEN_ATTEMPTS:
                raise
            time.sleep(OPEN_RETRY_SECONDS)


class _Heartbeat:
    """Records the trial's heartbeat in the storage every `interval` seconds while its run trains (what
    Study.optimize does for its own trials; `tune` asks and tells, so it beats here)."""

    def __init__(self, storage, trial_id: int, interval: int) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _open_study(
    name: str, storage, direction: str, metric: str, space: Mapping[str, Dimension], startup: int, base, seed: int
):
    """Create the study (its creator enqueues the base trial and seeds its sampler), or join it after checking it
    searches the same."""
    import optuna

    def sampler(seed: int | None):
        return optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True, seed=seed)

    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    fingerprint = json.dumps({k: vars(d) for k, d in space.items()}, sort_keys=True, default=str)
    try:
        study = optuna.create_study(
            storage=storage, sampler=sampler(seed), pruner=pruner, study_name=name, direction=direction
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = None
    if study is None:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler(None), pruner=pruner)
        if study.direction.name.lower() != direction:
            raise ValueError(f"study {name!r} {study.direction.name.lower()}s; this one would {direction} {metric}")
        attrs = study.user_attrs
        if attrs.get("metric", metric) != metric or attrs.get("space", fingerprint) != fingerprint:
            raise ValueError(
                f"study {name!r} was started with another metric or search space: give this one another --study"
            )
        return study
    study.set_user_attr("metric", metric)
    study.set_user_attr("space", fingerprint)
    if base:
        study.enqueue_trial({}, user_attrs={"base": True})
    return study


def _retried(trials) -> set[int]:
    """Numbers of the trials whose worker died and that were run again as another trial."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _counted_trials(study) -> list:
    """The trials that count towards --trials: all but those given back and those run again as another trial."""
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    return [t for t in trials if not t.user_attrs.get("given_back") and t.number not in retried]


def _counted(study, before: int | None = None) -> int:
    """How many trials that a worker has claimed count towards --trials (an enqueued trial, the base recipe or a
    dead worker's trial to run again, is not yet claimed), or how many of all those numbered below `before` do."""
    from optuna.trial import TrialState

    if before is None:
        return sum(t.state != TrialState.WAITING for t in _counted_trials(study))
    return sum(t.number < before for t in _counted_trials(study))


def _give_back(study, trial, why: str) -> None:
    """End a trial that must not count: one asked for past the total, or one interrupted (a rerun replaces it)."""
    import optuna

    trial.set_user_attr("given_back", why)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def tune(
    config: Config | str | Path,
    space: str | Path | Mapping[str, Any],
    trials: int,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    storage: str | None = None,
    study_name: str | None = None,
    out: str | Path | None = None,
    startup_trials: int = 5,
    base_trial: bool = True,
    heartbeat: int = 30,
    quiet: bool = False,
) -> TuneResult:
    """Run trials of the study until it holds `trials` of them, then write its best recipe, table and plots.

    config: the base recipe (a Config, or a YAML path with `overrides`); space: SPACE.yaml or its dict.
    storage: an Optuna storage URL (default sqlite:///<out>/study.db); study_name: default <name>-tune.
    startup_trials: trials sampled at random before TPE models the results, and finished before the pruner prunes.
    base_trial: trial 0 of a new study is the base recipe as it is.
    heartbeat: seconds between a running trial's heartbeats; one silent for four is failed and run again.
    """
    import optuna

    from resnetkit.tasks import get_task
    from resnetkit.train.fit import train
    from resnetkit.train.loop import NonFiniteLoss

    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    base = config if isinstance(config, Config) else load_config(config, list(overrides))
    dims = load_space(space)
    check_space(base, dims, str(space) if not isinstance(space, Mapping) else "search space")
    study_name = study_name or f"{base.name}-tune"
    out_dir = Path(out) if out is not None else Path(base.output_dir) / study_name
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    metric = base.train.metric or get_task(base.task).metric
    direction = "minimize" if metric.endswith("loss") else "maximize"
    storage = _storage(url, heartbeat)
    study = _open_study(study_name, storage, direction, metric, dims, startup_trials, base_trial, base.seed)
    result = TuneResult(out_dir, study_name, url, metric)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def say(msg: str) -> None:
        if not quiet:
            print(f"tune {study_name}: {msg}", flush=True)

    while True:
        with warnings.catch_warnings():  # Optuna's heartbeat API is marked experimental and meant for optimize()
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed, and enqueued again
            if _counted(study) >= trials:
                break
            trial = study.ask()
        # Between the count above and this ask another worker may have taken the last trial: give this one back.
        if _counted(study, before=trial.number) >= trials:
            _give_back(study, trial, "surplus")
            break
        is_base = bool(trial.user_attrs.get("base"))
        values = {} if is_base else {key: d.suggest(trial) for key, d in dims.items()}
        # A retry (its worker died) carries the dead trial's user attributes: it continues that trial's run folder.
        name = Path(trial.user_attrs.get("run_dir", f"trial-{trial.number:04d}")).name
        cfg = with_values(base, {**values, "output_dir": str(out_dir), "name": name})
        resume = (cfg.run_dir / "last.pt").is_file()
        again = f", again for a dead worker, resuming {name}" if "worker" in trial.user_attrs else ""
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("run_dir", str(cfg.run_dir))
        shown = "the base recipe" if is_base else ", ".join(f"{k}={_cell(v)}" for k, v in values.items())
        say(f"trial {trial.number} ({worker}{again}): {shown}")
        result.trials_run += 1
        try:
            with _Heartbeat(storage, trial._trial_id, heartbeat):  # Optuna has no public name for the id
                run = train(cfg, resume=resume, quiet=quiet, callbacks=[_Pruning(trial, metric)])
        except optuna.TrialPruned as e:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            say(f"trial {trial.number} {e}")
            continue
        except NonFiniteLoss as e:  # a poor corner of the space, not a broken study
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            say(f"trial {trial.number} failed: {e}")
            continue
        except KeyboardInterrupt:  # a second Ctrl-C, which the engine does not wait on
            _give_back(study, trial, "interrupted")
            raise
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if run.interrupted:
            _give_back(study, trial, "interrupted")
            result.interrupted = True
            break
        value = run.metrics.get(f"best_{metric}")
        if value is None:
            trial.set_user_attr("error", f"no {metric}: does the recipe have a validation split?")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise ValueError(f"trial {trial.number}: the run reported no {metric} (data.val_split?)")
        study.tell(trial, float(value))
        say(f"trial {trial.number} finished: best {metric} {value:.4f}")
    write_study_report(study, base, dims, result)
    return result


def trial_values(trial, space: Mapping[str, Dimension]) -> dict[str, Any]:
    """The config values a trial ran with ({} for the base trial)."""
    return {k: space[k].value(v) for k, v in trial.params.items() if k in space}


def write_study_report(study, base: Config, space: Mapping[str, Dimension], result: TuneResult) -> TuneResult:
    """best.yaml, trials.md and trials.csv, history.png and importance.png into result.out_dir, from the storage
    (so any worker, on any machine, writes the same report)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState

    from resnetkit.evaluation.figures import save_figure
    from resnetkit.evaluation.report import table_md
    from resnetkit.fileio import write_atomic

    out = result.out_dir
    trials = _counted_trials(study)
    header = ["trial", "state", result.metric, "epochs", *space, "seconds", "worker"]
    rows = []
    for t in trials:
        steps = sorted(t.intermediate_values)
        if t.value is not None:
            value = f"{t.value:.4f}"
        elif steps:
            value = f"{t.intermediate_values[steps[-1]]:.4f} (epoch {steps[-1]})"
        else:
            value = t.user_attrs.get("error", "-")
        values = trial_values(t, space)
        cells = [_cell(values[k]) if k in values else ("(base)" if t.user_attrs.get("base") else "") for k in space]
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration is not None else "-"
        state = t.state.name.lower()
        if t.system_attrs.get("retry_history"):
            state += f" (retry of {', '.join(map(str, t.system_attrs['retry_history']))})"
        rows.append([t.number, state, value, len(steps), *cells, seconds, t.user_attrs.get("worker")])
    result.table = out / "trials.md"
    write_atomic(result.table, table_md(rows, header) + "\n")
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    write_atomic(out / "trials.csv", text.getvalue())

    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        result.best_value, result.best_values = best.value, trial_values(best, space)
        cfg = with_values(base, {**result.best_values, "name": f"{study.study_name}-best"})
        result.best_config = out / "best.yaml"
        shown = ", ".join(f"{k}={flow(v)}" for k, v in result.best_values.items()) or "the base recipe"
        head = (
            f"# resnetkit tune: the best of {len(trials)} trials of study {study.study_name!r} ({result.metric} "
            f"{best.value:.4f}, trial {best.number}: {shown}).\n"
            f"# Train it: resnetkit train --config {result.best_config}\n"
        )
        save_config(cfg, result.best_config, header=head)
    else:
        result.notes.append("no trial has completed yet: no best.yaml")

    with warnings.catch_warnings():  # Optuna's matplotlib plots are marked experimental
        warnings.simplefilter("ignore")
        if complete:
            ax = optuna.visualization.matplotlib.plot_optimization_history(study, target_name=result.metric)
            ax.figure.tight_layout()
            result.history = save_figure(ax.figure, out / "history.png")
        sampled = [t for t in complete if set(space) <= set(t.params)]
        if len(sampled) >= 2:
            # PED-ANOVA (Optuna's default from 4.x on, named here so older versions need no scikit-learn either)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=evaluator, params=list(space), target_name=result.metric
            )
            ax.figure.tight_layout()
            result.importance = save_figure(ax.figure, out / "importance.png")
        else:
            result.notes.append(f"parameter importance needs two completed sampled trials ({len(sampled)} so far)")
    return result


def _cell(value: Any) -> str:
    """A sampled value as a table shows it: floats to 4 significant digits (best.yaml keeps them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else flow(value)
