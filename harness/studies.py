"""Optuna studies as both processes meet them: how a study's storage is opened (a journal file or a database),
its pruner, a URL as records may show it, a parameter as text. The driver proposes trials (:mod:`harness.driver.tune`);
a trial's cell reports its validation curve (:mod:`harness.cell.trial`)."""

from __future__ import annotations


def fmt_param(v) -> str:
    """A hyperparameter value as text: floats to 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def fmt_params(params: dict) -> str:
    """Hyperparameters as text, ``lr 0.0003, config.r 8``."""
    return ", ".join(f"{k} {fmt_param(v)}" for k, v in params.items())


def pruner(name: str, first_point: int = 0):
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


def storage(spec: str):
    """A database URL (sqlite:///, postgresql://, mysql://: Optuna's RDBStorage, for many machines) or the path
    of a journal file (the default, in the results dir: no server, safe between processes of one machine)."""
    if "://" in spec:
        from optuna.storages import RDBStorage

        return RDBStorage(spec)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(spec))


def public_url(spec: str) -> str:
    """The storage as records may keep it: a URL's password hidden."""
    if "://" not in spec:
        return spec
    from sqlalchemy.engine import make_url

    return make_url(spec).render_as_string(hide_password=True)
