"""Tuning on the validation split (harness/driver/tune.py): the test split is never read by a trial and read once
after training by each final run (the calls are counted); an interrupted study continues where it stopped and
ends where an uninterrupted one does."""

import pytest

from harness.cell.run import run_cell
from harness.driver.suite import expand, parse_suite
from harness.driver.tune import tune_cells, with_params
from harness.records import RunRecord
from tests.conftest import run_cli, tiny_suite

TUNE = {
    "trials": 3,
    "sampler": "random",
    "seed": 7,
    "space": {"lora": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}},
}


def _suite(steps: int = 4, **tune):
    data = tiny_suite(
        methods=[{"method": "lora", "config": {"r": 4}}],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 32}],
        seeds=[0, 1],
    )
    data["train"] = {**data["train"], "steps": steps, "eval_every": 2, "val_examples": 32}
    data["export"] = False
    data["tune"] = {**TUNE, **tune}
    return parse_suite(data, "<test>")


@pytest.fixture
def splits(monkeypatch):
    """Every evaluation's split, in order (the classifier IO's evaluate, spied on; cells run in this process)."""
    from harness.tasks.classifier import ClassifierIO

    seen, real = [], ClassifierIO.evaluate

    def spy(self, model, batch_size, dtype, device, split="test"):
        seen.append(split)
        return real(self, model, batch_size, dtype, device, split)

    monkeypatch.setattr(ClassifierIO, "evaluate", spy)
    return seen


def _tune(suite, d, execute=None):
    base = [c for c in expand(suite) if c.seed == suite.seeds[0]]
    ran = []

    def in_process(cfg, trial_dir):
        ran.append(cfg.train.lr)
        return run_cell(cfg, trial_dir)

    return tune_cells(suite, base, d, execute or in_process, say=lambda _: None), ran


def test_trials_never_read_the_test_split_and_final_runs_read_it_once_after_training(tmp_path, splits):
    suite = _suite()
    (best,), ran = _tune(suite, tmp_path)
    assert len(ran) == 3 and "test" not in splits and splits.count("validation") == 3 * 2  # steps 2 and 4
    t = best.tuning
    assert t["trials"] == 3 and t["selected_on"] == "validation split (val_accuracy)" and len(t["history"]) == 3
    assert best.train.lr == t["best_params"]["lr"] and t["best_value"] == max(h["value"] for h in t["history"])
    for seed in suite.seeds:  # the final runs: the tuned config on every seed of the suite
        splits.clear()
        cfg = with_params(best.model_copy(update={"seed": seed}), {})
        rec = run_cell(cfg, tmp_path)
        assert rec.status == "ok" and rec.config["tuning"]["best_params"] == t["best_params"]
        assert splits == ["validation", "validation", "test", "test"]  # the curve, the trained and untrained model
        assert rec.eval_after.examples == rec.eval_before.examples == len(rec.eval_after.correct)
    trial_records = list((tmp_path / "tuning" / "records").glob("*.json"))
    assert len(trial_records) == 3
    from reports.html import write_report

    page = write_report(tmp_path).read_text()  # the tuning section, with Optuna's own figure of the study
    assert "Hyperparameters: tuned on the validation split" in page and 'id="fig-tune-lr-0"' in page
    assert "optimization history" in page and "tuned: 3 trials on val_accuracy (lr " in page
    assert "<th>validation loss</th>" in page  # the tie-break's figure, per trial


def test_an_interrupted_study_resumes_without_repeating_trials_and_ends_like_an_uninterrupted_one(tmp_path):
    suite = _suite()
    (whole,), whole_ran = _tune(suite, tmp_path / "whole")

    calls = []

    def dies_on_the_second(cfg, trial_dir):
        calls.append(cfg.train.lr)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the runner is killed mid-trial: that trial stays RUNNING in the journal
        return run_cell(cfg, trial_dir)

    with pytest.raises(KeyboardInterrupt):
        _tune(suite, tmp_path / "cut", dies_on_the_second)
    (resumed,), resumed_ran = _tune(suite, tmp_path / "cut")
    assert len(set(whole_ran)) == 3  # three different proposals
    assert len(resumed_ran) == 2  # the finished first trial is not run again; the interrupted one is
    assert calls[0] == whole_ran[0] and resumed_ran == whole_ran[1:]  # the same proposals, in the same order
    assert resumed.tuning["best_params"] == whole.tuning["best_params"]
    assert [h["params"] for h in resumed.tuning["history"]] == [h["params"] for h in whole.tuning["history"]]


def test_the_trials_option_of_the_command_line_is_the_budget(tmp_path):
    from harness.driver.cli import main

    path = tmp_path / "s.yaml"
    import yaml

    data = tiny_suite(methods=[{"method": "lora", "config": {"r": 4}}], seeds=[0])
    data["train"] = {**data["train"], "eval_every": 2}
    data["export"] = False
    data["tune"] = TUNE
    path.write_text(yaml.safe_dump(data))
    assert main(["tune", str(path), "--results", str(tmp_path / "r"), "--trials", "0"]) == 2
    assert not (tmp_path / "r").exists()


def _steps_trained(trial_dir) -> tuple[int, list[str]]:
    from harness.records import read_record

    recs = [read_record(p) for p in sorted((trial_dir / "records").glob("*.json"))]
    return sum(r.validation_curve[-1]["step"] for r in recs), [r.status for r in recs]


def test_pruning_saves_steps_on_the_same_seed(tmp_path):
    """The median pruner on the validation loss: the same proposals (same sampler seed), fewer steps trained
    (never pruned at a trial's first validation point: step 2 of 6 here)."""
    space = {"lora": {"lr": {"low": 1e-4, "high": 3.0, "log": True}}}
    common = {"trials": 5, "objective": "val_loss", "seed": 3, "space": space}
    _, ran_full = _tune(_suite(6, **common, pruner="none"), tmp_path / "none")
    (pruned,), ran_pruned = _tune(_suite(6, **common, pruner="median"), tmp_path / "median")
    assert ran_pruned == ran_full  # the same trials were proposed
    steps_full, status_full = _steps_trained(tmp_path / "none" / "tuning")
    steps_pruned, status_pruned = _steps_trained(tmp_path / "median" / "tuning")
    assert status_full == ["ok"] * 5 and "pruned" in status_pruned
    assert steps_pruned < steps_full == 5 * 6
    from harness.records import read_record

    stopped = [read_record(p) for p in (tmp_path / "median" / "tuning" / "records").glob("*.json")]
    assert all(r.validation_curve[-1]["step"] >= 4 for r in stopped if r.status == "pruned")
    assert pruned.tuning["trials_pruned"] == status_pruned.count("pruned") and pruned.tuning["trials"] == 5


def test_the_grid_sampler_tries_each_log_spaced_point_once(tmp_path):
    suite = _suite(sampler="grid", space={"lora": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    (best,), ran = _tune(suite, tmp_path)
    assert sorted(ran) == pytest.approx([1e-4, 1e-3, 1e-2]) and best.tuning["sampler"] == "grid"


def _scripted(loss_of):
    """An executor that trains nothing: every trial scores validation accuracy 0.5 (as trials that only learned
    the majority class do) at the validation loss ``loss_of(cfg)``."""
    from harness.records import make_record, now_iso

    ran = []

    def execute(cfg, trial_dir):
        ran.append(cfg)
        curve = [{"step": 4, "accuracy": 0.5, "loss": loss_of(cfg)}]
        return make_record(cfg, "ok", None, now_iso(), 0.1, validation_curve=curve, selected_step=4)

    return execute, ran


def test_trials_tied_on_validation_accuracy_are_told_apart_by_validation_loss(tmp_path):
    from harness.driver.tune import grid_points, space_for

    suite = _suite(sampler="grid", space={"lora": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    last = grid_points(space_for(suite.tune, expand(suite)[0]), 3, suite.tune.seed)[-1]["lr"]
    execute, ran = _scripted(lambda cfg: 0.1 if cfg.train.lr == last else 0.7)  # the last proposal fits best
    said = []
    base = [c for c in expand(suite) if c.seed == 0]
    (best,) = tune_cells(suite, base, tmp_path, execute, say=said.append)
    assert len(ran) == 3 and best.train.lr == last and best.tuning["tied_at_best"] == 3
    assert [h["val_loss"] for h in best.tuning["history"]] == [0.7, 0.7, 0.1]
    assert any("3 trials tied at val_accuracy 0.5; the one with the lowest validation loss" in s for s in said)


def test_a_grid_says_when_trials_leave_points_out_and_never_runs_a_point_twice(tmp_path):
    from harness.driver.tune import budget, space_coverage

    space = {"lora": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "config.r": {"choices": [4, 8]}}}
    suite = _suite(sampler="grid", space=space)  # 3 trials: lr 3 × r 2 = 6 points
    (cfg,) = [c for c in expand(suite) if c.seed == 0]
    from harness.driver.tune import space_for

    assert space_coverage(suite.tune, space_for(suite.tune, cfg)) == (
        "a grid of 6 points (lr 3 × config.r 2): 3 trials try 3 of them, in a seeded order"
    )
    few = _suite(sampler="grid", trials=5, space={"lora": {"config.r": {"choices": [4, 8]}}})
    assert budget(few.tune, space_for(few.tune, cfg)) == 2
    assert space_coverage(few.tune, space_for(few.tune, cfg)).endswith("2 trials, each point once, not the 5 budgeted")
    execute, ran = _scripted(lambda cfg: 0.5)
    said = []
    (best,) = tune_cells(few, [c for c in expand(few) if c.seed == 0], tmp_path, execute, say=said.append)
    assert sorted(c.method_config["r"] for c in ran) == [4, 8] and best.tuning["trials"] == 2
    assert "trial 2/2" in said[-2] and "a grid of 2 points (config.r 2)" in said[0]
    exact = _suite(sampler="grid", space={"lora": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    one_range = space_for(exact.tune, cfg)
    assert space_coverage(exact.tune, one_range) is None and budget(exact.tune, one_range) == 3


def test_a_database_url_holds_the_studies_and_each_trial_process_reports_to_it(tmp_path):
    """tune.storage: Optuna's RDBStorage (SQLite here; PostgreSQL or MySQL by URL, same code path). The trials
    run in processes of their own and report their validation curves to the database,
    where the median pruner reads them: no journal file is written; a rerun runs no trial again."""
    import optuna
    import yaml

    db = tmp_path / "studies.db"
    data = tiny_suite(methods=[{"method": "lora", "config": {"r": 4}}], seeds=[0])
    data["train"] = {**data["train"], "steps": 4, "eval_every": 2}
    data["export"] = False
    data["tune"] = {**TUNE, "pruner": "median"}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    out = run_cli("tune", str(path), "--results", str(tmp_path / "r"), "--storage", f"sqlite:///{db}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3/3 trials, " in out.stderr and "pruned, best val_accuracy" in out.stderr  # the study's progress
    # one lock and one machine check for the trials and the final cells together (issue 28: it was twice)
    assert out.stderr.count("hardware: ") == 1, out.stderr
    assert not (tmp_path / "r" / "tuning" / "studies.journal").exists()
    (name,) = optuna.get_all_study_names(f"sqlite:///{db}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    assert len(study.trials) == 3 and name.startswith("tiny-bert|rotten_tomatoes|lora/")
    assert all(t.intermediate_values == {2: t.intermediate_values[2], 4: t.value} for t in study.trials)
    from harness.records import read_record

    (final,) = [read_record(p) for p in (tmp_path / "r" / "records").glob("*.json")]
    assert final.config["tuning"]["storage"] == f"sqlite:///{db}" and final.config["tuning"]["study"] == name
    page = (tmp_path / "r" / "report.html").read_text()
    assert "optimization history" in page  # Optuna's figure, read back from the database
    again = run_cli("tune", str(path), "--results", str(tmp_path / "r"), "--storage", f"sqlite:///{db}")
    assert again.returncode == 0 and len(optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials) == 3


def test_storage_urls_that_cannot_work_are_one_line(tmp_path, capsys):
    import yaml

    from harness.driver.cli import main

    data = tiny_suite(seeds=[0])
    data["train"] = {**data["train"], "eval_every": 2}
    data["tune"] = TUNE
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(tiny_suite()))
    cases = [
        (path, "postgres-ish", "not a database URL"),
        (path, "mongodb://h/db", "unknown database 'mongodb'"),
        (plain, "sqlite:///x.db", "has no tune: block"),
        (path, f"sqlite:///{tmp_path}/no/such/dir/x.db", "cannot open it"),
    ]
    for suite, url, says in cases:
        command = "tune" if suite == path else "run"
        code = main([command, str(suite), "--results", str(tmp_path / "r"), "--storage", url])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and says in err[0], err
        assert not (tmp_path / "r").exists()


def test_the_lr_ratio_compares_any_adapter_method_with_what_trains_everything():
    """Issue 28: the ratio was bound to the names lora, qlora, qalora and peft; a method from a file (bitfit) was
    left out. Which configuration trains every parameter now comes from the records."""
    from reports.tuning import lr_ratio

    def study(best: float) -> dict:
        history = [{"params": {"lr": lr}, "value": 0.9 if lr == best else 0.5} for lr in (1e-5, 1e-4, 1e-3, 1e-2)]
        return {"best_params": {"lr": best}, "history": history, "objective": "val_accuracy"}

    studies = {"everything/default": study(1e-4), "bitfit/default": study(1e-3), "lora/r8": study(1e-2)}
    lines = lr_ratio(studies, trains_all={"everything/default"})
    assert [line.split(":")[0] for line in lines] == ["bitfit/default", "lora/r8"]
    assert "best learning rate ×10 everything/default's" in lines[0] and "×100" in lines[1]
    assert lr_ratio(studies, trains_all=set()) == []  # nothing trains everything: no ratio to state


def test_the_markdown_report_names_each_tuned_value_and_warns_where_one_is_at_the_edge_of_its_range():
    """`report --format md` had no word of tuning: a published comparison hid the learning rates it chose. Now a
    table per model and task, and a warning (terminal, Markdown, HTML) where the chosen value is the largest or
    smallest its study tried: that method's best may lie beyond the range, and the comparison may hold it back."""
    from harness.driver.cli_results import _tabular
    from reports.caveats import training_warnings
    from reports.terminal import tuned_line
    from tests.test_stats import run

    def tuned(method: str, best: float) -> RunRecord:
        history = [
            {"number": i, "params": {"lr": lr}, "value": 0.6 + 0.1 * (lr == best), "state": "COMPLETE"}
            for i, lr in enumerate((1e-5, 3e-4, 1e-2))
        ]
        t = {
            "best_params": {"lr": best},
            "best_value": 0.7,
            "history": history,
            "objective": "val_accuracy",
            "trials": 3,
            "trials_pruned": 1,
            "trials_failed": 0,
            "sampler": "grid",
        }
        return run(method, "0110" * 5).model_copy(update={"config": {"tuning": t}})

    records = [tuned("full", 3e-4), tuned("lora", 1e-2)]
    text = _tabular(records, "md")
    assert "**Hyperparameters, tuned on the validation split · m · t**" in text
    assert "| full/default | lr 0.0003 | val_accuracy 0.7 | 3 (1 pruned, 0 failed) | grid |" in text
    edge = "m · t · lora/default: its tuned lr, 0.01, is the largest of the 3 values its study tried"
    assert [w for w in training_warnings(records) if "tuned" in w] == [
        edge + ": its best may lie beyond the range searched (tune.space widens it)"
    ]
    assert text.count(edge) == 1  # once, among the headline's warnings
    assert "hand-set" not in text and "hand-set hyperparameters" in _tabular([run("full", "0110")], "md")
    line = "tuned on the validation split: full/default lr 0.0003 (3 trials) · lora/default lr 0.01 (3 trials)"
    assert tuned_line(records) == line and tuned_line([run("full", "0110")]) == ""  # under the terminal's table


def test_a_failed_trial_says_why_on_its_line(tmp_path):
    from harness.records import make_record, now_iso

    def fails(cfg, trial_dir):
        return make_record(
            cfg, "failed", "ValueError: r must be positive\nTraceback (most recent call last): …", now_iso(), 0.1
        )

    said = []
    suite = _suite(trials=1)
    (cfg,) = tune_cells(suite, [c for c in expand(suite) if c.seed == 0], tmp_path, fails, say=said.append)
    assert any(s.endswith("→ failed: ValueError: r must be positive; 1/1 trials, 0 pruned") for s in said), said
    assert cfg.tuning is None and "no trial completed" in said[-1]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_finite_space_never_runs_a_configuration_twice_and_a_resumed_study_draws_the_same(tmp_path, sampler):
    """config.r from [4, 8, 16] and 5 trials: random draws (and TPE's first ten) repeat, and a repeat would run the
    same configuration on the same seed to the same result. Each configuration runs once; the budget is 3."""
    from harness.driver.tune import budget, space_coverage, space_for

    suite = _suite(sampler=sampler, trials=5, space={"lora": {"config.r": {"choices": [4, 8, 16]}}})
    (cfg,) = [c for c in expand(suite) if c.seed == 0]
    assert budget(suite.tune, space_for(suite.tune, cfg)) == 3
    assert space_coverage(suite.tune, space_for(suite.tune, cfg)) == (
        "the space holds 3 configurations: 3 trials, each once, not the 5 budgeted"
    )
    execute, ran = _scripted(lambda c: 1.0 / c.method_config["r"])
    (best,) = tune_cells(suite, [cfg], tmp_path / "a", execute, say=lambda _: None)
    assert sorted(c.method_config["r"] for c in ran) == [4, 8, 16] and best.tuning["trials"] == 3
    assert best.method_config["r"] == 16  # all tie at 0.5; the lowest validation loss wins
    again, ran_again = _scripted(lambda c: 1.0 / c.method_config["r"])
    tune_cells(suite, [cfg], tmp_path / "b", again, say=lambda _: None)
    assert [c.method_config["r"] for c in ran_again] == [c.method_config["r"] for c in ran]  # seeded: the same
    calls = []

    def dies_on_the_second(c, trial_dir):
        calls.append(c.method_config["r"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the runner killed mid-trial
        return again(c, trial_dir)

    with pytest.raises(KeyboardInterrupt):
        tune_cells(suite, [cfg], tmp_path / "cut", dies_on_the_second, say=lambda _: None)
    resumed, ran_resumed = _scripted(lambda c: 1.0 / c.method_config["r"])
    tune_cells(suite, [cfg], tmp_path / "cut", resumed, say=lambda _: None)
    assert calls[:1] + [c.method_config["r"] for c in ran_resumed] == [c.method_config["r"] for c in ran]
    continuous = _suite(sampler=sampler, space={"lora": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}})
    assert budget(continuous.tune, space_for(continuous.tune, cfg)) == 3


def test_the_trial_table_explains_gaps_in_optunas_numbers():
    from reports.tuning import _table

    def study(numbers):
        history = [{"number": n, "params": {"config.r": n}, "value": 0.5, "state": "COMPLETE"} for n in numbers]
        return {"lora/default": {"history": history, "best_params": {"config.r": 0}, "best_value": 0.5}}

    assert "Trial numbers are Optuna's: they skip" in _table(study([0, 2, 6]))
    assert "Trial numbers" not in _table(study([0, 1, 2]))
