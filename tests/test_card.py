"""Each exported folder carries a model card (reports/card.py) whose loading code, run as written, gives back the
model that was scored: the same predictions on the test split, the task's label names in its config."""

import json
import re
from pathlib import Path

import torch

from harness.cell.run import _cards, run_cell
from harness.environment import describe
from harness.records import ExportRecord, label_ids, make_record, now_iso
from harness.tasks.builtin import load_task
from reports.card import render_card
from tests.conftest import cells


def served_predictions(card: Path, texts: list[str]) -> tuple[list[int], object]:
    """Run the card's Python block as a user would, then read ``texts`` as its inputs section says."""
    text = card.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    max_length = int(re.search(r"truncation=True, max_length=(\d+)", text).group(1))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own code is what is under test
    model, tok = scope["model"].eval(), scope["tokenizer"]
    with torch.no_grad():
        batch = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return model(**batch).logits.argmax(-1).tolist(), model


def test_a_cards_code_loads_the_model_that_was_scored(tmp_path):
    cfg = cells(methods=[{"method": "lora", "config": {"r": 4}}])[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    by = {e.kind: Path(e.path) for e in rec.exports}
    texts = [x.text for x in load_task(cfg.task).test]
    predicted, model = served_predictions(by["merged"] / "README.md", texts)
    assert predicted == label_ids(rec.eval_after.predicted)  # fp32 throughout: every prediction as scored
    # a pipeline answers with the task's label names
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    assert json.loads((by["merged"] / "config.json").read_text())["label2id"] == {"rotten": 0, "fresh": 1}
    card = (by["merged"] / "README.md").read_text()
    assert f"| as trained | {rec.eval_after.accuracy:.3f} [" in card and "0.0% of predictions differ" in card
    assert "0 = `rotten`, 1 = `fresh`" in card
    assert f"on {describe(rec.environment)}, torch " in card  # the machine, named as every report names it
    adapter = (by["adapter"] / "README.md").read_text()  # PEFT's template card, replaced
    assert "More Information Needed" not in adapter and "built with random weights (seed 0)" in adapter


def decoder_predictions(card: Path, examples) -> list[int]:
    """Run the card's two Python blocks (loading, then ``predict``) and predict each example as a user would."""
    scope: dict = {}
    for code in re.findall(r"```python\n(.*?)```", card.read_text(), re.S):
        exec(code, scope)  # noqa: S102 - the card's own code is what is under test
    scope["model"].eval()
    return [scope["predict"](x.text, x.text_pair, list(x.choices) or None) for x in examples]


def test_a_decoders_card_predicts_through_its_label_words_as_scored(tmp_path):
    cfg = cells(models=["tiny-llama"], train={"steps": 4, "batch_size": 8, "lr": 1e-3, "max_seq_len": 48})[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    merged = next(e for e in rec.exports if e.kind == "merged")
    predicted = decoder_predictions(Path(merged.path) / "README.md", load_task(cfg.task).test)
    assert predicted == label_ids(rec.eval_after.predicted)
    assert len(set(predicted)) == 2  # both label words win somewhere: the comparison is not of constants


def test_a_card_that_cannot_be_written_costs_the_card_only(monkeypatch, capsys):
    import reports.card

    def broken(record):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(reports.card, "write_cards", broken)
    _cards(object())
    assert "model cards not written: PermissionError: read-only folder" in capsys.readouterr().out


def test_a_card_names_the_weights_it_holds_and_how_its_settings_were_chosen(tmp_path):
    cfg = cells()[0]
    tuned = cfg.model_copy(update={"tuning": {"best_params": {"lr": 1e-3}, "objective": "val_accuracy"}})
    rec = make_record(tuned, "ok", None, now_iso(), 0.1, selected_step=4, selected_by="val_loss")
    card = render_card(rec, ExportRecord(kind="merged", path=str(tmp_path), bytes_on_disk=3 * 2**20))
    assert "the weights of step 4, best by val_loss on the validation split" in card
    assert "hyperparameters tuned on the validation split" in card and "3.0 MiB on disk" in card
    plain = make_record(cfg, "ok", None, now_iso(), 0.1, selected_step=4, selected_by="last")
    last = render_card(plain, ExportRecord(kind="merged", path=str(tmp_path), bytes_on_disk=0))
    assert "the weights of step" not in last and "tuned" not in last
