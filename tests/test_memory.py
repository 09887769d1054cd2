"""The memory breakdown against analytic truth on tiny models: each category's measured maximum within 2%."""

import itertools

import pytest
import torch

from harness.cell.loop import train
from harness.cell.models import load_model
from harness.contract import ModelContext
from harness.registry import get_method
from harness.schema import TrainConfig
from harness.tasks.builtin import TaskSpec, load_task
from harness.tasks.classifier import encode, train_batches

CTX = ModelContext("seq_cls", 2, "bert", ["classifier"])


def _run(method: str, config: dict, optimizer: str = "adamw"):
    loaded = load_model("tiny-bert", 2, 0)
    cls = get_method(method)
    m = cls(cls.Config.model_validate(config))
    model = m.prepare(loaded.model, CTX)
    task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=64))
    batches = train_batches(encode(task.train, loaded.tokenizer, 32), 8, 0, 0)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, max_seq_len=32, timing_warmup_steps=2, optimizer=optimizer)
    res = train(model, m, batches, cfg, 0, torch.device("cpu"))
    return m, model, res


def _bytes(ps) -> int:
    return sum(p.numel() * p.element_size() for p in ps)


def test_full_finetuning_adamw():
    """params + grads + 2 × params of fp32 Adam state (+ one 4-byte step counter per tensor)."""
    m, model, res = _run("full", {})
    params = list(model.parameters())
    p = _bytes(params)
    got = res.memory_category_max_bytes
    assert got["params_trainable"] == p
    assert got["gradients"] == pytest.approx(p, rel=0.02)
    assert got["optimizer_state"] == pytest.approx(2 * p + 4 * len(params), rel=0.02)
    assert "params_frozen" not in got
    at = res.memory_at_peak_bytes
    assert sum(at.values()) == res.peak_live_tensor_bytes
    assert res.peak_live_tensor_bytes >= 4 * p  # weights, grads and both moments coexist at the peak


def test_lora_frozen_base_and_adapter_state():
    m, model, res = _run("lora", {"r": 4})
    trainable = [p for _, p in m.trainable_parameters(model)]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    got = res.memory_category_max_bytes
    assert got["params_frozen"] == _bytes(frozen)
    assert got["params_trainable"] == _bytes(trainable)
    assert got["gradients"] == pytest.approx(_bytes(trainable), rel=0.02)
    assert got["optimizer_state"] == pytest.approx(2 * _bytes(trainable) + 4 * len(trainable), rel=0.02)
    assert got["activations"] > 0


def test_qlora_quantized_storage_and_8bit_state():
    from methods.qlora import quantized_storage

    m, model, res = _run("qlora", {"r": 4}, optimizer="adamw_8bit")
    s = quantized_storage(model)
    truth = s["packed_weight_bytes"] + s["quant_constant_bytes"] + s["quant_code_table_bytes"]
    got = res.memory_category_max_bytes
    assert got["params_quantized"] == pytest.approx(truth, rel=0.02)
    trainable = [p for _, p in m.trainable_parameters(model)]
    assert got["gradients"] == pytest.approx(_bytes(trainable), rel=0.02)
    n = sum(p.numel() for p in trainable)
    assert got["optimizer_state"] < 2 * 4 * n / 2  # 8-bit moments: well under fp32 Adam's 8 bytes / param


def test_gradient_checkpointing_cuts_activations():
    loaded = load_model("tiny-bert", 2, 0)
    peaks = {}
    for ckpt in (False, True):
        model = load_model("tiny-bert", 2, 0).model
        m = get_method("full")(get_method("full").Config())
        model = m.prepare(model, CTX)
        task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=64))
        batches = train_batches(encode(task.train, loaded.tokenizer, 64), 16, 0, 0)
        cfg = TrainConfig(steps=1, batch_size=16, max_seq_len=64, timing_warmup_steps=1, grad_checkpointing=ckpt)
        peaks[ckpt] = train(model, m, itertools.islice(batches, 1), cfg, 0, torch.device("cpu"))
    assert (
        peaks[True].memory_category_max_bytes["activations"] < peaks[False].memory_category_max_bytes["activations"] / 2
    )
