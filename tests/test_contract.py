"""The method contract is wide enough for methods people publish: each hook proven by a method written here,
trained through THE loop (harness/cell/loop.py) on tiny-bert and real Rotten Tomatoes reviews.

- LoRA+ (Hayou et al. 2024, arXiv 2402.12354): parameter groups, B learns ``ratio`` × faster than A;
- a method with its own optimizer (SGD with momentum on the head alone);
- a loss term: L2-SP (Li et al. 2018, arXiv 1802.01483), a pull towards a frozen copy of the pretrained weights;
- AdaLoRA (Zhang et al. 2023) through the built-in ``peft`` method: its rank budget really changes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model

from harness.cell.loop import train
from harness.cell.models import load_model
from harness.contract import MethodBase, ModelContext, register_method
from harness.registry import build_method
from harness.schema import TrainConfig
from harness.tasks.builtin import load_task
from harness.tasks.classifier import ClassifierIO
from tests.conftest import cells

CPU = torch.device("cpu")


@register_method
class LoraPlus(MethodBase):
    """LoRA+ : LoRA whose B matrices learn ``ratio`` times faster than the A matrices (and the head)."""

    name = "test_lora_plus"

    def __init__(self, ratio: float = 16.0) -> None:
        super().__init__()
        self.ratio = ratio

    def prepare(self, model, ctx):
        return get_peft_model(model, LoraConfig(task_type=ctx.peft_task_type, r=4, target_modules=["query", "value"]))

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def param_groups(self, named, lr):
        b = [p for n, p in named if "lora_B" in n]
        rest = [p for n, p in named if "lora_B" not in n]
        return [{"params": rest, "name": "A and head", "lr": lr}, {"params": b, "name": "B", "lr": lr * self.ratio}]


@register_method
class HeadMomentum(MethodBase):
    """Only the head trains, with SGD + momentum of the method's own choosing (whatever the suite's optimizer)."""

    name = "test_head_momentum"

    def prepare(self, model, ctx):
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier"))
        return model

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def optimizer(self, groups, lr, weight_decay):
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


@register_method
class L2SP(MethodBase):
    """Full fine-tuning plus strength · Σ ||θ − θ₀||² over the body, θ₀ a frozen copy of the pretrained weights."""

    name = "test_l2sp"

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength

    def prepare(self, model, ctx):
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("classifier")}
        return model

    def trainable_parameters(self, model):
        return list(model.named_parameters())

    def loss_term(self, model, batch):
        params = dict(model.named_parameters())
        return self.strength * sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items())


def _setup(method, steps=8, lr=1e-3, optimizer="adamw"):
    cfg = cells()[0]
    loaded = load_model("tiny-bert", num_labels=2, seed=0)
    io = ClassifierIO(load_task(cfg.task), loaded.tokenizer, 32)
    ctx = ModelContext("seq_cls", 2, "bert", ["classifier"], train_steps=steps)
    model = method.prepare(loaded.model, ctx)
    tc = TrainConfig(steps=steps, batch_size=8, lr=lr, timing_warmup_steps=1, optimizer=optimizer, schedule="constant")
    return model, io, tc


def _train(method, steps=8, lr=1e-3, optimizer="adamw"):
    model, io, tc = _setup(method, steps, lr, optimizer)
    return model, train(model, method, io.batches(8, 0), tc, 0, CPU, io.objective)


def test_lora_plus_groups_train_b_sixteen_times_faster():
    runs = {}
    for ratio in (1.0, 16.0):
        before = None
        model, io, tc = _setup(LoraPlus(ratio))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        res = train(model, LoraPlus(ratio), io.batches(8, 0), tc, 0, CPU, io.objective)
        b_norm = sum(float(p.norm()) for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0
        a_moved = sum(float((p - before[n]).norm()) for n, p in model.named_parameters() if "lora_A" in n)
        runs[ratio] = (res, b_norm, a_moved)
    res16 = runs[16.0][0]
    groups = {g["name"]: g for g in res16.optimizer_groups}
    assert groups["B"]["lr"] == pytest.approx(16 * groups["A and head"]["lr"])
    assert groups["B"]["tensors"] == 4  # query and value of tiny-bert's 2 layers
    assert runs[16.0][1] > 3 * runs[1.0][1]  # B really moved faster (Adam: ~ lr × steps)
    assert runs[16.0][0].losses != runs[1.0][0].losses


def test_a_method_supplies_its_own_optimizer():
    model, res = _train(HeadMomentum(), optimizer="adamw")
    head = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("classifier"))
    assert res.optimizer == "SGD (the method's own)"
    assert res.optimizer_state_bytes == head  # one momentum buffer (AdamW would keep two moments)
    assert res.losses[-1] < res.losses[0]


def test_a_loss_term_reaches_the_gradients():
    def drift(model, method):
        return sum(float((p - method.anchor[n]).norm()) for n, p in model.named_parameters() if n in method.anchor)

    free, tied = L2SP(0.0), L2SP(5.0)
    model_free, res_free = _train(free, steps=6)
    model_tied, res_tied = _train(tied, steps=6)
    assert drift(model_tied, tied) < 0.5 * drift(model_free, free)  # the pull held the body near θ₀
    assert res_tied.losses[0] == pytest.approx(res_free.losses[0])  # θ = θ₀ at the first step: no penalty yet
    assert res_tied.losses[-1] != res_free.losses[-1]


def test_adalora_through_peft_reallocates_its_rank_budget():
    config = {"peft_type": "ADALORA", "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 1}
    method = build_method("peft", {**config, "target_modules": ["query", "value"]})
    model, io, tc = _setup(method, steps=12, lr=1e-2)
    assert model.peft_config["default"].total_step == 12  # from the run's steps: the suite gave none
    calls = []
    real = model.base_model.update_and_allocate
    model.base_model.update_and_allocate = lambda step: (calls.append(step), real(step))[1]
    train(model, method, io.batches(8, 0), tc, 0, CPU, io.objective)
    assert calls == list(range(12))  # after every optimizer step
    report = method.report(model)
    assert report["active_rank_initial"] == 6 * 4  # init_r on 4 layers
    assert report["active_rank_final"] <= 2 * 4 < report["active_rank_initial"]  # down to the target budget
    assert len(report["active_rank_changes"]) > 2  # and stepwise, not at once


def test_param_groups_must_cover_the_trainable_parameters():
    class Partial(LoraPlus):
        def param_groups(self, named, lr):
            return super().param_groups(named, lr)[:1]

    model, io, tc = _setup(Partial())
    with pytest.raises(ValueError, match="exactly once"):
        train(model, Partial(), itertools.islice(io.batches(8, 0), 1), tc, 0, CPU, io.objective)


def test_a_method_states_its_memory_model_and_joins_the_estimator():
    """``memory_model``: the estimator at scale asks the method (harness/measure/estimate.py branches on no name);
    a method that states none is "not estimated", said in its row."""
    from harness.contract import _REGISTRY, MemoryModel
    from harness.measure.estimate import ARCHS, NotEstimated, Setup, estimate

    class Int8Adapters(MethodBase):  # LoRA at rank 4 on an INT8 base: a method the estimator never heard of
        name = "test_int8_adapters"

        def prepare(self, model, ctx):
            return model

        def trainable_parameters(self, model):
            return []

        def memory_model(self):
            return MemoryModel(trains="adapters", rank=4, linear_bits=8.0)

    class Silent(Int8Adapters):
        name = "test_silent"
        memory_model = MethodBase.memory_model

    register_method(Int8Adapters)
    register_method(Silent)
    try:
        arch = ARCHS["llama-7b"]
        mine = estimate(arch, Setup(method="test_int8_adapters"))
        lora = estimate(arch, Setup(method="lora", r=4))
        assert mine["trainable_params"] == lora["trainable_params"]  # the same adapters
        adapters = mine["trainable_params"] * 4  # the fp32 adapters themselves
        assert mine["weights"] == arch.params()["linear"] + arch.params()["other"] * 2 + adapters  # 1 byte per linear
        with pytest.raises(NotEstimated, match="test_silent: not estimated"):
            estimate(arch, Setup(method="test_silent"))
    finally:
        _REGISTRY.pop("test_int8_adapters")
        _REGISTRY.pop("test_silent")


def test_check_model_gets_the_context_prepare_will_get():
    """``check_model(model, ctx)``: validation hands the method the heads and outputs it will see in ``prepare``
    (QA-LoRA no longer hard-codes head names), on the weightless skeleton."""
    from harness.contract import _REGISTRY
    from harness.driver.suite import parse_suite
    from harness.schema import ConfigError
    from tests.conftest import tiny_suite

    seen = []

    class Picky(MethodBase):
        name = "test_picky"

        def check_model(self, model, ctx):
            seen.append((ctx.task_type, ctx.head_names, ctx.output_names, ctx.model_type))
            if ctx.head_names:
                raise ValueError("needs a model without a classification head")

        def prepare(self, model, ctx):
            return model

        def trainable_parameters(self, model):
            return []

    register_method(Picky)
    try:
        with pytest.raises(ConfigError, match=r"methods\[0\].config: needs a model without a classification head"):
            parse_suite(tiny_suite(methods=[{"method": "test_picky"}]), "s.yaml")
        parse_suite(tiny_suite(models=["tiny-llama"], methods=[{"method": "test_picky"}]), "s.yaml")
    finally:
        _REGISTRY.pop("test_picky")
    assert seen == [("seq_cls", ["classifier"], [], "bert"), ("causal_lm", [], ["lm_head"], "llama")]


def test_virtual_tokens_a_method_adds_count_in_the_model_flops():
    """Prompt tuning joins 8 virtual token embeddings to every sequence, and every layer computes them: MFU's
    model FLOPs count them (prefix tuning's go to the attention's keys and values only, and are not)."""
    from harness.measure.flops import flops_per_token, training_flops

    prompt = build_method("peft", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8})
    prefix = build_method("peft", {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8})
    model, io, tc = _setup(prompt, steps=4)
    _setup(prefix, steps=4)
    assert (prompt.positions_added(), prefix.positions_added(), MethodBase().positions_added()) == (8, 0, 0)
    res = train(model, prompt, io.batches(8, 0), tc, 0, CPU, io.objective)
    flops = {n: training_flops(model, [], res, "float32", None, CPU, n)["model_flops_per_step"] for n in (0, 8)}
    f = flops_per_token(model)
    samples = [res.samples_per_step[i] for i in res.timed_steps]
    # each layer on 8 more positions per row, and each row's attention over 8 more queries and keys: (w + 8)² − w²
    widened = [16 * res.computed_tokens_per_step[i] + 64 * res.samples_per_step[i] for i in res.timed_steps]
    added = f["total"] * 8 * sum(samples) + f["attention_per_pair"] * sum(widened)
    assert f["attention_per_pair"] > 0 and flops[8] - flops[0] == pytest.approx(added / len(samples))
