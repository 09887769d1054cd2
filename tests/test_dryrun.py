"""`ftbench run SUITE --dry-run` (harness/driver/dryrun.py) and each run's own estimate (harness/measure/plan.py)."""

from __future__ import annotations

import json

import pytest
import torch

from harness.driver.suite import expand
from harness.measure.plan import measured_by_category
from harness.records import read_current
from tests.conftest import cells, run_cli, tiny_suite
from tests.test_shapes import TINY_LLAMA

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_the_dry_run_names_the_cells_that_will_not_fit_and_writes_nothing(tmp_path, write_suite):
    """Full fine-tuning of the 1B shape (~20 GiB: fp32 weights, gradients, AdamW) cannot fit an 8000 MiB limit;
    LoRA on it (~5.8 GiB) can. Nothing runs, no results dir appears."""
    suite = tiny_suite(
        models=["llama-3.2-1b-shape"],
        tasks=[{"name": "synthetic"}],
        train={"steps": 3, "batch_size": 2, "max_seq_len": 128},
        methods=[{"method": "full"}, {"method": "lora", "config": {"r": 16, "target_modules": ALL_LINEAR}}],
        memory_limit_mb=8000,
    )
    results = tmp_path / "res"
    out = run_cli("run", str(write_suite(suite)), "--dry-run", "--results", str(results))
    assert out.returncode == 0, out.stderr
    assert "will not fit (1): llama-3.2-1b-shape/synthetic/full/default/0" in " ".join(out.stdout.split())
    lines = out.stdout.splitlines()
    full = next(line for line in lines if line.strip().startswith("full/default/0"))
    lora = next(line for line in lines if line.strip().startswith("lora/default/0"))
    assert "✗" in full and "✓" in lora
    assert "test examples" not in out.stdout  # random weights on random ids: no accuracy to size
    assert not results.exists()


def test_a_dry_run_with_everything_fitting_says_so(tmp_path, write_suite):
    """A cell the estimate cannot size gets its reason whole on a line under the table, not in a column."""
    ia3 = {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": []}
    methods = [{"method": "lora", "config": {"r": 4}}, {"method": "peft", "variant": "ia3", "config": ia3}]
    suite = tiny_suite(models=["tiny-llama"], tasks=[{"name": "synthetic"}], methods=methods)
    out = run_cli("run", str(write_suite(suite)), "--dry-run", "--results", str(tmp_path / "res"))
    assert out.returncode == 0 and "every estimated cell fits (1 not estimated: above)" in out.stdout
    assert "  peft/ia3/0: peft: not estimated (the method states no memory model)" in out.stdout.splitlines()
    lora = next(line for line in out.stdout.splitlines() if line.strip().startswith("lora/default/0"))
    assert "✓" in lora and lora.rstrip().endswith("s")  # its time column, unsqueezed
    assert not (tmp_path / "res").exists()


def test_a_bad_suite_fails_the_dry_run_like_a_run(tmp_path, write_suite):
    out = run_cli("run", str(write_suite(tiny_suite(methods=[{"method": "nosuch"}]))), "--dry-run")
    assert out.returncode == 2 and "unknown method 'nosuch'" in out.stderr


def test_each_record_carries_its_estimate_beside_the_measured_peak(tmp_path, write_suite):
    """The synthetic task at batch × max_seq_len is the shape the estimate assumes. On a 2-layer Llama with a
    real model's vocabulary-to-width ratio (30522 / 512 ≈ 60; SmolLM2: 85, Llama-3.2-1B: 63), in fp32, the
    estimate is within 10% of the tracked peak for full fine-tuning and for LoRA, and counts the weights and the
    trainable parameters exactly."""
    folder = tmp_path / "narrow-llama"
    folder.mkdir()
    config = {**TINY_LLAMA, "hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8}
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    suite = tiny_suite(
        models=[{"name": str(folder), "init": "random"}],
        tasks=[{"name": "synthetic"}],
        methods=[{"method": "full"}, {"method": "lora", "config": {"r": 4, "target_modules": ALL_LINEAR}}],
    )
    assert run_cli("run", str(write_suite(suite)), "--results", str(tmp_path / "res")).returncode == 0
    records = read_current(tmp_path / "res")[0]
    assert len(records) == 2
    for r in records:
        e = r.estimate
        assert e["setup"]["batch"] == 8 and e["setup"]["seq_len"] == 32 and e["setup"]["weight_dtype_bytes"] == 4
        assert abs(e["peak_bytes"] / r.training.peak_live_tensor_bytes - 1) < 0.10, (
            r.method,
            e,
            r.training.peak_live_tensor_bytes,
        )
        assert e["trainable_params"] == r.trainable_params
        measured = measured_by_category(r)
        assert abs(measured["weights"] / e["by_category_bytes"]["weights"] - 1) < 1e-3  # rotary buffers aside


@pytest.mark.parametrize("targets", [None, ["query", "value", "intermediate.dense"], ["dense"]])
def test_an_encoders_lora_targets_are_estimated_as_peft_places_them(targets):
    """BERT's blocks name their linears query … output.dense, not q_proj … down_proj: the estimate maps them by
    position and shape, and counts exactly the adapters peft puts in the blocks (peft's default for BERT when
    none are named: query and value; "dense" is the attention output and both MLP matrices, the pooler aside)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    from harness.cell.models import skeleton
    from harness.measure.plan import estimate_run

    config = {"r": 4} if targets is None else {"r": 4, "target_modules": targets}
    (cfg,) = cells(methods=[{"method": "lora", "config": config}])
    model = skeleton("tiny-bert", mode="classifier")
    e = estimate_run(cfg, model, decoder=False)
    assert "peak_bytes" in e, e
    wrapped = get_peft_model(BertForSequenceClassification(model.config), LoraConfig(r=4, target_modules=targets))
    in_blocks = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n and ".layer." in n)
    assert in_blocks > 0 and e["trainable_params"] == in_blocks
    assert e["setup"]["r"] == 4


def test_a_method_without_a_memory_model_is_not_estimated_and_says_so():
    from harness.cell.models import skeleton
    from harness.measure.plan import estimate_run

    ia3 = {"peft_type": "IA3", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": []}
    (cfg,) = cells(methods=[{"method": "peft", "config": ia3}])
    e = estimate_run(cfg, skeleton("tiny-bert", mode="classifier"), decoder=False)
    assert e == {"not_estimated": "peft: not estimated (the method states no memory model)"}


@pytest.mark.parametrize("speedup, activation_bytes", [(4.0, 2), (0.02, 4)])
def test_the_plan_resolves_auto_dtypes_as_the_cell_will(monkeypatch, speedup, activation_bytes):
    """``dtype: auto`` is bf16 where bf16 matmuls are measured faster than fp32 (AMX, AVX512-BF16, CUDA) and fp32
    where they are emulated: the plan sizes activations and times steps in what the cell will run, not always
    in fp32 (SmolLM2 at 128 tokens: 1.23 GiB of activations in bf16, 1.71 in fp32)."""
    from harness.driver.dryrun import plan_rows
    from harness.driver.suite import parse_suite
    from harness.measure import hardware

    probe = {"bfloat16": {"speedup_vs_float32": speedup}, "float16": {"speedup_vs_float32": speedup}}
    monkeypatch.setattr(hardware, "dtype_speed", lambda device_type="": probe)
    train = {**tiny_suite()["train"], "dtype": "auto"}
    suite = parse_suite(tiny_suite(models=["tiny-llama"], tasks=[{"name": "synthetic"}], train=train), "<test>")
    (row,) = plan_rows(suite, expand(suite))
    assert row["setup"]["activation_bytes"] == activation_bytes


def test_the_plan_gives_long_times_in_hours_or_days_and_warns_when_a_dtype_is_emulated(monkeypatch, capsys):
    """An fp16 plan for an 8B shape on a CPU said `~177517 s` with no word of why: fp16 is emulated there."""
    from harness.driver.dryrun import duration, print_plan
    from harness.driver.suite import check_cheap
    from harness.measure import hardware

    assert [duration(s) for s in (42, 720, 3 * 3600, 177517)] == ["~42 s", "~12 min", "~3.0 h", "~2 days"]
    monkeypatch.setattr(hardware, "slow_note", lambda d, device=None: "fp16 emulated here" if d == "float16" else None)
    for dtype in ("float16", "float32"):
        suite = check_cheap(tiny_suite(train={"steps": 2, "dtype": dtype}, tasks=[{"name": "synthetic"}]), "s.yaml")
        assert print_plan(suite, expand(suite)) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert ("warning: fp16 emulated here: the times above are at that speed" in out) == (dtype == "float16")


def test_the_dry_run_says_which_tasks_inputs_will_be_cut_to_max_seq_len(tmp_path, write_suite):
    """BBC News at 128 tokens: every article cut, said before anything trains; Rotten Tomatoes' snippets fit."""
    tasks = [
        {"name": "bbc_news", "train_examples": 16, "eval_examples": 500},
        {"name": "rotten_tomatoes", "train_examples": 16, "eval_examples": 8},
    ]
    suite = tiny_suite(tasks=tasks, train={"steps": 2, "batch_size": 4, "max_seq_len": 128})
    out = run_cli("run", str(write_suite(suite)), "--dry-run", "--results", str(tmp_path / "res"))
    text = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stderr
    assert (
        "warning: tiny-bert · bbc_news: inputs longer than max_seq_len 128 tokens, cut to it: 184 of 184 test" in text
    )
    assert "16 of 16 train" in text and "rotten_tomatoes: inputs" not in text
    # what the test split lets an accuracy show: Wilson's interval at 0.5 (8 examples: [0.215, 0.785])
    assert "rotten_tomatoes: 8 test examples: a 95% interval of up to ±28.5 points on an accuracy" in text
    assert "bbc_news: 184 test examples (eval_examples 500: the split has 184): a 95% interval of up to ±7.2" in text


def test_the_dry_runs_time_is_of_the_tasks_own_batches_not_rows_at_max_seq_len():
    """The demo's dry run said ~24 s for full fine-tuning that trained in 10 s: it priced every row at max_seq_len
    64 where Rotten Tomatoes' snippets computed 26 tokens a row. The plan draws the cell's own first batches."""
    from harness.cell.models import load_tokenizer
    from harness.driver.dryrun import SAMPLED_BATCHES, data_plan, plan_rows
    from harness.driver.runner import cell_key
    from harness.driver.suite import parse_suite
    from harness.tasks.builtin import load_task
    from harness.tasks.classifier import ClassifierIO

    train = {"steps": 10, "batch_size": 8, "max_seq_len": 64, "group_by_length": True}
    suite = parse_suite(tiny_suite(train=train), "<t>")
    (cell,) = expand(suite)
    _, _, batches = data_plan([cell])
    io = ClassifierIO(load_task(cell.task), load_tokenizer("tiny-bert"), 64)
    drawn = io.batches(8, cell.seed, True)
    ids = [next(drawn)["input_ids"] for _ in range(SAMPLED_BATCHES)]
    tokens = sum(x.numel() for x in ids) / len(ids)
    assert batches[cell_key(cell)] == (tokens, sum(x.shape[0] * x.shape[1] ** 2 for x in ids) / len(ids))
    assert tokens < 0.7 * 8 * 64  # snippets are short: rows at max_seq_len would overprice the step
    (own,), (at_max,) = plan_rows(suite, [cell], batches), plan_rows(suite, [cell])
    assert own["seconds"] < 0.7 * at_max["seconds"]


def test_attention_scores_kept_by_sdpas_math_path_on_a_cpu_with_dropout_are_estimated():
    """MiniLM-L6 (attention dropout 0.1) full fine-tuning at 384 tokens on a CPU held 1.3 GiB of activations where
    the estimate said 0.35: torch's SDPA takes its math path there and keeps every score (softmax's fp32 output,
    the bf16 probabilities, dropout's mask: 6.7 bytes a score measured). On a GPU, or without dropout, it does not."""
    from harness.cell.models import skeleton
    from harness.measure.plan import attention_of, estimate_run

    bert, llama = skeleton("tiny-bert", mode="classifier"), skeleton("tiny-llama", mode="prompt")
    assert attention_of(bert.config, "cpu") == ("math", True) and attention_of(bert.config, "cuda") == ("sdpa", True)
    assert attention_of(llama.config, "cpu") == ("sdpa", False)  # no dropout: SDPA's fused CPU kernel
    train = {"steps": 2, "batch_size": 4, "max_seq_len": 64, "dtype": "bfloat16"}
    (cfg,) = cells(methods=[{"method": "full"}], train=train)
    cpu, gpu = (estimate_run(cfg, bert, decoder=False, device_type=d)["by_category_bytes"] for d in ("cpu", "cuda"))
    c = bert.config
    scores = c.num_hidden_layers * 4 * c.num_attention_heads * 64 * 64  # layers × batch × heads × s²
    upcast = c.num_hidden_layers * 4 * 64 * 3 * c.hidden_size * 4  # the fp32 copies of q, k, v it computes in
    assert cpu["activations"] - gpu["activations"] == scores * 12 + upcast  # fp32 softmax, mask, dropped out


@pytest.mark.parametrize(
    "eager, dtype, dropout",
    [("llama", torch.float32, 0.0), ("llama", torch.bfloat16, 0.0), ("llama", torch.bfloat16, 0.1),
     ("llama", torch.float32, 0.1), ("bert", torch.bfloat16, 0.1), ("bert", torch.float32, 0.1), ("sdpa", None, 0.1)],
)  # fmt: skip
def test_the_bytes_each_attention_score_keeps_are_those_autograd_saves(eager, dtype, dropout):
    """The estimate's bytes per (query, key) score against what autograd really saves (saved-tensor hooks; two
    sequence lengths separate the s² term from the linear one), for Llama's eager code (softmax upcast to fp32,
    then cast), BERT's (softmax in the activations' dtype) and SDPA's math fallback on a CPU."""
    import torch.nn.functional as F

    from harness.contract import MemoryModel
    from harness.measure.estimate import Arch, Setup, estimate

    def saved(t: int) -> int:
        q, k, v = (torch.randn(2, 4, t, 32, requires_grad=True) for _ in range(3))
        kept: dict[int, int] = {}

        def pack(x):
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                if eager == "sdpa":
                    F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(2, 1, 1, t), dropout_p=dropout)
                else:
                    w = torch.matmul(q, k.transpose(2, 3))
                    w = F.softmax(w, dim=-1, dtype=torch.float32).to(w.dtype) if eager == "llama" else F.softmax(w, -1)
                    torch.matmul(F.dropout(w, p=dropout, training=True), v)
        return sum(kept.values())

    measured = (saved(128) - 2 * saved(64)) / (128**2 - 2 * 64**2) / 8  # per score, 2 × 4 (batch × heads)
    arch = Arch(
        layers=1, hidden=128, intermediate=256, heads=4, kv_heads=4, vocab=10, mlp_matrices=3 if eager == "llama" else 2
    )
    act = 2 if dtype == torch.bfloat16 else 4

    def acts(t: int, attention: str) -> float:
        setup = Setup(
            method="full", batch=1, seq_len=t, activation_bytes=act, attention=attention, attention_dropout=dropout > 0
        )
        return estimate(arch, setup, MemoryModel(trains="all"))["activations"]

    kind = "math" if eager == "sdpa" else "eager"
    per_score = (
        (acts(128, kind) - acts(128, "sdpa") - 2 * (acts(64, kind) - acts(64, "sdpa"))) / (128**2 - 2 * 64**2) / 4
    )
    assert per_score == measured
