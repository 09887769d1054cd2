"""Any PEFT config: a merge the PEFT type cannot do leaves the run ok; what cannot apply to a model is refused
before anything trains (tests/bad_suites/ has one suite per kind); a saved adapter_config.json loads as it is."""

import json
from pathlib import Path

from harness.cell.run import run_cell
from harness.driver.suite import expand, load_suite, parse_suite
from methods.common import BOOKKEEPING
from reports.summary import summary_rows
from tests.conftest import cells, run_cli, tiny_suite

DATA = Path(__file__).parent / "data"
TRAIN = {"steps": 3, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1}


def test_a_merge_the_peft_type_cannot_do_leaves_the_run_ok(tmp_path):
    cfg = cells(
        models=["tiny-llama"],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 64, "eval_examples": 32}],
        train=TRAIN,
        methods=[{"method": "peft", "config": {"peft_type": "LILY", "r": 4, "target_modules": ["q_proj", "v_proj"]}}],
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.eval_after is not None and rec.training.step_time_stats["median_s"] > 0
    exports = {e.kind: e for e in rec.exports}
    assert exports["adapter"].bytes_on_disk > 0 and exports["adapter"].unsupported is None
    merged = exports["merged"]
    assert merged.unsupported.startswith("unsupported by LILY: ") and "not supported for Lily" in merged.unsupported
    assert merged.bytes_on_disk == 0 and merged.eval is None and not Path(merged.path).exists()
    (row,) = summary_rows([rec])
    assert "merged: unsupported by LILY" in row["merged exports: accuracy (max Δlogit)"]


def test_a_saved_adapter_config_loads_through_config_file(tmp_path):
    saved = json.loads((DATA / "adapter_config.json").read_text())
    assert BOOKKEEPING & set(saved)  # the file really carries peft's bookkeeping keys
    suite = load_suite(DATA / "peft_from_file.yaml")
    (cell,) = expand(suite)
    assert cell.method_config["peft_type"] == "LORA" and cell.method_config["r"] == 2  # the suite's key wins
    assert cell.method_config["target_modules"] == ["q_proj", "v_proj"]
    ignored = cell.method_config["ignored"]
    assert ignored["base_model_name_or_path"] == saved["base_model_name_or_path"]
    assert ignored["task_type"] == "CAUSAL_LM" and "task_type" not in {k for k in cell.method_config if k != "ignored"}
    rec = run_cell(cell, tmp_path)
    assert rec.status == "ok", rec.error
    # 2 layers × r (d_in + d_out) for q_proj (32 → 32) and v_proj (32 → 16: fewer KV heads)
    assert rec.trainable_params == 2 * (2 * (32 + 32) + 2 * (32 + 16))
    assert rec.config["method_config"]["ignored"] == ignored  # the record says what was not used


def test_refusals_name_the_field_and_come_before_any_cell(tmp_path, write_suite):
    bad = tiny_suite(models=["tiny-llama"], methods=[{"method": "lora", "config": {"r": 4, "target_modules": ["x"]}}])
    out = run_cli("run", str(write_suite(bad)), "--results", str(tmp_path / "r"))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "methods[0].config.target_modules: no module named 'x'" in out.stderr and not (tmp_path / "r").exists()


def test_eight_peft_types_on_a_decoder_validate():
    """Eight PEFT types against SmolLM2's skeleton, one variant each (forty, five of each, until 2026-12-07: the
    copies checked nothing more and took 4 s more; how long forty take: bench/validation.py)."""
    variants = [
        {"method": "peft", "variant": f"v{i}", "config": {"peft_type": t, "target_modules": ["q_proj", "v_proj"]}}
        for i, t in enumerate(["LORA", "LOHA", "LOKR", "VERA", "IA3", "FOURIERFT", "LILY", "BOFT"])
    ]
    for v in variants:
        if v["config"]["peft_type"] == "IA3":
            v["config"]["feedforward_modules"] = []
        if v["config"]["peft_type"] == "BOFT":
            v["config"]["boft_block_size"] = 4
    suite = parse_suite(tiny_suite(models=["smollm2-135m"], methods=variants), "<test>")
    assert [m.config["peft_type"] for m in suite.methods] == [v["config"]["peft_type"] for v in variants]


def test_dora_and_vera_run_in_a_suite(tmp_path, write_suite):
    """Two published LoRA variants through a suite run, end to end: DoRA (Liu et al. 2024, LoRA's `use_dora`:
    a trained magnitude per output column) and VeRA (Kopiczko et al. 2024: frozen shared random matrices, trained
    scaling vectors only)."""
    methods = [
        {"method": "lora", "variant": "dora", "config": {"r": 4, "use_dora": True}},
        {
            "method": "peft",
            "variant": "vera",
            "config": {"peft_type": "VERA", "r": 8, "target_modules": ["query", "value"]},
        },
    ]
    out = run_cli("run", str(write_suite(tiny_suite(methods=methods))), "--results", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-2000:]
    recs = {
        json.loads(p.read_text())["variant"]: json.loads(p.read_text())
        for p in (tmp_path / "r" / "records").glob("*.json")
    }
    assert {v: r["status"] for v, r in recs.items()} == {"dora": "ok", "vera": "ok"}
    lora_r4 = 2 * 2 * 4 * (32 + 32)  # tiny-bert: query and value of 2 layers, hidden 32
    assert recs["dora"]["trainable_params"] > lora_r4  # + a magnitude vector per adapted layer
    assert recs["vera"]["trainable_params"] < recs["dora"]["trainable_params"]  # vectors only, shared matrices
    for r in recs.values():
        merged = next(e for e in r["exports"] if e["kind"] == "merged")
        assert merged["max_abs_logit_diff"] < 1e-4 and merged["eval"]["accuracy"] == r["eval_after"]["accuracy"]


def test_boft_on_a_machine_without_cuda_builds_no_cuda_extension(tmp_path, monkeypatch):
    """peft's BOFT tried to compile a CUDA extension with ninja and gcc whatever the device (~9 s on a fresh
    CPU machine); without CUDA the method now tells peft at once that there is none, as the failed build did."""
    import peft.tuners.boft.layer
    import torch

    from harness.cell.models import load_model
    from harness.contract import ModelContext
    from harness.registry import build_method

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    monkeypatch.setattr(peft.tuners.boft.layer, "get_fbd_cuda", peft.tuners.boft.layer.get_fbd_cuda)  # put back
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    method = build_method("peft", {"peft_type": "BOFT", "boft_block_size": 4, "target_modules": ["query", "value"]})
    ctx = ModelContext(task_type="seq_cls", num_labels=2, model_type="bert")
    model = method.prepare(load_model("tiny-bert", 2, 0, False).model, ctx)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert not (tmp_path / "ext").exists()  # no build was attempted


def test_an_adalora_adapter_on_its_base_scores_what_it_scored_in_training(tmp_path):
    """Loaded for inference, peft's AdaLoRA fails any forward given labels (its loss adds an orthogonality term of
    the trainable adapter it has not got): the adapter's unmerged form on a pretrained base failed to score. The
    evaluation now takes its loss from the logits, the same for every method, so the term is out of AdaLoRA's
    figures too."""
    from tests.conftest import saved_tiny_bert

    method = {"method": "peft", "variant": "adalora", "config": {"peft_type": "ADALORA"}}
    cfg = cells(models=[saved_tiny_bert(tmp_path / "base")], methods=[method], deploy={"repeats": 1})[0]
    rec = run_cell(cfg, tmp_path / "r")
    assert rec.status == "ok", rec.error
    (form,) = [d for e in rec.exports if e.kind == "adapter" for d in e.deployments]
    assert form.error is None and form.eval.correct == rec.eval_after.correct, form
    assert abs(form.eval.loss - rec.eval_after.loss) < 1e-5
