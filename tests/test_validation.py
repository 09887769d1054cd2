"""Validation during training: the curve, which split each evaluation reads (counted, not trusted), and the
best step's weights put back for the test split and the exports."""

import pytest

from harness.cell.run import run_cell
from tests.conftest import cells

BASE = {"steps": 6, "batch_size": 8, "lr": 3e-3, "max_seq_len": 32, "timing_warmup_steps": 1, "schedule": "constant"}


def _run(tmp_path, **train):
    cfg = cells(
        train={**BASE, **train},
        tasks=[{"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 48}],
        methods=[{"method": "lora", "config": {"r": 4}}],
    )[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "ok", rec.error
    return rec


@pytest.fixture
def splits(monkeypatch):
    """Every evaluation's split, in order: the classifier IO's evaluate, spied."""
    from harness.tasks.classifier import ClassifierIO

    seen, real = [], ClassifierIO.evaluate

    def spy(self, model, batch_size, dtype, device, split="test"):
        seen.append((split, len(self.test if split == "test" else self.validation or [])))
        return real(self, model, batch_size, dtype, device, split)

    monkeypatch.setattr(ClassifierIO, "evaluate", spy)
    return seen


def test_the_curve_reads_validation_only_and_the_test_split_only_after_training(tmp_path, splits):
    rec = _run(tmp_path, eval_every=2, val_examples=24)
    assert [p["step"] for p in rec.validation_curve] == [2, 4, 6]
    assert all(p["examples"] == 24 and 0 <= p["accuracy"] <= 1 and p["loss"] > 0 for p in rec.validation_curve)
    # the curve, then the trained model, then the untrained one (its initial weights put back from disk)
    assert [s for s, _ in splits] == ["validation", "validation", "validation", "test", "test"]
    assert rec.selected_step == 6 and rec.selected_by == "last"
    assert len(rec.training.step_times_s) == 6 and rec.training.step_time_stats["count"] == 6 - len(
        rec.training.memory_tracked_steps
    )


def test_the_untrained_score_is_of_the_initial_weights_whatever_the_training(tmp_path):
    """Measured after training, on the initial weights put back: so it is the same for a 2-step and a 6-step run
    (same seed), and differs from the trained model's (were nothing put back, it would equal it)."""
    long, short = _run(tmp_path / "long"), _run(tmp_path / "short", steps=2)
    assert long.eval_before.loss == pytest.approx(short.eval_before.loss, rel=1e-6)
    assert long.eval_before.correct == short.eval_before.correct
    assert long.eval_after.loss != pytest.approx(long.eval_before.loss, rel=1e-3)


def test_selecting_the_best_validation_step_tests_that_steps_weights(tmp_path):
    """With a constant LR, the weights after step k of a longer run are those of a k-step run (same seed, same
    batches): so the selected run's test result must equal the k-step run's, exactly."""
    best = _run(tmp_path / "best", eval_every=1, select="val_loss", lr=2e-2)
    losses = {p["step"]: p["loss"] for p in best.validation_curve}
    k = best.selected_step
    assert losses[k] == min(losses.values()) and min(losses, key=losses.get) == k
    short = _run(tmp_path / "short", steps=k, lr=2e-2)
    assert best.eval_after.accuracy == short.eval_after.accuracy
    assert best.eval_after.loss == pytest.approx(short.eval_after.loss, rel=1e-5)
    assert best.eval_after.correct == short.eval_after.correct


def test_without_eval_every_nothing_reads_validation(tmp_path, splits):
    rec = _run(tmp_path)
    assert [s for s, _ in splits] == ["test", "test"] and rec.validation_curve == [] and rec.selected_step is None


def test_the_initial_weights_kept_for_the_untrained_score_have_no_name_to_leave_behind(tmp_path, monkeypatch):
    """Kept in an anonymous file: a cell that fails, times out or is killed between preparing and the untrained
    score leaves nothing in the temp dir (a named one was left by each: a full fine-tune's parameters each)."""
    import tempfile

    import torch

    from harness.cell.run import _InitialWeights
    from harness.registry import build_method

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = torch.nn.Linear(4, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    initial = _InitialWeights(model, build_method("full", {}))
    assert list(tmp_path.iterdir()) == []
    with torch.no_grad():
        model.weight.add_(1.0)
    initial.restore(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
