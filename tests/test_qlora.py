"""QLoRA on CPU with bitsandbytes: gradients, the eval-then-train trap, bits per parameter, merge fidelity."""

from pathlib import Path

import pytest
import torch

from harness.cell.models import load_model
from harness.cell.run import run_cell
from harness.contract import ModelContext
from harness.registry import get_method
from methods.qlora import QLoraOptions, quantize_linears, quantized_storage
from tests.conftest import cells, saved_tiny_bert

bnb = pytest.importorskip("bitsandbytes")
CTX = ModelContext("seq_cls", 2, "bert", ["classifier"])


def _qlora_model(**cfg):
    cls = get_method("qlora")
    m = cls(cls.Config(r=4, target_modules=["query", "value", "dense"], init_lora_weights=False, **cfg))
    return m, m.prepare(load_model("tiny-bert", 2, 0).model, CTX)


def _adapter_grads_all_nonzero(m, model) -> list[str]:
    """Names of trainable parameters whose gradient is missing or zero after one backward."""
    x = torch.randint(1000, 2000, (4, 12))
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    return [n for n, p in m.trainable_parameters(model) if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_backward_reaches_every_adapter(quant_type, double_quant):
    m, model = _qlora_model(quant_type=quant_type, double_quant=double_quant)
    n4 = sum(isinstance(x, bnb.nn.Linear4bit) for x in model.modules())
    assert n4 == 13  # 2 layers × (q, k, v, attn-out, ffn-in, ffn-out) + pooler; the classifier stays fp32
    assert not isinstance(model.base_model.model.classifier.modules_to_save["default"], bnb.nn.Linear4bit)
    assert _adapter_grads_all_nonzero(m, model) == []
    assert m.report(model)["quant_type"] == quant_type


def test_eval_then_train_trap_is_handled():
    """ftbench evaluates before training. On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights at the first
    eval-mode forward and training breaks afterwards; ftbench disables the repacking on every layer."""
    m, model = _qlora_model()
    x = torch.randint(1000, 2000, (4, 12))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=x).logits
    assert _adapter_grads_all_nonzero(m, model) == []
    # and evaluating again after training still works (the eval → train → eval cycle of a run)
    model.eval()
    with torch.no_grad():
        assert model(input_ids=x).logits.shape == before.shape
    assert all(
        not getattr(x, "support_avx512bf16_for_cpu", False) for x in model.modules() if isinstance(x, bnb.nn.Linear4bit)
    )


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
def test_trap_is_real_without_the_fix():
    """The control: with bitsandbytes' default (repacking allowed), training after an eval pass breaks."""
    m, model = _qlora_model(blocksize=32)  # tiny-bert is 32 wide: the repacking needs ≥ 1 block per row
    for x in model.modules():
        if isinstance(x, bnb.nn.Linear4bit):
            x.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(1000, 2000, (4, 12)))
    # bitsandbytes 0.50.2 repacks the weight in place on the eval pass; the next backward then fails with this
    # error (or, on other shapes, trains with missing adapter gradients). Any other error is not the trap.
    try:
        broken = _adapter_grads_all_nonzero(m, model)
    except RuntimeError as err:
        assert "a view of a leaf Variable that requires grad is being used in an in-place operation" in str(err)
        return
    assert broken, "expected missing adapter gradients without the fix"


@pytest.mark.parametrize("double_quant,expected", [(False, 4 + 32 / 64), (True, 4 + 8 / 64 + 32 / (64 * 256))])
def test_bits_per_param_match_the_paper(double_quant, expected):
    """QLoRA paper, blocksize 64: 4.5 bits/param without double quantization, ≈ 4.127 with it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 512))
    quantize_linears(model, set(), QLoraOptions(double_quant=double_quant, blocksize=64))
    s = quantized_storage(model)
    assert s["quantized_params"] == 1024 * 1024 + 1024 * 512
    assert s["packed_weight_bytes"] == s["quantized_params"] // 2
    assert s["bits_per_quantized_param"] == pytest.approx(expected, abs=0.01)


def relative_quantization_error(original: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    """||dequant(W_q) − W||_F / ||W||_F over all quantized weights together: the whole-model figure that QLoRA's
    prepare sums layer by layer (quantize_linears' ``error``), computed here from a copy of every weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    err = ref = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit) and name in original:
            w = original[name]
            deq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            err += float((deq - w).pow(2).sum())
            ref += float(w.pow(2).sum())
    return (err / ref) ** 0.5 if ref else float("nan")


@pytest.mark.real_model
def test_nf4_error_below_fp4_on_trained_weights():
    errs = {}
    for qt in ("nf4", "fp4"):
        model = load_model("minilm-l6", 2, 0).model
        originals = {
            n: mod.weight.detach().clone() for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
        }
        running = [0.0, 0.0]
        quantize_linears(model, {"classifier"}, QLoraOptions(quant_type=qt), running)
        errs[qt] = relative_quantization_error(originals, model)
        # the layer-by-layer sum QLoRA's prepare records (no copy of all float weights) is the same figure
        assert (running[0] / running[1]) ** 0.5 == pytest.approx(errs[qt], rel=1e-6)
    assert 0 < errs["nf4"] < errs["fp4"] < 0.5, errs


def test_run_records_quantization_and_merge_fidelity(tmp_path):
    cfg = cells(
        methods=[{"method": "qlora", "config": {"r": 4, "target_modules": ["query", "value"]}}],
        train={
            "steps": 6,
            "batch_size": 8,
            "lr": 5e-3,
            "max_seq_len": 32,
            "timing_warmup_steps": 1,
            "optimizer": "paged_adamw_8bit",
        },
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    mm = rec.method_metrics
    assert mm["bits_per_quantized_param"] > 4 and mm["quant_relative_error"] > 0
    assert rec.training.paging_effective is False  # CPU: bitsandbytes falls back to ordinary buffers
    assert 0 < rec.training.optimizer_state_bytes
    ex = {e.kind: e for e in rec.exports}
    assert set(ex) == {"adapter", "merged_4bit", "merged_fp32"}
    assert ex["merged_fp32"].max_abs_logit_diff < 1e-4  # exact up to float rounding
    assert ex["merged_4bit"].max_abs_logit_diff > ex["merged_fp32"].max_abs_logit_diff  # requantization is lossy
    assert ex["merged_4bit"].bytes_on_disk < ex["merged_fp32"].bytes_on_disk
    assert all(e.eval is not None for k, e in ex.items() if k != "adapter")
    lora = run_cell(
        cells(
            methods=[{"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}}],
            train=cfg.train.model_dump(),
        )[0].model_copy(update={"export": False}),
        tmp_path,
    )
    assert rec.weight_bytes < lora.weight_bytes


def test_the_requantized_merge_is_left_out_on_request(tmp_path):
    """`export_merged_4bit: false` (the demo's choice: it saves an export and an evaluation): the adapter and the
    merged float32 model only."""
    cfg = cells(
        methods=[{"method": "qlora", "config": {"r": 4, "target_modules": ["query"], "export_merged_4bit": False}}],
        train={"steps": 2, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    assert [e.kind for e in rec.exports] == ["adapter", "merged_fp32"] and rec.exports[1].eval is not None


def test_the_adapter_is_served_on_the_unquantized_base_as_users_load_it(tmp_path):
    """A QLoRA adapter is usually loaded on the base as published, not on the 4-bit base it trained on. That
    deployable form is measured too: the base loaded again from its folder (not NF4's rounding of it) and the
    adapter as trained, from disk, scored and timed."""
    from peft.tuners.lora import LoraLayer

    folder = saved_tiny_bert(tmp_path / "base")
    cfg = cells(
        models=[folder],
        methods=[{"method": "qlora", "config": {"r": 4, "target_modules": ["query"], "export_merged_4bit": False}}],
        train={"steps": 3, "batch_size": 8, "lr": 1e-2, "max_seq_len": 32, "timing_warmup_steps": 1},
        deploy={"enabled": True, "repeats": 1},
    )[0]
    rec = run_cell(cfg, tmp_path / "run")
    assert rec.status == "ok", rec.error
    forms = {d.name: d for d in rec.exports[0].deployments}
    assert set(forms) == {"nf4 + adapter", "adapter on the fp32 base"}
    on_base = forms["adapter on the fp32 base"]
    assert on_base.error is None and on_base.load_time_s > 0 and on_base.latency
    assert on_base.eval.examples == rec.eval_after.examples
    # the card's deployments: the in-memory form is the trained model itself, so it gives the same answers
    card = (Path(rec.exports[0].path) / "README.md").read_text()
    assert "| nf4 + adapter | float32 | — (in memory) |" in card and "| the same answers |" in card, card
    # what that form loads: the folder's own weights under the trained adapter
    model, ctx = load_model(folder, 2, 0).model, ModelContext("seq_cls", 2, "bert", head_names=["classifier"])
    original = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    method = get_method("qlora")(QLoraOptions(r=4, target_modules=["query"], export_merged_4bit=False))
    ctx.load_base = lambda: load_model(folder, 2, 0).model
    trained = method.prepare(model, ctx)
    layer = next(m for m in trained.modules() if isinstance(m, LoraLayer))
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # a trained adapter: B is no longer zero
    export = method.export(trained, tmp_path / "export")[0]
    served = next(d for d in export.deploy if d.name == "adapter on the fp32 base").load()
    query = next(m for m in served.modules() if isinstance(m, LoraLayer))
    assert torch.equal(query.get_base_layer().weight, original)  # not dequant(NF4(W)): W itself
    assert torch.equal(query.lora_B["default"].weight, layer.lora_B["default"].weight)


def test_a_pissa_adapter_is_not_put_on_the_unquantized_base(tmp_path):
    """QPiSSA's adapter holds W's principal part and the base the quantized rest: on W itself it would count that
    part twice, so that form is skipped, saying why."""
    folder = saved_tiny_bert(tmp_path / "base")
    model, ctx = load_model(folder, 2, 0).model, ModelContext("seq_cls", 2, "bert", head_names=["classifier"])
    ctx.load_base = lambda: load_model(folder, 2, 0).model
    method = get_method("qlora")(QLoraOptions(r=4, target_modules=["query"], init_lora_weights="pissa"))
    export = method.export(method.prepare(model, ctx), tmp_path / "export")[0]
    on_base = next(d for d in export.deploy if d.name == "adapter on the fp32 base")
    assert on_base.load is None and "pissa adapter belongs on the base ftbench quantized" in on_base.skipped


def test_int_export_for_the_qalora_comparison(tmp_path):
    cfg = cells(
        methods=[{"method": "qlora", "config": {"r": 4, "export_int_bits": 3, "export_int_group_size": 16}}],
        train={"steps": 4, "batch_size": 8, "lr": 5e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    ex = {e.kind: e for e in rec.exports}
    assert ex["merged_int3"].eval is not None and ex["merged_int3"].max_abs_logit_diff > 0
    assert "requantized to INT3 group 16" in ex["merged_int3"].notes
