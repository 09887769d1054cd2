"""QA-LoRA's parameterisation options (issue: the quantized-merge league): pooling sum | mean, A's init,
dropout after pooling, group sizes down to 1, where QA-LoRA is exactly LoRA on the quantized base."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from harness.cell.models import load_model
from harness.contract import ModelContext
from harness.registry import get_method
from methods.intquant import QuantLinear, int_forms
from methods.qalora_layer import QALoraLinear

CTX = ModelContext("seq_cls", 2, "bert", ["classifier"])
X = torch.randint(1000, 3000, (4, 16))


def _prepared(**cfg):
    cls = get_method("qalora")
    m = cls(cls.Config(**{"r": 4, "alpha": 8, **cfg}))
    return m, m.prepare(load_model("tiny-bert", 2, 0).model, CTX)


def _trainable(params) -> int:
    return sum(p.numel() for _, p in params)


def test_group_size_one_is_lora_on_the_quantized_base():
    """g = 1: every weight its own group (the fp16-rounded weight), pooling the identity; the same trainable
    count as LoRA on the same layers, and, with the same A and B, the same outputs."""
    m, model = _prepared(bits=4, group_size=1)
    base = load_model("tiny-bert", 2, 0).model
    for path in m._layers:  # LoRA's base: the weights QA-LoRA's g = 1 quantizer kept, fp16-rounded
        lin = base.get_submodule(path)
        lin.weight.data = lin.weight.data.half().float()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=m._layers, modules_to_save=["classifier"]))
    assert _trainable(m.trainable_parameters(model)) == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    torch.manual_seed(3)
    for path in m._layers:
        q, peft_layer = model.get_submodule(path), lora.base_model.model.get_submodule(path)
        torch.nn.init.normal_(q.lora_B.weight, std=0.1)  # B starts at zero: give the adapters something to do
        peft_layer.lora_A["default"].weight.data = q.lora_A.weight.data.clone()
        peft_layer.lora_B["default"].weight.data = q.lora_B.weight.data.clone()
    lora.base_model.model.classifier.modules_to_save["default"].load_state_dict(model.classifier.state_dict())
    with torch.no_grad():
        a, b = model.eval()(input_ids=X).logits, lora.eval()(input_ids=X).logits
        untrained = _prepared(bits=4, group_size=1)[1].eval()(input_ids=X).logits
    assert (a - untrained).abs().max() > 1e-2  # the adapters matter
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_merged_equals_unmerged_under_both_poolings(pooling):
    m, model = _prepared(bits=3, group_size=8, pooling=pooling, param_dtype="float32")
    torch.manual_seed(1)
    for mod in model.modules():
        if isinstance(mod, QALoraLinear):
            torch.nn.init.normal_(mod.lora_B.weight, std=0.05)
    merged = m.merged_model(model)
    with torch.no_grad():
        a, b = model.eval()(input_ids=X).logits, merged(input_ids=X).logits
    assert (a - b).abs().max() < 1e-6  # float32 zero points: exact up to float32 rounding


def test_layer_merge_exact_to_1e6_with_float32_zero_points():
    for pooling in ("sum", "mean"):
        base = QuantLinear.from_linear(torch.nn.Linear(128, 16), 4, 32, torch.float32, torch.float32)
        layer = QALoraLinear(base, r=4, alpha=8, dropout=0.0, pooling=pooling)
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
        x = torch.randn(5, 128)
        with torch.no_grad():
            y = layer(x)
            assert (y - layer.merged()(x)).abs().max() < 1e-6 * y.abs().max()  # relative: float32 rounding only
            assert (y - base(x)).abs().max() > 1e-2


def test_mean_pooling_is_the_sum_scaled_by_one_over_g():
    """The same function class: a mean-pooled adapter with A × g computes what the sum-pooled one computes."""
    base = QuantLinear.from_linear(torch.nn.Linear(64, 8), 4, 16, torch.float32, torch.float32)
    s = QALoraLinear(base, r=2, alpha=4, dropout=0.0, pooling="sum")
    mean = QALoraLinear(copy.deepcopy(base), r=2, alpha=4, dropout=0.0, pooling="mean")
    torch.nn.init.normal_(s.lora_B.weight)
    mean.lora_B.weight.data = s.lora_B.weight.data.clone()
    mean.lora_A.weight.data = s.lora_A.weight.data * 16
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(s(x), mean(x), atol=1e-5)
        assert torch.allclose(s.merged()(x), mean.merged()(x), atol=1e-5)


def test_a_init_options_differ_in_scale():
    base = QuantLinear.from_linear(torch.nn.Linear(512, 256), 4, 1, torch.float32, torch.float32)
    torch.manual_seed(0)
    kaiming = QALoraLinear(base, r=8, alpha=16, dropout=0.0, a_init="kaiming").lora_A.weight.detach()
    torch.manual_seed(0)
    xavier = QALoraLinear(base, r=8, alpha=16, dropout=0.0, a_init="xavier").lora_A.weight.detach()
    # kaiming_uniform(a=√5) bound 1/√fan_in; xavier_uniform bound √(6/(fan_in + fan_out))
    assert float(kaiming.abs().max()) <= 1 / 512**0.5 + 1e-6
    assert float(xavier.abs().max()) > 1 / 512**0.5 and float(xavier.abs().max()) <= (6 / (512 + 8)) ** 0.5 + 1e-6


def test_dropout_after_pooling_drops_pooled_inputs():
    base = QuantLinear.from_linear(torch.nn.Linear(64, 8), 4, 16, torch.float32, torch.float32)
    after = QALoraLinear(base, r=2, alpha=4, dropout=0.5, dropout_after_pooling=True).train()
    seen = []
    after.lora_A.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    after(torch.ones(200, 64))
    pooled = seen[0]  # 4 group sums of 16 ones each, dropped whole or scaled by 1/(1-p)
    assert set(torch.unique(pooled).tolist()) == {0.0, 32.0}


def test_int4_kernel_skipped_below_32_with_its_reason(tmp_path):
    (form,) = [f for f in int_forms(tmp_path, 4, 16) if f.name == "int4 kernel"]
    assert form.load is None and "takes groups of 32, 64, 128, 256; this export's group is 16" in form.skipped
    assert [f.name for f in int_forms(tmp_path, 3, 16)] == ["int3 dequant"]


def test_report_names_the_parameterisation():
    m, model = _prepared(bits=4, group_size=16, pooling="mean", a_init="xavier")
    r = m.report(model)
    assert (r["pooling"], r["a_init"], r["group_size"]) == ("mean", "xavier", 16)
