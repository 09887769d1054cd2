import pytest
import torch

from harness.cell.run import run_cell
from harness.measure.flops import flops_per_token
from tests.conftest import cells


def test_full_training_is_six_n_after_a_trainable_embedding():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 10), torch.nn.Linear(10, 20), torch.nn.Linear(20, 30))
    n = 10 * 20 + 20 * 30
    f = flops_per_token(model)
    assert f["total"] == 6 * n and f["forward"] == 2 * n


def test_first_layer_needs_no_input_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 30))
    assert flops_per_token(model)["total"] == 2 * 800 + 2 * 800 + 2 * 600


def test_frozen_base_costs_forward_plus_input_gradients():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 30), torch.nn.Linear(30, 2))
    for layer in model[:2]:
        layer.requires_grad_(False)
    # only the head trains: the frozen layers before it need neither input nor weight gradients
    assert flops_per_token(model)["total"] == 2 * (200 + 600) + 3 * 2 * 60 - 2 * 60


def test_run_records_mfu(tmp_path):
    rec = run_cell(cells(methods=[{"method": "full"}])[0].model_copy(update={"export": False}), tmp_path)
    assert rec.flops_per_token["total"] > 0 and rec.model_flops_per_step > 0
    assert 0 < rec.mfu < 1 and rec.peak_matmul_flops > 1e9
    assert (tmp_path / "machine.json").exists()


@pytest.mark.parametrize("method", ["lora", "qalora"])
def test_adapter_methods_cost_less_than_full(method):
    from harness.cell.models import load_model
    from harness.contract import ModelContext
    from harness.registry import get_method

    full = flops_per_token(load_model("tiny-bert", 2, 0).model)
    cls = get_method(method)
    m = cls(cls.Config.model_validate({"r": 4}))
    model = m.prepare(load_model("tiny-bert", 2, 0).model, ModelContext("seq_cls", 2, "bert", ["classifier"]))
    adapted = flops_per_token(model)
    assert adapted["total"] < full["total"]
    # the wrapped model's attention is the base model's, gradients passing through (to the adapters) nearly all
    assert adapted["attention_forward_per_pair"] == full["attention_forward_per_pair"] > 0
    assert 2.5 * adapted["attention_forward_per_pair"] < adapted["attention_per_pair"] <= full["attention_per_pair"]


def test_each_base_matmul_counts_once_whatever_wraps_it():
    """peft's 4-bit LoRA wrapper is itself named Linear4bit: its base layer must not be counted twice."""
    from harness.cell.models import load_model
    from harness.contract import ModelContext
    from harness.registry import get_method

    counts = {}
    for method in ("lora", "qlora", "qalora"):
        cls = get_method(method)
        m = cls(cls.Config.model_validate({"r": 4, "target_modules": ["query", "key", "value", "dense"]}))
        model = m.prepare(load_model("tiny-bert", 2, 0).model, ModelContext("seq_cls", 2, "bert", ["classifier"]))
        counts[method] = flops_per_token(model)["forward"]
    full = flops_per_token(load_model("tiny-bert", 2, 0).model)["forward"]
    lora_extra = counts["lora"] - full  # the adapters' own matmuls
    assert 0 < lora_extra < 0.5 * full
    assert counts["qlora"] == counts["lora"]  # same base, same adapters
    assert full < counts["qalora"] < counts["lora"]  # A acts on d_in / g pooled inputs


def test_mfu_uses_the_methods_compute_dtype(tmp_path, monkeypatch):
    from harness.measure import hardware

    monkeypatch.setattr(hardware, "is_emulated", lambda dtype, device=None: False)  # as on an AVX512-BF16 CPU
    cfg = cells(methods=[{"method": "qlora", "config": {"r": 4, "compute_dtype": "bfloat16"}}])[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.mfu_dtype == "bfloat16" and "cpu:bfloat16" in (tmp_path / "machine.json").read_text()


def test_mfu_of_an_emulated_half_dtype_is_against_the_fp32_peak_the_emulation_runs_on(monkeypatch):
    from harness.measure import hardware
    from harness.measure.flops import mfu_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "is_emulated", lambda dtype, device=None: dtype == "float16")
    assert mfu_dtype("float16", None, cpu) == "float32"  # fp16 autocast where fp16 is emulated
    assert mfu_dtype("float32", "float16", cpu) == "float32"  # a method's compute dtype, emulated
    assert mfu_dtype("bfloat16", None, cpu) == "bfloat16" and mfu_dtype("float32", "bfloat16", cpu) == "bfloat16"
    assert mfu_dtype("float16", None) == "float16"  # no device: the dtype as resolved


def test_lm_head_is_counted_per_kept_position_not_per_token():
    """Prompts compute vocabulary logits at a few positions per row: the LM head's cost is reported apart."""
    from collections import OrderedDict

    model = torch.nn.Sequential(OrderedDict(body=torch.nn.Linear(10, 20), lm_head=torch.nn.Linear(20, 100)))
    f = flops_per_token(model, frozenset({"lm_head"}))
    assert f["total"] == 2 * 200 + 2 * 200  # forward + weight gradient; nothing trains before the body
    assert f["output_per_position"] == 3 * 2 * 2000
    assert flops_per_token(model)["total"] == f["total"] + f["output_per_position"]


def test_attention_counts_every_query_key_pair_of_the_padded_rows_as_palm_does():
    """PaLM's MFU (appendix B) counts attention, 12·L·d·T per token when everything trains: at MiniLM's 384 tokens
    it is a sixth of the work, and leaving it out read a longer run as a less efficient one."""
    from harness.cell.loop import LoopResult
    from harness.cell.models import load_model
    from harness.measure.flops import attention_dims, training_flops

    model = load_model("tiny-bert", 2, 0).model
    layers, width = attention_dims(model)
    assert (layers, width) == (model.config.num_hidden_layers, model.config.hidden_size) and width > 0
    assert attention_dims(torch.nn.Linear(2, 2)) == (0, 0)  # no config: attention not counted
    f = flops_per_token(model)
    assert f["attention_forward_per_pair"] == 4 * layers * width
    assert f["attention_per_pair"] == 3 * f["attention_forward_per_pair"]  # backward: twice the forward
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("classifier"))
    head_only = flops_per_token(model)
    assert head_only["attention_per_pair"] == head_only["attention_forward_per_pair"]  # no gradient passes through

    # two rows of 10 and one of 30 (padded): pairs 2·10² and 30²; the prompt's 4 positions widen each row
    res = LoopResult(step_times_s=[1.0, 1.0], timing_warmup_steps=1)
    res.computed_tokens_per_step, res.samples_per_step = [20, 30], [2, 1]
    res.attention_pairs_per_step, res.head_positions_per_step = [200, 900], [0, 0]
    cpu = torch.device("cpu")
    plain = training_flops(model, [], res, "float32", None, cpu)["model_flops_per_step"]
    assert plain == pytest.approx(head_only["total"] * 30 + head_only["attention_per_pair"] * 900)
    widened = training_flops(model, [], res, "float32", None, cpu, positions_added=4)["model_flops_per_step"]
    assert widened == pytest.approx(head_only["total"] * 34 + head_only["attention_per_pair"] * 34**2)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_learning_passes_gradients_back_through_every_layer(peft_type):
    """Its virtual tokens (or every layer's prefix keys and values) are trainable and feed the body from the
    start, but peft registers them after it: counted in module order, no layer passed gradients back, and prompt
    tuning's MFU on SmolLM2 read 28% beside LoRA's 57% (2026-12-07). The method says so: every layer does."""
    from harness.cell.models import load_model
    from harness.contract import ModelContext
    from harness.registry import build_method

    method = build_method("peft", {"peft_type": peft_type, "num_virtual_tokens": 4})
    model = method.prepare(load_model("tiny-bert", 2, 0).model, ModelContext("seq_cls", 2, "bert", ["classifier"]))
    lora = build_method("lora", {"r": 4})
    assert method.trains_inputs() and not lora.trains_inputs()
    f = flops_per_token(model, inputs_train=method.trains_inputs())
    assert f["backward_input"] == f["forward"] > 0 and flops_per_token(model)["backward_input"] < f["forward"]
    assert f["attention_per_pair"] == 3 * f["attention_forward_per_pair"]  # forward, and twice that backward
