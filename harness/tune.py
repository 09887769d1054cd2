"""Every method at its own tuned hyperparameters, chosen on the validation split with the same budget each.

For each (model, task, method/variant) of a suite with a ``tune:`` block, an Optuna study (its journal file in
``RESULTS/tuning/studies.journal``) proposes ``trials`` configurations. A trial is a cell: it runs through the
same executor as any cell (its own process, timeout, memory limit, record under ``RESULTS/tuning/``), with
``read_test: false``, so it never reads the test split; its value is the suite's validation objective at the
trial's selected step. Then the best configuration of each method runs on the suite's seeds as ordinary cells
(the test split read there, once per run), each carrying how it was chosen (``config.tuning``).

Killing and rerunning continues a study: finished trials are kept, a trial left running by the killed runner
is marked failed and proposed again. The sampler is seeded per proposal (``tune.seed`` + finished trials), so
an interrupted study proposes what an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.records import RunRecord
from harness.schema import DEFAULT_SPACE, RunConfig, SearchRange, Suite, TrainConfig, Tune

Execute = Callable[[RunConfig, Path], RunRecord]


def space_for(tune: Tune, cfg: RunConfig) -> dict[str, SearchRange]:
    """A method's search space: by ``method/variant``, else by method name, else the default (lr)."""
    raw = tune.space.get(f"{cfg.method}/{cfg.variant}") or tune.space.get(cfg.method)
    return raw or {k: SearchRange.model_validate(v) for k, v in DEFAULT_SPACE.items()}


def _distributions(space: dict[str, SearchRange]) -> dict:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, r in space.items():
        if r.choices is not None:
            out[name] = CategoricalDistribution(r.choices)
        elif r.integer:
            out[name] = IntDistribution(int(r.low), int(r.high), log=r.log)
        else:
            out[name] = FloatDistribution(r.low, r.high, log=r.log)
    return out


def with_params(cfg: RunConfig, params: dict[str, Any], **update) -> RunConfig:
    """The cell with a trial's values: ``config.<field>`` into the method config, the rest into ``train``."""
    method = {
        **cfg.method_config,
        **{k.removeprefix("config."): v for k, v in params.items() if k.startswith("config.")},
    }
    train = TrainConfig.model_validate(
        {**cfg.train.model_dump(), **{k: v for k, v in params.items() if not k.startswith("config.")}}
    )
    return cfg.model_copy(update={"method_config": method, "train": train, **update})


def objective_value(rec: RunRecord, objective: str) -> float | None:
    """The trial's validation score at its selected step (the last one unless ``train.select`` says otherwise)."""
    if rec.status != "ok" or not rec.validation_curve:
        return None
    point = next((p for p in rec.validation_curve if p["step"] == rec.selected_step), rec.validation_curve[-1])
    return point["accuracy"] if objective == "val_accuracy" else point["loss"]


def _sampler(tune: Tune, finished: int):
    import optuna

    seed = tune.seed + finished  # per proposal: a resumed study proposes what an uninterrupted one would have
    return optuna.samplers.TPESampler(seed=seed) if tune.sampler == "tpe" else optuna.samplers.RandomSampler(seed)


def study_key(cfg: RunConfig) -> str:
    return f"{cfg.model.name}|{cfg.task.name}|{cfg.method}/{cfg.variant}"


def tune_cells(
    suite: Suite, base: list[RunConfig], results_dir: Path, execute: Execute, say: Callable[[str], None] = print
) -> list[RunConfig]:
    """Run (or continue) each base cell's study; return the suite's final cells at each one's best config."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = suite.tune
    trial_dir = Path(results_dir) / "tuning"
    trial_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(trial_dir / "studies.journal")))
    direction = "maximize" if tune.objective == "val_accuracy" else "minimize"
    finals = []
    for cfg in base:
        study = optuna.create_study(
            study_name=study_key(cfg), storage=storage, direction=direction, load_if_exists=True
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # its runner was killed:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # not counted; proposed again
            study.tell(t.number, state=TrialState.FAIL)
        dists = _distributions(space_for(tune, cfg))
        while (done := _finished(study)) < tune.trials:
            study.sampler = _sampler(tune, done)
            trial = study.ask(dists)
            cell = with_params(cfg, trial.params, read_test=False, export=False)
            rec = execute(cell, trial_dir)
            value = objective_value(rec, tune.objective)
            if value is None:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)
            say(f"tune {study_key(cfg)}: trial {done + 1}/{tune.trials} {trial.params} → {tune.objective} {value}")
        trials = _counted(study)
        history = [{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name} for t in trials]
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if not completed:
            say(f"tune {study_key(cfg)}: every trial failed; the suite's own hyperparameters are used")
            finals.append(cfg)
            continue
        best = study.best_trial
        cost = sum(_trial_seconds(trial_dir, with_params(cfg, t.params, read_test=False, export=False)) for t in trials)
        tuning = {
            "selected_on": f"validation split ({tune.objective})",
            "objective": tune.objective,
            "best_value": best.value,
            "best_params": best.params,
            "trials": len(trials),
            "trials_failed": len(trials) - len(completed),
            "trial_wall_seconds": cost,
            "sampler": tune.sampler,
            "history": history,
        }
        finals.append(with_params(cfg, best.params, tuning=tuning))
    return finals


def _counted(study) -> list:
    """Trials that count against the budget: completed or failed, not those cut short by a killed runner."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=finished) if not t.user_attrs.get("interrupted")]


def _finished(study) -> int:
    return len(_counted(study))


def _trial_seconds(trial_dir: Path, cell: RunConfig) -> float:
    from harness.records import read_record, record_path

    p = record_path(trial_dir, cell.cell_id)
    try:
        return read_record(p).wall_time_s
    except (OSError, ValueError):
        return 0.0
