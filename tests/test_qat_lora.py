"""Merge-aware LoRA (methods/qat_lora.py): trained through Q(W + s·BA) with a straight-through estimator; its
exported INT-N model is the model it trained, prediction for prediction."""

import pytest
import torch

from harness.cell.models import load_model
from harness.cell.run import run_cell
from harness.contract import ModelContext
from harness.registry import get_method
from methods.intquant import QuantLinear
from tests.conftest import cells

CTX = ModelContext("seq_cls", 2, "bert", ["classifier"])


def _prepared(**cfg):
    cls = get_method("qat_lora")
    m = cls(cls.Config(**{"r": 4, "alpha": 8, "group_size": 16, **cfg}))
    return m, m.prepare(load_model("tiny-bert", 2, 0).model, CTX)


def test_trainable_count_is_lora_s():
    m, model = _prepared()
    expected = sum(
        4 * (mod.in_features + mod.out_features) for p, mod in model.named_modules() if hasattr(mod, "lora_A")
    )
    assert sum(p.numel() for _, p in m.trainable_parameters(model)) == expected + 32 * 2 + 2  # + the head


def test_gradients_are_the_straight_through_estimate():
    """∂L/∂A and ∂L/∂B equal those of y = x (W + s·BA)ᵀ with Q taken as the identity (LoRA's gradients at the
    quantized point), and the forward is the quantized weight's."""
    m, model = _prepared(bits=4)
    layer = model.bert.encoder.layer[0].attention.self.query
    torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 5, 32)
    y = layer(x)
    y.pow(2).sum().backward()
    q = layer.quantized()
    with torch.no_grad():
        assert torch.equal(y, q(x))  # the same weight as the export, bit for bit
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    w_q = q.weight_dequantized(torch.float32)
    w = w_q.detach() + layer.scaling * (b @ a) - (layer.scaling * (b @ a)).detach()  # value Q(.), gradient STE
    torch.nn.functional.linear(x, w, layer.bias).pow(2).sum().backward()
    assert torch.allclose(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(layer.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_reproduces_the_trained_predictions_exactly(tmp_path, dtype):
    """Trained and evaluated under the suite's dtype (bf16: autocast), the export scored the same way."""
    method = {"method": "qat_lora", "config": {"r": 4, "bits": 4, "group_size": 16}}
    train = {"steps": 8, "batch_size": 8, "lr": 1e-2, "max_seq_len": 32, "timing_warmup_steps": 1, "dtype": dtype}
    deploy = {"enabled": True}
    rec = run_cell(cells(methods=[method], train=train, deploy=deploy)[0], tmp_path)
    assert rec.status == "ok", rec.error
    (e,) = rec.exports
    assert e.kind == "merged_int" and e.error is None
    assert e.predictions_differing == 0.0 and e.max_abs_logit_diff == 0.0  # the INT-N model is the trained one
    assert e.eval.accuracy == rec.eval_after.accuracy
    assert 4 < rec.method_metrics["quant_relative_error_initial"] * 100 < 20  # INT4 RTN on tiny-bert's weights
    (form,) = [d for d in e.deployments if d.name == "int4 dequant"]
    assert form.error is None and form.eval.accuracy == e.eval.accuracy


def test_group_size_must_divide_every_layer():
    cls = get_method("qat_lora")
    with pytest.raises(ValueError, match="group_size 64 does not divide d_in=32"):
        cls(cls.Config(group_size=64)).check_model(load_model("tiny-bert", 2, 0).model, CTX)


def test_the_int_layer_holds_integers_below_2_to_the_bits():
    m, model = _prepared(bits=3)
    q = model.bert.encoder.layer[0].attention.self.query.quantized()
    assert isinstance(q, QuantLinear) and int(q.int_weight().max()) <= 7
