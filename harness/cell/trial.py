"""Inside a tuning trial's cell: each validation point goes to the trial's study, whose pruner may stop it."""

from __future__ import annotations

from harness.studies import pruner, public_url, storage


class TrialReporter:
    """Inside a trial's cell: each validation point goes to the study (Optuna's journal file is safe to share
    between processes); where the study's pruner says stop, :class:`Pruned` ends the run."""

    def __init__(self, trial: dict) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.info = trial
        where = trial.get("storage") or trial["journal"]
        try:
            study = optuna.load_study(
                study_name=trial["study"],
                storage=storage(where),
                pruner=pruner(trial["pruner"], trial.get("first_point", 0)),
            )
        except Exception as err:  # a worker that cannot reach the driver's journal file, a database down
            raise RuntimeError(
                f"this trial cannot reach its study's storage ({public_url(where)}): {type(err).__name__}: {err}. "
                "On a cluster without a filesystem shared with the driver, set tune.storage (or --storage) to a "
                "database URL every machine reaches"
            ) from err
        trial_id = next(t._trial_id for t in study.get_trials(deepcopy=False) if t.number == trial["number"])
        self.trial = optuna.trial.Trial(study, trial_id)

    def report(self, step: int, metrics: dict, curve: list[dict]) -> None:
        from harness.contract import Pruned

        value = metrics["accuracy"] if self.info["objective"] == "val_accuracy" else metrics["loss"]
        self.trial.report(value, step)
        if self.trial.should_prune():
            what = f"{self.info['objective']} {value:.4g}"
            raise Pruned(f"pruned by the {self.info['pruner']} pruner at step {step} ({what})", step, list(curve))
