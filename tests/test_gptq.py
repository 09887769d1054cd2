"""QA-LoRA with a GPTQ-quantized base (gptqmodel, the optional extra ftbench[gptq]): GPTQ's integers carry over
into ftbench's format unchanged, GPTQ beats round-to-nearest where it should (output error on the calibration
inputs), and ftbench's QA-LoRA forward equals peft's ``use_qalora`` forward on the same gptqmodel layer."""

import pytest
import torch

from harness.libs import gptqmodel_installed, import_gptqmodel_quietly  # noqa: E402

if not gptqmodel_installed():
    pytest.skip("needs the optional extra gptqmodel", allow_module_level=True)

from harness.cell.run import run_cell  # noqa: E402
from methods.gptq import gptq_quantize  # noqa: E402
from methods.intquant import QuantLinear, quantize_rtn  # noqa: E402
from methods.qalora_layer import QALoraLinear  # noqa: E402
from tests.conftest import cells  # noqa: E402


class Toy(torch.nn.Module):
    """Two blocks of one Linear each, named like a transformer's (``layers.<i>.proj``)."""

    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"proj": torch.nn.Linear(d, d)}) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = torch.tanh(block["proj"](x))
        return x


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant directions and outlier channels, as activations have (where GPTQ pays off)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, d, generator=g)
    x = torch.randn(n, 8, generator=g) @ basis + 0.05 * torch.randn(n, d, generator=g)
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_integers_carry_over_and_beat_rtn_on_outputs(bits):
    torch.manual_seed(0)
    model = Toy()
    original = [b["proj"].weight.detach().clone() for b in model.layers]
    x = _correlated_inputs(512, 128)
    targets = [(f"layers.{i}.proj", b["proj"]) for i, b in enumerate(model.layers)]
    qs = gptq_quantize(model, targets, [{"x": x[i : i + 128]} for i in range(0, 512, 128)], bits, 32,
                       torch.float32, torch.float32)  # fmt: skip
    assert set(qs) == {"layers.0.proj", "layers.1.proj"} and isinstance(model.layers[0]["proj"], QuantLinear)
    q = qs["layers.0.proj"]
    ints = q.int_weight()
    assert int(ints.max()) <= 2**bits - 1 and len(torch.unique(ints)) > 2 ** (bits - 1)
    rtn = QuantLinear(128, 128, bits, 32, True, torch.float32, torch.float32)
    rtn.set_quantized(*quantize_rtn(original[0], bits, 32))
    ref = x @ original[0].T
    err_gptq = float((x @ q.weight_dequantized(torch.float32).T - ref).pow(2).mean())
    err_rtn = float((x @ rtn.weight_dequantized(torch.float32).T - ref).pow(2).mean())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_qalora_forward_equals_peft_use_qalora_on_a_gptqmodel_layer(monkeypatch):
    """Same integers, same adapter: ftbench's QALoraLinear and peft's GPTQLoraLinear(use_qalora) agree.
    peft pools the input as mean × (d_in / g); ftbench (the paper) sums over each group, i.e. mean × g — so the
    same function needs A_ftbench = A_peft × d_in / g²."""
    # gptqmodel's pack() compiles a C++ extension on first use (about 50 s on a fresh 2-core machine, once per
    # ~/.cache); its Python path packs the same integers. ftbench itself never packs through gptqmodel.
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    import peft.import_utils
    from peft import LoraConfig, get_peft_model

    (qlinear,) = import_gptqmodel_quietly("gptqmodel.nn_modules.qlinear.torch")
    TorchLinear = qlinear.TorchLinear  # noqa: N806
    peft.import_utils.is_gptqmodel_available.cache_clear()  # peft asked while gptqmodel was hidden

    d_in, d_out, g, bits, r = 256, 64, 32, 4, 4
    torch.manual_seed(0)
    scale = torch.rand(d_out, d_in // g) * 0.02 + 0.005
    zero_int = torch.randint(0, 2**bits, (d_out, d_in // g)).float()
    q = torch.randint(0, 2**bits, (d_out, d_in))
    w = ((q.reshape(d_out, -1, g) - zero_int[..., None]) * scale[..., None]).reshape(d_out, d_in)
    lin = torch.nn.Linear(d_in, d_out, bias=False)
    lin.weight.data = w.half().float()

    gq = TorchLinear(bits=bits, group_size=g, sym=False, desc_act=False, in_features=d_in, out_features=d_out)
    gq.pack(lin, scale.half(), zero_int.int(), torch.arange(d_in) // g)
    # post_init() would torch.compile the dequantization (Inductor: a C++ compile on a fresh machine, and NaN
    # weights when ATen runs its AVX2 kernels on an AVX-512 CPU, ATEN_CPU_CAPABILITY=avx2). The eager path is the
    # same arithmetic, and the arithmetic is what this test compares.
    gq.optimized = True
    gq.post_init()
    gq.eval()

    ours = QuantLinear(d_in, d_out, bits, g, False, torch.float32, torch.float32)
    ours.set_quantized(q.to(torch.uint8), scale.half().float(), -scale.half().float() * zero_int)
    x = torch.randn(3, 5, d_in)
    assert torch.allclose(gq(x.half()).float(), ours(x), atol=2e-2, rtol=1e-2)  # same base weights

    holder = torch.nn.Module()
    holder.proj = gq
    holder.hf_device_map = {"": "cpu"}  # peft reads the device from a parameter, and this layer has only buffers
    peft_model = get_peft_model(
        holder, LoraConfig(r=r, lora_alpha=8, target_modules=["proj"], use_qalora=True, qalora_group_size=g)
    )
    layer = peft_model.base_model.model.proj
    assert type(layer).__name__ == "GPTQLoraLinear" and layer.lora_A["default"].weight.shape == (r, d_in // g)
    a_peft, b = torch.randn(r, d_in // g) * 0.1, torch.randn(d_out, r) * 0.1
    layer.lora_A["default"].weight.data = a_peft.clone()
    layer.lora_B["default"].weight.data = b.clone()

    mine = QALoraLinear(ours, r, 8, 0.0)
    mine.lora_A.weight.data = a_peft * d_in / g**2
    mine.lora_B.weight.data = b.clone()
    with torch.no_grad():
        base_out = gq(x.half()).float()
        peft_delta = layer(x.half()).float() - base_out
        our_delta = mine(x) - ours(x)
    assert torch.allclose(peft_delta, our_delta, atol=1e-2, rtol=1e-2), float((peft_delta - our_delta).abs().max())
    assert float(our_delta.abs().max()) > 0.1  # the adapter is not a no-op


def test_qalora_run_with_gptq_quantizer(tmp_path):
    """End to end on the tiny decoder: GPTQ calibrates on training prompts; the merge stays exact."""
    cfg = cells(
        models=["tiny-llama"],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 64, "eval_examples": 32}],
        train={"steps": 3, "batch_size": 8, "lr": 1e-3, "max_seq_len": 48, "timing_warmup_steps": 1},
        methods=[
            {"method": "qalora", "config": {"r": 4, "group_size": 32, "quantizer": "gptq", "calibration_examples": 32}}
        ],
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    m = rec.method_metrics
    assert m["quantizer"] == "gptq" and m["integer_weights_unchanged"] and m["bits_per_quantized_param"] == 5.0
    merged = next(e for e in rec.exports if e.kind == "merged_int")
    assert merged.max_abs_logit_diff < 1e-2 and merged.eval.accuracy == rec.eval_after.accuracy
