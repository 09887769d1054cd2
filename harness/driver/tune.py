"""Every method at its own tuned hyperparameters, chosen on the validation split with the same budget each.

For each (model, task, method/variant) of a suite with a ``tune:`` block, an Optuna study (its journal file in
``RESULTS/tuning/studies.journal``, or the database at ``tune.storage``) proposes ``trials`` configurations. A
trial is a cell: it runs through the same executors as any cell (local: one at a time; Ray: the studies side by
side), in its own process, with its timeout, memory limit and record under ``RESULTS/tuning/``, with
``read_test: false``, so it never reads the test split; its value is the suite's validation objective at the
trial's selected step. Then the best configuration of each method runs on the suite's seeds as ordinary cells
(the test split read there, once per run), each carrying how it was chosen (``config.tuning``).

Killing and rerunning continues a study: finished trials are kept, a trial left running by the killed runner
is marked failed and proposed again. The sampler is seeded per proposal (``tune.seed`` + finished trials), so
an interrupted study proposes what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.driver.pools import CellPool, Execute, LocalPool
from harness.records import RunRecord
from harness.schema import DEFAULT_SPACE, RunConfig, SearchRange, Suite, TrainConfig, Tune
from harness.studies import fmt_params, pruner, public_url, storage


class StorageUnreachable(Exception):
    """The study's database cannot be opened from this machine."""


def with_command_line(suite: Suite, path: str, trials: int | None, storage: str | None) -> Suite:
    """The suite with ``--trials`` / ``--storage``, its storage opened before anything is written or measured."""
    if trials is not None and trials < 1:
        raise ValueError(f"--trials {trials}: the budget must be at least 1 trial per method")
    if suite.tune is None:
        raise ValueError(f"--storage: {path} has no tune: block, so there is no study to store")  # --trials: tune only
    update: dict[str, Any] = {"trials": trials} if trials else {}
    if storage:
        from harness.schema import check_storage_url

        try:
            update["storage"] = check_storage_url(storage)
        except ValueError as err:
            raise ValueError(f"--storage: {err}") from None
    suite = suite.model_copy(update={"tune": suite.tune.model_copy(update=update)})
    if suite.tune.storage:
        openstorage(suite.tune.storage)
    return suite


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
    point = _selected_point(rec)
    return None if point is None else point["accuracy"] if objective == "val_accuracy" else point["loss"]


def _selected_point(rec: RunRecord) -> dict | None:
    if rec.status != "ok" or not rec.validation_curve:
        return None
    return next((p for p in rec.validation_curve if p["step"] == rec.selected_step), rec.validation_curve[-1])


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


def space_sizes(tune: Tune, space: dict[str, SearchRange]) -> dict[str, int] | None:
    """How many values a study can propose per dimension: the grid's points per range (grid), or each choices
    list and integer range (TPE, random); None where a continuous range makes the space infinite."""
    if tune.sampler == "grid":
        return {name: len(v) for name, v in grid(space, tune.trials).items()}
    sizes = {
        name: len(r.choices) if r.choices is not None else int(r.high) - int(r.low) + 1 if r.integer else None
        for name, r in space.items()
    }
    return None if None in sizes.values() else sizes


def budget(tune: Tune, space: dict[str, SearchRange]) -> int:
    """Trials a study runs: ``tune.trials``, or fewer where a grid has fewer points or a finite space fewer
    configurations (a repeated one would run the same configuration on the same seed again)."""
    sizes = space_sizes(tune, space)
    return tune.trials if sizes is None else min(tune.trials, math.prod(sizes.values()))


def space_coverage(tune: Tune, space: dict[str, SearchRange]) -> str | None:
    """One line where a grid's trials are not its points: more points than trials (the seeded first ``trials``
    of them run, the rest never do) or fewer (the study stops when each has run once); for TPE and random, a
    finite space with fewer configurations than trials. None otherwise."""
    sizes = space_sizes(tune, space)
    points = math.prod(sizes.values()) if sizes is not None else None
    if points is None or points == tune.trials or (tune.sampler != "grid" and points > tune.trials):
        return None
    if tune.sampler != "grid":
        return f"the space holds {points} configurations: {points} trials, each once, not the {tune.trials} budgeted"
    dims = " × ".join(f"{name} {n}" for name, n in sizes.items())
    if points > tune.trials:
        return f"a grid of {points} points ({dims}): {tune.trials} trials try {tune.trials} of them, in a seeded order"
    return f"a grid of {points} points ({dims}): {points} trials, each point once, not the {tune.trials} budgeted"


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


def study_key(cfg: RunConfig, tune: Tune) -> str:
    """The study's name: what it tunes, and a digest of the cell (seed aside) and of the tuning settings (budget
    and storage aside), so that a changed suite starts a new study instead of mixing its trials with old ones,
    and many suites can share one database."""
    import hashlib
    import json

    what = {
        "cell": cfg.model_dump(mode="json", exclude={"seed", "tuning", "trial"}),
        "tune": tune.model_dump(mode="json", exclude={"trials", "storage"}),
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.model.name}|{cfg.task.display_name}|{cfg.method}/{cfg.variant}|{digest}"


Status = Callable[[str, str, int, int], None]  # study, text, trials counted, budget


def tune_cells(
    suite: Suite,
    base: list[RunConfig],
    results_dir: Path,
    pool: Execute | CellPool,
    say: Callable[[str], None] = print,
    status: Status | None = None,
) -> list[RunConfig]:
    """Run (or continue) each base cell's study; return the suite's final cells at each one's best config.

    Each study has at most one trial in flight (its next proposal depends on its finished trials, and a
    resumed study must propose what an uninterrupted one would have); studies run side by side where the
    pool has slots (Ray), one after another otherwise."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pool = pool if hasattr(pool, "next_done") else LocalPool(execute=pool)
    tune = suite.tune
    trial_dir = Path(results_dir) / "tuning"
    trial_dir.mkdir(parents=True, exist_ok=True)
    spec = tune.storage or str(trial_dir / "studies.journal")
    storage = openstorage(spec)
    direction = "maximize" if tune.objective == "val_accuracy" else "minimize"
    studies = []
    for cfg in base:
        key = study_key(cfg, tune)
        study = optuna.create_study(
            study_name=key, storage=storage, direction=direction, load_if_exists=True, pruner=pruner(tune.pruner)
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # its runner was killed:
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)  # not counted; proposed again
            study.tell(t.number, state=TrialState.FAIL)
        space = space_for(tune, cfg)
        st = {"cfg": cfg, "key": key, "study": study, "space": space, "dists": _distributions(space)}
        studies.append({**st, "budget": budget(tune, space)})
        if line := space_coverage(tune, space):
            say(f"tune {key}: {line}")
    status = status or (lambda *_: None)
    for st in studies:
        status(st["key"], _summary(st, tune), len(_counted(st["study"])), st["budget"])

    flight: dict[int, tuple[dict, Any]] = {}  # ticket (the study's index) → (study, trial)
    while True:
        for i, st in enumerate(studies):
            if len(flight) >= pool.slots:
                break
            if i in flight or len(_counted(st["study"])) >= st["budget"]:
                continue
            trial = _propose(st, tune)
            info = {"storage": spec, "study": st["key"], "number": trial.number}
            info.update(objective=tune.objective, pruner=tune.pruner, first_point=st["cfg"].train.eval_every)
            cfg = with_params(st["cfg"], trial.params, read_test=False, export=False, trial=info)
            params = fmt_params(trial.params)

            def show(line: str, st=st, params=params) -> None:
                text = f"{_summary(st, tune)} · trial: {params} · {line}"
                status(st["key"], text, len(_counted(st["study"])), st["budget"])

            show("starting")
            pool.submit(i, cfg, trial_dir, show)
            flight[i] = (st, trial)
        if not flight:
            break
        ticket, rec = pool.next_done()
        st, trial = flight.pop(ticket)
        study = st["study"]
        value = objective_value(rec, tune.objective)
        if (point := _selected_point(rec)) is not None:  # breaks ties on validation accuracy (discrete)
            trial.set_user_attr("val_loss", point["loss"])
        if rec.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        elif value is None:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
        study.set_user_attr(f"wall_s_{trial.number}", rec.wall_time_s)
        result = f"{tune.objective} {value:.4g}" if rec.status == "ok" else rec.status
        if rec.status not in ("ok", "pruned") and rec.error:  # why, in one line: the record has the traceback
            result += f": {rec.error.strip().splitlines()[0][:160]}"
        done = len(_counted(study))
        params = fmt_params(trial.params)
        say(f"tune {st['key']}: trial {done}/{st['budget']} ({params}) → {result}; {_summary(st, tune)}")
        status(st["key"], _summary(st, tune), done, st["budget"])
    return [_final(st, tune, spec, say) for st in studies]


def _propose(st: dict, tune: Tune):
    from optuna.trial import TrialState

    study = st["study"]
    done = len(_counted(study))
    if tune.sampler == "grid":  # the next grid point, fixed (Optuna's GridSampler needs optimize())
        study.sampler = _sampler(tune, done)
        points = grid_points(st["space"], tune.trials, tune.seed)
        study.enqueue_trial(points[done % len(points)])
        return study.ask(st["dists"])
    # A finite space (choices, integers): TPE's first 10 proposals and the random sampler draw with replacement,
    # and a configuration that already ran would run again on the same seed, to the same result. Such a draw
    # is told as a failure marked "duplicate" (not counted, never run) and the sampler draws again, seeded past
    # it: a resumed study replays the same draws from the same history.
    finite = space_sizes(tune, st["space"]) is not None
    seen = {tuple(sorted(t.params.items())) for t in _counted(study)} if finite else set()
    skipped = sum(bool(t.user_attrs.get("duplicate")) for t in study.get_trials(deepcopy=False))
    for _ in range(100):
        study.sampler = _sampler(tune, done + skipped)
        trial = study.ask(st["dists"])
        if tuple(sorted(trial.params.items())) not in seen:
            return trial
        trial.set_user_attr("duplicate", True)
        study.tell(trial, state=TrialState.FAIL)
        skipped += 1
    study.sampler = _sampler(tune, done + skipped)
    return study.ask(st["dists"])  # a large space nearly exhausted: after 100 draws, a repeat is accepted


def _summary(st: dict, tune: Tune) -> str:
    """Trials done and pruned, and the best value so far: the study's line in the progress display."""
    from optuna.trial import TrialState

    study = st["study"]
    counted = _counted(study)
    pruned = sum(t.state == TrialState.PRUNED for t in counted)
    text = f"{len(counted)}/{st['budget']} trials, {pruned} pruned"
    if any(t.state == TrialState.COMPLETE for t in counted):
        text += f", best {tune.objective} {study.best_value:.4g}"
    return text


def _final(st: dict, tune: Tune, spec: str, say: Callable[[str], None]) -> RunConfig:
    """The base cell at the study's best trial, carrying how it was chosen and what tuning cost."""
    from optuna.trial import TrialState

    cfg, study = st["cfg"], st["study"]
    trials = _counted(study)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        say(f"tune {st['key']}: no trial completed; the suite's own hyperparameters are used")
        return cfg
    best, tied = _best(study, tune)
    if tied > 1:
        say(
            f"tune {st['key']}: {tied} trials tied at {tune.objective} {best.value:.4g}; the one with the lowest"
            f" validation loss is taken ({fmt_params(best.params)})"
        )
    tuning = {
        "selected_on": f"validation split ({tune.objective})",
        "objective": tune.objective,
        "best_value": best.value,
        "best_params": best.params,
        "tied_at_best": tied,
        "trials": len(trials),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        "trial_wall_seconds": sum(study.user_attrs.get(f"wall_s_{t.number}", 0.0) for t in trials),
        "sampler": tune.sampler,
        "pruner": tune.pruner,
        "study": st["key"],
        "storage": public_url(spec),
        "history": [
            {"number": t.number, "params": t.params, "value": t.value, "state": t.state.name}
            | ({"val_loss": t.user_attrs["val_loss"]} if "val_loss" in t.user_attrs else {})
            for t in trials
        ],
    }
    return with_params(cfg, best.params, tuning=tuning)


def _best(study, tune: Tune) -> tuple[Any, int]:
    """The best complete trial and how many tied at its value. Validation accuracy is a count over the split, so
    trials tie (often every trial that only learned the majority class): among them the lowest validation loss
    wins, then the earliest trial. A tie on validation loss keeps Optuna's best (the earliest)."""
    from optuna.trial import TrialState

    best = study.best_trial
    tied = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value == best.value]
    if tune.objective == "val_accuracy" and len(tied) > 1:
        best = min(tied, key=lambda t: (t.user_attrs.get("val_loss", math.inf), t.number))
    return best, len(tied)


def _counted(study) -> list:
    """Trials that count against the budget: finished (complete, pruned, failed), not those cut short by a
    killed runner nor the draws of a configuration that had already run (never run themselves)."""
    from optuna.trial import TrialState

    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    ignored = ("interrupted", "duplicate")
    return [t for t in study.get_trials(deepcopy=False, states=finished) if not any(map(t.user_attrs.get, ignored))]


def openstorage(spec: str):
    """The storage, or :class:`StorageUnreachable` in one line."""
    try:
        return storage(spec)
    except Exception as err:  # a driver not installed (psycopg2, pymysql), a server not reachable
        first = (str(err).strip().splitlines() or [""])[0][:300]
        what = f"tune.storage {public_url(spec)}: cannot open it: {type(err).__name__}: {first}"
        raise StorageUnreachable(what) from err
