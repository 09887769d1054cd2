"""An export failing fails that export only; every export records what it is as served: accuracy, bits per
weight on disk, its largest logit difference and the share of predictions that differ from the trained model."""

from pathlib import Path

import torch

from harness.cell.exports import prediction_flips
from harness.cell.run import run_cell
from harness.contract import Export, MethodBase, attempt
from tests.conftest import cells

TRAIN = {"steps": 3, "batch_size": 8, "max_seq_len": 32, "timing_warmup_steps": 1}


def test_a_merge_that_raises_value_error_leaves_the_run_ok(tmp_path):
    """PEFT's BEFT trains bias offsets; on a Llama without biases, merge_and_unload raises ValueError ("Base
    layer has no bias, cannot merge bias adapter"). The run stays ok; the adapter is exported, the merge is an
    entry with the error."""
    method = {"method": "peft", "variant": "beft", "config": {"peft_type": "BEFT", "target_modules": ["q_proj"]}}
    train = {**TRAIN, "dtype": "auto"}
    cfg = cells(models=["tiny-llama"], methods=[method], train=train, deploy={"enabled": False})[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    by = {e.kind: e for e in rec.exports}
    assert by["adapter"].error is None and by["adapter"].bytes_on_disk > 0
    assert by["merged"].error.startswith("ValueError: ") and "bias" in by["merged"].error
    assert by["merged"].eval is None and not Path(by["merged"].path).exists()
    # exports/<cell id>/, the record's id: `ftbench run` moves a changed cell's exports aside by it. The suite's
    # dtypes are `auto`, which the cell resolves; the id is the config as the suite wrote it.
    assert rec.config["train"]["dtype"] == "auto" and Path(by["adapter"].path).parent.name == rec.cell_id


def test_a_method_whose_export_raises_still_finishes_ok(tmp_path, monkeypatch):
    class Broken(MethodBase):
        name = "broken_export"

        def prepare(self, model, ctx):
            return model

        def trainable_parameters(self, model):
            return list(model.named_parameters())

        def export(self, model, out_dir):
            raise OSError("disk full")

    import harness.cell.run as run

    cfg = cells(methods=[{"method": "full"}], train=TRAIN)[0]
    monkeypatch.setattr(run, "build_method", lambda name, config: Broken())  # a full fine-tuning that can't export
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    (entry,) = rec.exports
    assert entry.kind == "export" and entry.error == "OSError: disk full"


def test_attempt_removes_what_a_failed_export_half_wrote(tmp_path):
    path = tmp_path / "merged"

    def half():
        path.mkdir()
        (path / "part").write_text("x")
        raise RuntimeError("quantizer failed\nsecond line")

    e = attempt("merged_int4", path, half)
    assert (e.kind, e.error, e.bytes_on_disk) == ("merged_int4", "RuntimeError: quantizer failed", 0)
    assert not path.exists()
    ok = attempt("a", path, lambda: Export("a", path, 1))
    assert ok.error == "" and ok.bytes_on_disk == 1


def test_prediction_flips_counts_changed_argmax():
    trained = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    served = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.6, 0.4], [0.4, 0.6]])
    assert prediction_flips(trained, served) == 0.25
    assert prediction_flips(trained[:, :1], served[:, :1]) is None  # one column: nothing is ranked


def test_every_export_records_served_accuracy_bits_and_gap(tmp_path):
    method = {"method": "qlora", "config": {"r": 4, "export_int_bits": [4], "export_int_group_size": 16}}
    cfg = cells(methods=[method], train=TRAIN, deploy={"enabled": False})[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    by = {e.kind: e for e in rec.exports}
    for kind in ("merged_4bit", "merged_fp32", "merged_int4"):
        e = by[kind]
        assert e.error is None and e.eval is not None and 0 <= e.predictions_differing <= 1
        assert e.max_abs_logit_diff is not None and e.bits_per_weight_on_disk > 0
    # fp32 weights take 32 bits each; the 4-bit ones fewer (tiny-bert's embeddings and head stay fp32)
    assert 31 < by["merged_fp32"].bits_per_weight_on_disk < 33
    assert by["merged_int4"].bits_per_weight_on_disk < by["merged_fp32"].bits_per_weight_on_disk
    assert by["merged_fp32"].predictions_differing == 0.0  # merged in fp32: the trained model up to rounding
    from transformers import AutoTokenizer

    from harness.cell.models import load_model

    base = load_model("tiny-bert", 2, 0).tokenizer
    for kind in ("merged_fp32", "merged_int4"):  # a model folder serves on its own: the tokenizer is beside it
        tok = AutoTokenizer.from_pretrained(by[kind].path)
        assert tok("a fine film")["input_ids"] == base("a fine film")["input_ids"]
    assert not list(Path(by["adapter"].path).glob("tokenizer*"))  # an adapter folder stays as PEFT writes it
