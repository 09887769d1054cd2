"""Deployment cost of each artifact (harness/cell/deploy.py): every method's deployable forms are loaded from disk
(timed), evaluated as deployed and timed at batch 1; the decode really uses the KV cache one token at a time; a
form in a dtype this machine emulates is skipped, saying why; the report and md show the table."""

from pathlib import Path

import pytest
import torch

from harness.cell.deploy import decoder_latency, encoder_latency
from harness.cell.run import run_cell
from harness.records import EvalMetrics
from tests.conftest import cells
from tests.test_stats import run

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
    model.generation_config.use_cache = False  # as some checkpoints ship: no PEFT base to step through, itself
    seen.clear()
    decoder_latency(model, torch.device("cpu"), prompt_tokens=16, new_tokens=5, repeats=2)
    assert seen == one * 3


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


def test_an_adapter_is_served_on_its_base_unmerged_and_prompt_tuning_with_its_virtual_tokens(tmp_path):
    """An adapter kept beside its base (several adapters served on one base) costs latency a merge does not: that
    form is loaded from disk (the base from its folder, the adapter from the export) and timed. Prompt tuning has
    nothing to merge: its only form is the adapter on the base, its virtual tokens in every call. In float32 each
    form's answers are the trained model's to the last bit of the loss."""
    from tests.conftest import saved_tiny_bert

    folder = saved_tiny_bert(tmp_path / "base")
    prompt_tuning = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}
    methods = [{"method": "lora", "config": {"r": 4}}, {"method": "peft", "config": prompt_tuning}]
    runs = [
        run_cell(cfg, tmp_path / cfg.method)
        for cfg in cells(models=[folder], tasks=TASK, train=TRAIN, methods=methods, deploy={"repeats": 1})
    ]
    forms = {"lora": "adapter on the base (unmerged)", "peft": "adapter on the base"}
    for rec in runs:
        assert rec.status == "ok", rec.error
        adapter = next(e for e in rec.exports if e.kind == "adapter")
        (form,) = adapter.deployments
        assert form.name == forms[rec.method] and form.error is None and form.load_time_s > 0
        assert form.eval.loss == rec.eval_after.loss and form.eval.correct == rec.eval_after.correct
        assert form.latency["kind"] == "encoder"
        card = (Path(adapter.path) / "README.md").read_text()  # the folder as its card loads it: that form
        assert f"| this folder, as served | {form.eval.accuracy:.3f} [" in card and f"as `{form.name}`, below" in card
    assert "4 virtual tokens in every call" in form.note


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_a_prompt_learning_decoder_is_timed_as_it_decodes_its_virtual_tokens_once(peft_type):
    """As scored (harness/tasks/decoding.py): the prompt through the PEFT model, which puts the virtual tokens in
    (prompt tuning: ahead of the input; prefix tuning: a 4-token cache), then each new token through the base on
    that cache. Through the PEFT model, each token would have had the virtual tokens put in again."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from harness.cell.models import load_model
    from methods.peft_generic import as_trained

    base = load_model("tiny-llama", 2, 0, mode="prompt").model.eval()
    seen = []

    def hook(module, args, kwargs):
        past, ids = kwargs.get("cache", kwargs.get("past_key_values")), kwargs.get("input_ids")
        tokens = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        seen.append((tokens, 0 if past is None else past.get_seq_length()))

    base.register_forward_pre_hook(hook, with_kwargs=True)
    config = (PromptTuningConfig if peft_type == "PROMPT_TUNING" else PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4
    )
    decoder_latency(as_trained(get_peft_model(base, config)), torch.device("cpu"), 16, new_tokens=3, repeats=1)
    prefill = (20, 0) if peft_type == "PROMPT_TUNING" else (16, 4)
    assert seen == [prefill, (1, 20), (1, 21), (1, 22)] * 2  # warm-up and one timed generation


def test_a_deployed_forms_answers_against_the_trained_models():
    """Right answers lost and gained on the same examples, summed over seeds, with the paired test's verdict."""
    from reports.stats import answers_vs

    assert answers_vs(["1100"], ["1100"]) == "the same answers"
    assert answers_vs(["1100"], ["1010"]) == "1 lost, 1 gained of 4 (p = 1, within noise)"
    # 20 right answers lost, none gained: McNemar exact p = 2 · 0.5^20
    assert answers_vs(["1" * 40], ["0" * 20 + "1" * 20]) == "20 lost, 0 gained of 40 (p = 1.9e-06, beyond noise)"
    assert answers_vs(["10", "11"], ["01", "11"]).startswith("1 lost, 1 gained of 2 × 2 (p = ")
    assert answers_vs(["1100"], [None]) == answers_vs([None], ["1100"]) == answers_vs(["11"], ["110"]) == "—"


def test_the_fastest_deployment_is_one_that_keeps_the_trained_models_accuracy():
    """A requantized merge is often the fastest form and the one that loses accuracy: the summary's fastest
    deployment is the fastest that loses none beyond noise, and a form that merely answers differently counts."""
    from harness.records import DeploymentRecord, ExportRecord
    from reports.summary import fastest_deployment

    def form(name: str, correct: str, ms: float) -> DeploymentRecord:
        latency = {"kind": "encoder", "batch_1_per_example": {"median_s": ms / 1e3, "q1_s": 0, "q3_s": 0}}
        served = EvalMetrics(accuracy=correct.count("1") / len(correct), loss=0.1, examples=40, correct=correct)
        return DeploymentRecord(name=name, dtype="float32", eval=served, latency=latency)

    trained = "1" * 40
    lossy = form("nf4 merged", "0" * 20 + "1" * 20, 5.0)  # 20 right answers lost: p = 1.9e-06
    shuffled = form("bf16", "0" + "1" * 39, 7.0)  # one lost: within noise
    exports = [ExportRecord(kind="merged", path="m", bytes_on_disk=9, deployments=[lossy, shuffled])]
    r = run("lora", trained).model_copy(update={"exports": exports})
    assert fastest_deployment(r) == "merged bf16 7 ms/example"
    kept = lossy.model_copy(update={"eval": shuffled.eval})
    r = r.model_copy(update={"exports": [exports[0].model_copy(update={"deployments": [kept, shuffled]})]})
    assert fastest_deployment(r) == "merged nf4 merged 5 ms/example"


def test_compare_rows_carry_each_forms_answers_lost_and_gained():
    """`compare --format csv|json`: beside each deployed form's accuracy, the right answers it lost and gained
    against the trained model on the same examples (empty where either side has no answers)."""
    from harness.records import DeploymentRecord, ExportRecord
    from reports.compare import flat_rows

    served = EvalMetrics(accuracy=0.5, loss=0.1, examples=4, correct="0110")
    forms = [DeploymentRecord(name="bf16", dtype="bfloat16", eval=served), DeploymentRecord(name="x", dtype="int4")]
    r = run("lora", "1100").model_copy(
        update={"exports": [ExportRecord(kind="merged", path="m", bytes_on_disk=9, deployments=forms)]}
    )
    (row,) = flat_rows([r])
    assert (row["deploy_merged_bf16_answers_lost"], row["deploy_merged_bf16_answers_gained"]) == (1, 1)
    assert row["deploy_merged_x_answers_lost"] is None and row["deploy_merged_x_accuracy"] is None


def test_one_configurations_deployed_forms_differ_by_marker_in_the_latency_figure():
    """The figure colours by configuration: QLoRA's three adapter forms were three identical blue squares."""
    from harness.records import DeploymentRecord, ExportRecord
    from reports import deployment

    served = EvalMetrics(accuracy=0.5, loss=0.1, examples=2, correct="10")
    latency = {"kind": "encoder", "batch_1_per_example": {"median_s": 0.01, "q1_s": 0.01, "q3_s": 0.01}}
    names = ["nf4 + adapter", "adapter on the fp32 base", "fp32"]
    adapter = [DeploymentRecord(name=n, dtype="float32", eval=served, latency=latency) for n in names[:2]]
    merged = [DeploymentRecord(name="fp32", dtype="float32", eval=served, latency=latency)]
    exports = [
        ExportRecord(kind="adapter", path="a", bytes_on_disk=1, deployments=adapter),
        ExportRecord(kind="merged_fp32", path="m", bytes_on_disk=1, deployments=merged),
    ]
    r = run("qlora", "11").model_copy(update={"exports": exports})
    fig = deployment.figure(deployment.forms([r])[("m", "t")])
    markers = {t.name: t.marker.symbol for t in fig.data}
    assert len(markers) == 3 and len(set(markers.values())) == 3, markers
    assert markers["qlora/default · merged_fp32 · fp32"] == "circle"  # the common forms keep their shapes
