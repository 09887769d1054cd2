"""Deployment cost of each artifact (harness/cell/deploy.py): every method's deployable forms are loaded from disk
(timed), evaluated as deployed and timed at batch 1; the decode really uses the KV cache one token at a time; a
form in a dtype this machine emulates is skipped, saying why; the report and md show the table."""

from pathlib import Path

import pytest
import torch

from harness.cell.deploy import decoder_latency, encoder_latency
from harness.cell.run import run_cell
from tests.conftest import cells

TRAIN = {"steps": 2, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1}
TASK = [{"name": "rotten_tomatoes", "train_examples": 64, "eval_examples": 32}]
FORMS = {  # method → (export kind, form name) each run must measure
    "full": {("full", "fp32"), ("full", "bf16")},
    "lora": {("merged", "fp32"), ("merged", "bf16")},
    "qlora": {
        ("adapter", "nf4 + adapter"),
        ("adapter", "adapter on the fp32 base"),
        ("merged_4bit", "nf4 merged"),
        ("merged_fp32", "fp32"),
    },
    "qalora": {("merged_int", "int4 dequant"), ("merged_int", "int4 kernel")},
}


def _run(tmp_path, model: str, method: str, config: dict | None = None):
    methods = [{"method": method, "config": config or {}}]
    cfg = cells(models=[model], tasks=TASK, train=TRAIN, methods=methods, deploy={"repeats": 2})[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    return rec


@pytest.mark.parametrize("method", sorted(FORMS))
def test_every_method_measures_its_deployable_forms_on_a_decoder(tmp_path, method):
    config = {"r": 4, **({"group_size": 32} if method == "qalora" else {})} if method != "full" else {}
    rec = _run(tmp_path, "tiny-llama", method, config)
    seen = {(e.kind, d.name): d for e in rec.exports for d in e.deployments}
    assert FORMS[method] <= set(seen), sorted(seen)
    for (kind, name), d in seen.items():
        if d.skipped:  # bf16 on a CPU that emulates it; tiny-llama's random base has no folder to load again
            random_base = name == "adapter on the fp32 base" and "built with random weights" in d.skipped
            assert ("emulated" in d.skipped or random_base) and d.latency is None
            continue
        assert d.error is None, (kind, name, d.error)
        assert 0 <= d.eval.accuracy <= 1 and d.eval.examples == 32
        lat = d.latency
        assert lat["kind"] == "decoder" and lat["prompt_tokens"] == 64 and lat["new_tokens"] == 32
        assert len(lat["decode_per_token"]["times_s"]) == 32 * 2 and len(lat["prefill"]["times_s"]) == 2
        assert lat["decode_per_token"]["q1_s"] <= lat["decode_per_token"]["median_s"] <= lat["decode_per_token"]["q3_s"]
        assert (d.load_time_s is None) == (name in ("nf4 + adapter", "nf4 merged"))  # bnb 4-bit: no disk loader
        if not d.skipped:  # the export's model card lists the form with its median decode time, in ms
            card = (Path(next(e.path for e in rec.exports if e.kind == kind)) / "README.md").read_text()
            assert f"decode_per_token: {lat['decode_per_token']['median_s'] * 1e3:.1f} ms [" in card
    if method == "qalora":  # the kernel's form computes what the dequantizing one computes, in bf16 activations:
        # close, and evaluated on its own (the same weights, so never the float32 form's figures copied)
        a, b = seen[("merged_int", "int4 dequant")].eval, seen[("merged_int", "int4 kernel")].eval
        assert abs(a.loss - b.loss) < 0.05 * a.loss and a.loss != b.loss


def test_the_decode_feeds_one_token_at_a_time_onto_a_growing_cache():
    from harness.cell.models import load_model

    model = load_model("tiny-llama", 2, 0, mode="prompt").model.eval()
    seen = []

    def hook(module, args, kwargs):
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((kwargs["input_ids"].shape[1], 0 if past is None else past.get_seq_length()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    lat = decoder_latency(model, torch.device("cpu"), prompt_tokens=16, new_tokens=5, repeats=2)
    one = [(16, 0)] + [(1, 16 + i) for i in range(5)]  # prefill, then each new token on the cache so far
    assert seen == one * 3  # warm-up and two timed generations
    assert len(lat["decode_per_token"]["times_s"]) == 10 and all(t > 0 for t in lat["decode_per_token"]["times_s"])


def test_encoders_are_timed_per_example_at_batch_1_and_32():
    from harness.cell.models import load_model

    model = load_model("tiny-bert", 2, 0).model.eval()
    lat = encoder_latency(model, torch.device("cpu"), seq_len=16, repeats=3)
    assert lat["kind"] == "encoder" and set(lat) >= {"batch_1_per_example", "batch_32_per_example"}
    assert all(len(lat[k]["times_s"]) == 3 for k in ("batch_1_per_example", "batch_32_per_example"))


def test_a_form_in_an_emulated_dtype_is_skipped_with_the_reason(tmp_path, monkeypatch):
    import harness.measure.hardware

    monkeypatch.setattr(
        harness.measure.hardware,
        "slow_note",
        lambda d, device=None: "bf16 emulated on this CPU (AVX2): 100× slower than fp32",
    )
    monkeypatch.setattr(harness.measure.hardware, "is_emulated", lambda d, device=None: d == "bfloat16")
    rec = _run(tmp_path, "tiny-bert", "lora", {"r": 4})
    forms = {d.name: d for e in rec.exports for d in e.deployments}
    assert forms["bf16"].skipped.startswith("bf16 emulated") and forms["bf16"].latency is None
    assert forms["bf16"].skipped.endswith("measure it where bfloat16 is native")
    assert forms["fp32"].skipped is None and forms["fp32"].latency["kind"] == "encoder"


def test_the_report_and_md_show_the_deployment_table(tmp_path):
    from harness.records import write_record
    from reports.deployment import to_markdown
    from reports.html import write_report

    rec = _run(tmp_path / "run", "tiny-bert", "lora", {"r": 4})
    write_record(tmp_path / "res", rec)
    page = write_report(tmp_path / "res").read_text()
    assert "Deployment cost of each artifact" in page and 'id="fig-deploy-0"' in page
    assert "/example at batch 1" in page
    md = to_markdown([rec])
    assert "| lora/default | merged | fp32 (float32) |" in md and "ms/example at batch 1" in md


def test_a_form_with_the_exports_weights_is_not_evaluated_again(tmp_path, monkeypatch):
    """fp32 training: the merged model loaded back from disk in fp32 has the in-memory merged model's weights
    bit for bit, so it reuses that evaluation; the bf16 form does not (4 test-split reads, not 5)."""
    from harness.tasks.classifier import ClassifierIO

    calls, real = [], ClassifierIO.evaluate

    def spy(self, model, batch_size, dtype, device, split="test"):
        calls.append(split)
        return real(self, model, batch_size, dtype, device, split)

    monkeypatch.setattr(ClassifierIO, "evaluate", spy)
    rec = _run(tmp_path, "tiny-bert", "lora", {"r": 4})
    assert rec.config["train"]["dtype"] == "float32"
    merged = next(e for e in rec.exports if e.kind == "merged")
    forms = {d.name: d for d in merged.deployments}
    assert forms["fp32"].eval == merged.eval and forms["fp32"].load_time_s > 0
    expected = 4 if forms["bf16"].skipped is None else 3  # trained, merged export, bf16 form, untrained
    assert calls.count("test") == expected, calls


def test_a_mergeable_adapter_is_also_served_unmerged_on_its_base_and_prompt_learning_is_not(tmp_path):
    """An adapter kept beside its base (several adapters served on one base) costs latency a merge does not: that
    form is loaded from disk (the base from its folder, the adapter from the export) and timed. In float32 its
    answers are the trained model's to the last bit of the loss. Prompt tuning changes the inputs, not the
    layers: no such form."""
    from tests.conftest import saved_tiny_bert

    folder = saved_tiny_bert(tmp_path / "base")
    prompt_tuning = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}
    methods = [{"method": "lora", "config": {"r": 4}}, {"method": "peft", "config": prompt_tuning}]
    lora, prompt = (
        run_cell(cfg, tmp_path / cfg.method)
        for cfg in cells(models=[folder], tasks=TASK, train=TRAIN, methods=methods, deploy={"repeats": 1})
    )
    assert lora.status == prompt.status == "ok", (lora.error, prompt.error)
    adapter = next(e for e in lora.exports if e.kind == "adapter")
    (unmerged,) = adapter.deployments
    assert unmerged.name == "adapter on the base (unmerged)" and unmerged.error is None and unmerged.load_time_s > 0
    assert unmerged.eval.loss == lora.eval_after.loss and unmerged.eval.correct == lora.eval_after.correct
    assert unmerged.latency["kind"] == "encoder"
    assert not next(e for e in prompt.exports if e.kind == "adapter").deployments
