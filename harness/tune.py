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


def grid_points(space: dict[str, SearchRange], points: int, seed: int) -> list[dict]:
    """Every combination of the grid's values, in a seeded order (the first ``trials`` of them are run)."""
    import itertools
    import random

    values = grid(space, points)
    combos = [dict(zip(values, c, strict=True)) for c in itertools.product(*values.values())]
    random.Random(seed).shuffle(combos)
    return combos


def grid(space: dict[str, SearchRange], points: int) -> dict[str, list]:
    """The grid sampler's values: a range's ``points`` values, log-spaced where ``log`` (integers rounded and
    deduplicated), or its choices."""
    import numpy as np

    out = {}
    for name, r in space.items():
        if r.choices is not None:
            out[name] = list(r.choices)
            continue
        xs = np.clip(
            np.geomspace(r.low, r.high, points) if r.log else np.linspace(r.low, r.high, points), r.low, r.high
        )
        out[name] = sorted({int(round(x)) for x in xs}) if r.integer else [float(x) for x in xs]
    return out


def study_key(cfg: RunConfig) -> str:
    return f"{cfg.model.name}|{cfg.task.name}|{cfg.method}/{cfg.variant}"


def tune_cells(
    suite: Suite, base: list[RunConfig], results_dir: Path, execute: Execute, say: Callable[[str], None] = print
) -> list[RunConfig]:
    """Run (or continue) each base cell's study; return the suite's final cells at each one's best config."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune = suite.tune
    trial_dir = Path(results_dir) / "tuning"
    trial_dir.mkdir(parents=True, exist_ok=True)
    journal = str(trial_dir / "studies.journal")
    storage = _storage(journal)
    direction = "maximize" if tune.objective == "val_accuracy" else "minimize"
    finals = []
    for cfg in base:
        key = study_key(cfg)
        study = optuna.create_study(
            study_name=key, storage=storage, direction=direction, load_if_exists=True, pruner=_pruner(tune.pruner)
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # its runner was killed:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # not counted; proposed again
            study.tell(t.number, state=TrialState.FAIL)
        space = space_for(tune, cfg)
        dists = _distributions(space)
        while (done := len(_counted(study))) < tune.trials:
            study.sampler = _sampler(tune, done)
            if tune.sampler == "grid":  # the next grid point, fixed (Optuna's GridSampler needs optimize())
                points = grid_points(space, tune.trials, tune.seed)
                study.enqueue_trial(points[done % len(points)])
            trial = study.ask(dists)
            info = {"journal": journal, "study": key, "number": trial.number}
            info.update(objective=tune.objective, pruner=tune.pruner, first_point=cfg.train.eval_every)
            rec = execute(with_params(cfg, trial.params, read_test=False, export=False, trial=info), trial_dir)
            value = objective_value(rec, tune.objective)
            if rec.status == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            elif value is None:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)
            study.set_user_attr(f"wall_s_{trial.number}", rec.wall_time_s)
            result = rec.status if rec.status != "ok" else f"{tune.objective} {value:.4g}"
            counted = _counted(study)
            pruned = sum(t.state == TrialState.PRUNED for t in counted)
            best = f"best so far {study.best_value:.4g}" if any(t.state == TrialState.COMPLETE for t in counted) else ""
            say(f"tune {key}: trial {done + 1}/{tune.trials} ({pruned} pruned) {trial.params} → {result}; {best}")
        trials = _counted(study)
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        if not completed:
            say(f"tune {key}: no trial completed; the suite's own hyperparameters are used")
            finals.append(cfg)
            continue
        best = study.best_trial
        tuning = {
            "selected_on": f"validation split ({tune.objective})",
            "objective": tune.objective,
            "best_value": best.value,
            "best_params": best.params,
            "trials": len(trials),
            "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
            "trial_wall_seconds": sum(study.user_attrs.get(f"wall_s_{t.number}", 0.0) for t in trials),
            "sampler": tune.sampler,
            "pruner": tune.pruner,
            "history": [
                {"number": t.number, "params": t.params, "value": t.value, "state": t.state.name} for t in trials
            ],
        }
        finals.append(with_params(cfg, best.params, tuning=tuning))
    return finals


def _counted(study) -> list:
    """Trials that count against the budget: finished (complete, pruned, failed), not those cut short by a
    killed runner."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return [t for t in study.get_trials(deepcopy=False, states=finished) if not t.user_attrs.get("interrupted")]


def _pruner(name: str, first_point: int = 0):
    """Pruners that act on small budgets: the median one once 2 trials finished. None prunes at a trial's first
    validation point (``first_point``, the step of it): early in a run every learning rate still scores the
    majority class (MiniLM at step 20 of 60: 0.555 for nearly all), and pruning there cut the trials that became
    the best ones (tune_quick's first run)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first_point + 1)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_point + 1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_point + 1)
    return optuna.pruners.NopPruner()


def _storage(journal: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(journal))


class TrialReporter:
    """Inside a trial's cell: each validation point goes to the study (Optuna's journal file is safe to share
    between processes); where the study's pruner says stop, :class:`Pruned` ends the run."""

    def __init__(self, trial: dict) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.info = trial
        study = optuna.load_study(
            study_name=trial["study"],
            storage=_storage(trial["journal"]),
            pruner=_pruner(trial["pruner"], trial.get("first_point", 0)),
        )
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == trial["number"])
        self.trial = optuna.trial.Trial(study, trial_id)

    def report(self, step: int, metrics: dict, curve: list[dict]) -> None:
        from harness.trialstate import Pruned

        value = metrics["accuracy"] if self.info["objective"] == "val_accuracy" else metrics["loss"]
        self.trial.report(value, step)
        if self.trial.should_prune():
            what = f"{self.info['objective']} {value:.4g}"
            raise Pruned(f"pruned by the {self.info['pruner']} pruner at step {step} ({what})", step, list(curve))
