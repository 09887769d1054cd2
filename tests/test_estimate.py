"""The memory estimator against (a) ftbench's own measured runs and (b) published figures."""

import itertools

import pytest
import torch

from harness.cell.loop import train
from harness.cell.models import load_model
from harness.contract import ModelContext
from harness.driver.cli import main
from harness.measure.estimate import ARCHS, Setup, arch_from_config, estimate
from harness.registry import get_method
from harness.schema import TrainConfig
from harness.tasks.builtin import TaskSpec, load_task
from harness.tasks.classifier import encode, train_batches

GB = 1e9
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_parameter_counts_of_the_shipped_configs():
    counts = {n: sum(a.params().values()) / 1e9 for n, a in ARCHS.items()}
    assert counts["llama-7b"] == pytest.approx(6.74, abs=0.01)
    assert counts["llama-13b"] == pytest.approx(13.02, abs=0.01)
    assert counts["llama-65b"] == pytest.approx(65.29, abs=0.01)
    assert counts["llama-70b"] == pytest.approx(68.98, abs=0.01)
    assert counts["gpt3-175b"] == pytest.approx(174.6, abs=0.1)


@pytest.mark.parametrize("method,config", [("full", {}), ("lora", {"r": 8, "target_modules": ALL_LINEAR})])
def test_matches_measured_peak_on_tiny_llama(method, config):
    """(a) Same architecture, batch and sequence length, fp32: estimate within 10% of the measured peak."""
    task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=64))
    lm = load_model("tiny-llama", 2, 0)
    cls = get_method(method)
    m = cls(cls.Config.model_validate(config))
    model = m.prepare(lm.model, ModelContext("seq_cls", 2, "llama", ["score"]))
    batch = next(train_batches(encode(task.train, lm.tokenizer, 64), 8, 0, 0))
    cfg = TrainConfig(steps=2, batch_size=8, max_seq_len=64, timing_warmup_steps=2)
    res = train(model, m, itertools.repeat(batch), cfg, 0, torch.device("cpu"))
    est = estimate(
        arch_from_config(lm.model.config, lm_head=False),
        Setup(
            method=method, r=8, batch=8, seq_len=batch["input_ids"].shape[1], weight_dtype_bytes=4, activation_bytes=4
        ),
    )
    assert est["peak"] == pytest.approx(res.peak_live_tensor_bytes, rel=0.10)


@pytest.mark.parametrize("name,paper_gb", [("llama-7b", 5), ("llama-13b", 10), ("llama-33b", 21), ("llama-65b", 41)])
def test_qlora_model_sizes_against_the_paper(name, paper_gb):
    """(b) QLoRA paper: 4-bit models take ≈ 5 / 10 / 21 / 41 GB. The estimate counts weights alone (NF4 + double
    quantization, 16-bit embeddings and head); the paper's figures also hold runtime buffers, so the estimate
    is lower — by 16–28%, see docs/estimator.md."""
    w = estimate(ARCHS[name], Setup(method="qlora"))["weights"] / GB
    assert 0.70 * paper_gb <= w <= paper_gb


def test_qlora_65b_finetuning_fits_a_48gb_gpu():
    e = estimate(
        ARCHS["llama-65b"],
        Setup(method="qlora", r=64, grad_checkpointing=True, optimizer="paged_adamw_32bit", batch=1, seq_len=512),
    )
    assert e["peak"] < 48 * GB
    full16 = estimate(ARCHS["llama-65b"], Setup(method="full"))
    assert full16["peak"] > 10 * 48 * GB  # 16-bit full fine-tuning needs > 780 GB, as the paper says


def test_lora_paper_gpt3():
    """(b) LoRA paper: GPT-3 175B, 1.2 TB during training → 350 GB with LoRA (r=4 on W_q, W_v)."""
    g = ARCHS["gpt3-175b"]
    lora = estimate(g, Setup(method="lora", r=4, targets=("q_proj", "v_proj")))
    full = estimate(g, Setup(method="full"))
    assert lora["peak"] / GB == pytest.approx(350, rel=0.10)
    assert full["peak"] / lora["peak"] > 3  # the paper: 1.2 TB / 350 GB ≈ 3.4×


def test_estimate_command_prints_the_table(capsys):
    assert main(["estimate", "--model", "llama-7b", "--model", "llama-65b", "--grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    from harness.measure.estimate import estimated_methods

    # one row per method with a memory model: the built-ins, and any a test before this one registered
    rows = estimated_methods()
    assert {"full", "lora", "qlora", "qalora", "qat_lora"} <= set(rows)
    assert out.count("| llama-7b |") == len(rows) and out.count("| llama-65b |") == len(rows) and "peak GB" in out
    assert "| llama-7b | qat_lora |" in out
    assert main(["estimate", "--model", "llama-8b"]) == 2


def test_estimate_command_states_the_weights_dtype(capsys):
    """The papers' bf16 weights by default; --weights fp32 is ftbench's runs: fp32 weights, and under bf16
    autocast a bf16 copy of each for backward (llama-7b, LoRA: 13.5 → 27.0 GB of weights, +13.2 of copies)
    and the norms' fp32 inputs."""
    rows = {}
    for weights in ("bf16", "fp32"):
        assert main(["estimate", "--model", "llama-7b", "--method", "lora", "--weights", weights]) == 0
        out = capsys.readouterr().out
        rows[weights] = [float(c) for c in out.splitlines()[2].strip("|").split("|")[2:] if "M" not in c]
        assert ("weights fp32 under bf16 autocast" in out) == (weights == "fp32")
    assert rows["fp32"][0] == pytest.approx(2 * rows["bf16"][0], rel=0.02)  # weights GB
    a = ARCHS["llama-7b"]
    copies = (a.params()["linear"] + a.vocab * a.hidden) * 2 / GB  # every block linear and the head, in bf16
    # per token and layer: the norms' fp32 inputs (2·h · 4 bytes) and the five bf16 casts of their outputs kept
    # by q, k, v, gate and up (5·h · 2), where bf16 weights keep the norms' inputs and outputs (4·h · 2)
    block = 512 * a.layers * (2 * a.hidden * 4 + 5 * a.hidden * 2 - 4 * a.hidden * 2) / GB
    assert rows["fp32"][3] - rows["bf16"][3] == pytest.approx(copies + block, abs=0.1)  # activations GB


def test_a_small_models_estimate_keeps_two_significant_figures(capsys):
    """MiniLM's LoRA estimate printed weights 0.0 GB and peak 0.1: now 0.047 and 0.12."""
    assert main(["estimate", "--model", "minilm-l6", "--method", "lora"]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| minilm-l6 | lora |"))
    weights, *_, peak = [c.strip() for c in row.strip("|").split("|")[2:]]
    assert float(weights) == pytest.approx(22.7e6 * 2 / 1e9, rel=0.05) and len(weights) == 5  # 0.0xx
    assert 0.05 < float(peak) < 1 and len(peak.split(".")[1]) >= 2


def test_fused_adamw_holds_no_scratch_and_the_estimate_follows_both_implementations():
    """Full fine-tuning of the tiny Llama, where the optimizer step sets the peak: torch's loop over tensors
    holds two scratch tensors the size of the embedding, the fused update none (here 23.7 against 16.0 MB
    measured). The estimate follows each within 2%."""
    task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=64))
    lm = load_model("tiny-llama", 2, 0)
    m = get_method("full")(get_method("full").Config())
    model = m.prepare(lm.model, ModelContext("seq_cls", 2, "llama", ["score"]))
    batch = next(train_batches(encode(task.train, lm.tokenizer, 64), 8, 0, 0))
    arch = arch_from_config(lm.model.config, lm_head=False)
    peaks = {}
    for fused in (True, False):
        cfg = TrainConfig(steps=2, batch_size=8, max_seq_len=64, timing_warmup_steps=2, optimizer_args={"fused": fused})
        res = train(model, m, itertools.repeat(batch), cfg, 0, torch.device("cpu"))
        seq = batch["input_ids"].shape[1]
        setup = Setup(
            method="full", batch=8, seq_len=seq, weight_dtype_bytes=4, activation_bytes=4, optimizer_fused=fused
        )
        assert estimate(arch, setup)["peak"] == pytest.approx(res.peak_live_tensor_bytes, rel=0.02)
        peaks[res.optimizer_implementation] = res.peak_live_tensor_bytes
    scratch = 2 * lm.model.config.vocab_size * lm.model.config.hidden_size * 4
    assert peaks["for-loop"] - peaks["fused"] == pytest.approx(scratch, rel=0.05), peaks


def _wide_llama(tied: bool, intermediate: int = 704, hidden: int = 256, vocab: int = 4000):
    """A Llama whose block linears outweigh its activations, as at real sizes (vocabulary 4000: the head counts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _measured_and_estimated(
    method: str, config: dict, dtype: str, tied: bool, batch: int = 4, seq: int = 32, mlp: tuple[int, int] = (704, 256)
) -> tuple[float, float, dict]:
    model = _wide_llama(tied, *mlp)
    cls = get_method(method)
    m = cls(cls.Config.model_validate(config))
    arch = arch_from_config(model.config)
    model = m.prepare(model, ModelContext("causal_lm", 0, "llama", output_names=["lm_head"]))
    ids = torch.randint(0, 4000, (batch, seq), generator=torch.Generator().manual_seed(0))
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    cfg = TrainConfig(steps=3, batch_size=batch, max_seq_len=seq, timing_warmup_steps=1, dtype=dtype)
    res = train(model, m, itertools.repeat(rows), cfg, 0, torch.device("cpu"))
    act = 4 if dtype == "float32" else 2
    targets = tuple(config["target_modules"]) if "target_modules" in config else None
    setup = Setup(method, 8, targets, batch=batch, seq_len=seq, weight_dtype_bytes=4, activation_bytes=act)
    return estimate(arch, setup, m.memory_model())["peak"], res.peak_live_tensor_bytes, res.memory_at_peak_bytes


@pytest.mark.parametrize(
    "method,config",
    [
        ("lora", {"r": 8, "target_modules": ALL_LINEAR}),
        ("lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
        ("qat_lora", {"r": 8, "target_modules": ALL_LINEAR}),
    ],
)
def test_autocast_weight_copies_are_counted(method, config):
    """bf16 autocast over fp32 weights: F.linear keeps a bf16 copy of each float weight it multiplies (and the
    head's) for backward; QAT-LoRA's straight-through matmul keeps none (nor do quantized bases: the test
    below). Without the copies LoRA's estimate was 25% under the measured peak; with them on QAT-LoRA's adapted
    linears, 14% over."""
    est, measured, _ = _measured_and_estimated(method, config, "bfloat16", False)
    assert est == pytest.approx(measured, rel=0.07)


@pytest.mark.parametrize("method", ["qlora", "qalora"])
def test_quantized_linears_keep_their_mlp_in_fp32_under_autocast(method):
    """Their linears return the fp32 residual stream's dtype under bf16 autocast, so gate, up and SiLU's outputs
    are kept in fp32, and only the head's bf16 weight copy. An MLP-heavy shape (hidden 64, intermediate 4096,
    4 × 64 tokens): without the fp32 term the estimate was 23% (QLoRA) and 25% (QA-LoRA) under the measured peak."""
    config = {"r": 8, "compute_dtype": "bfloat16", **({"target_modules": ALL_LINEAR} if method == "qlora" else {})}
    est, measured, _ = _measured_and_estimated(method, config, "bfloat16", False, batch=4, seq=64, mlp=(4096, 64))
    assert est == pytest.approx(measured, rel=0.07)


def test_a_tied_embeddings_gradient_sum_beside_the_optimizer_state():
    """Full fine-tuning with the embedding tied to the head: backward ends with every gradient, the embedding's
    second contribution and their sum, beside the optimizer state made by step 0 (so step 1 is measured)."""
    est, measured, at_peak = _measured_and_estimated("full", {}, "float32", True)
    table = 4000 * 256 * 4
    assert at_peak["optimizer_state"] > 0 and at_peak["temporaries"] >= 2 * table, at_peak
    assert est == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize(
    "method,config",
    [
        ("lora", {"r": 8, "target_modules": ALL_LINEAR}),
        ("qlora", {"r": 8, "target_modules": ALL_LINEAR, "compute_dtype": "bfloat16"}),
        ("qalora", {"r": 8, "compute_dtype": "bfloat16"}),
    ],
)
def test_the_blocks_bytes_per_token_under_autocast_are_those_autograd_saves(method, config):
    """Per token (two sequence lengths: what does not grow with them drops out), bf16 autocast over fp32 weights:
    the norms' inputs are fp32 and each adapted q, k, v, gate and up keeps its own bf16 cast of the norm's output.
    Counted as bf16 weights would keep them, LoRA's and QLoRA's estimates were about 20% under what autograd saves."""
    model = _wide_llama(False, intermediate=352, hidden=128, vocab=16)
    arch = arch_from_config(model.config)
    cls = get_method(method)
    m = cls(cls.Config.model_validate(config))
    model = m.prepare(model, ModelContext("causal_lm", 0, "llama", output_names=["lm_head"]))

    def saved(t: int) -> int:
        kept: dict[int, int] = {}

        def pack(x):
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        ids = torch.randint(0, 16, (1, t), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
        return sum(kept.values())

    def estimated(t: int) -> float:
        setup = Setup(method, 8, None, batch=1, seq_len=t, weight_dtype_bytes=4, activation_bytes=2)
        return estimate(arch, setup, m.memory_model())["activations"]

    per_token = (saved(256) - saved(128)) / 128
    assert (estimated(256) - estimated(128)) / 128 == pytest.approx(per_token, rel=0.04)
