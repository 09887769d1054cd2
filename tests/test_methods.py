"""Methods through the real cell pipeline: analytic parameter counts, frozen bases, PEFT configs, exports."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.cell.models import load_model
from harness.cell.run import run_cell
from harness.contract import ModelContext
from harness.records import label_ids
from harness.registry import get_method
from harness.tasks.builtin import load_task
from tests.conftest import cells, tiny_suite


def _prepared(method: str, config: dict, model_name: str = "tiny-bert"):
    loaded = load_model(model_name, num_labels=2, seed=0)
    cls = get_method(method)
    m = cls(cls.Config.model_validate(config))
    ctx = ModelContext("seq_cls", 2, loaded.info["model_type"], ["classifier"])
    return m, m.prepare(loaded.model, ctx), loaded


def _lora_analytic(model, targets, r) -> int:
    """r·(d_in + d_out) per targeted Linear, plus the classifier head (weight + bias), which trains in full."""
    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets and "classifier" not in name:
            n += r * (mod.in_features + mod.out_features)
    head = model.classifier
    return n + head.weight.numel() + head.bias.numel()


@pytest.mark.parametrize("targets", [["query", "value"], ["query", "key", "value", "dense"]])
def test_lora_trainable_count_is_analytic_tiny(targets):
    base = load_model("tiny-bert", 2, 0).model
    expected = _lora_analytic(base, targets, r=4)
    m, model, _ = _prepared("lora", {"r": 4, "target_modules": targets})
    got = sum(p.numel() for _, p in m.trainable_parameters(model))
    assert got == expected


@pytest.mark.real_model
def test_lora_trainable_count_is_analytic_minilm():
    base = load_model("minilm-l6", 2, 0).model
    assert sum(p.numel() for p in base.parameters()) == pytest.approx(22.7e6, rel=0.01)
    expected = _lora_analytic(base, ["query", "value"], r=8)
    assert expected == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2
    m, model, _ = _prepared("lora", {"r": 8, "target_modules": ["query", "value"]}, "minilm-l6")
    assert sum(p.numel() for _, p in m.trainable_parameters(model)) == expected


def test_lora_passthrough_fields_reach_peft():
    m, model, _ = _prepared("lora", {"r": 4, "use_rslora": True, "use_dora": True})
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora
    assert any("lora_magnitude_vector" in n for n, _ in m.trainable_parameters(model))


def _train(tmp_path, method, config, steps=4, export=True):
    cfg = cells(
        methods=[{"method": method, "config": config}],
        train={"steps": steps, "batch_size": 8, "lr": 5e-3, "max_seq_len": 32, "timing_warmup_steps": 1},
    )[0]
    rec = run_cell(cfg.model_copy(update={"export": export}), tmp_path)
    assert rec.status == "ok", rec.error
    return rec


@pytest.mark.parametrize(
    "config",
    [
        {
            "peft_type": "IA3",
            "target_modules": ["key", "value", "output.dense"],
            "feedforward_modules": ["output.dense"],
        },
        {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
        {"peft_type": "LOHA", "r": 2, "target_modules": ["query", "value"]},
    ],
    ids=["ia3", "prompt_tuning", "loha"],
)
def test_peft_generic_trains_only_its_parameters(tmp_path, config):
    m, model, loaded = _prepared("peft", config)
    trainable = dict(m.trainable_parameters(model))
    assert trainable and all(p.requires_grad for p in trainable.values())
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    rec = _train(tmp_path, "peft", config)
    assert rec.trainable_params == sum(p.numel() for p in trainable.values())
    assert rec.trainable_pct < 10
    assert len(rec.training.losses) == 4 and rec.eval_after is not None
    kinds = {e.kind for e in rec.exports}
    assert "adapter" in kinds
    assert ("merged" in kinds) == (config["peft_type"] != "PROMPT_TUNING")
    assert frozen_before  # a PEFT method leaves most of the model frozen


def test_frozen_base_unchanged_and_adapter_changed_by_training(tmp_path):
    """Train through the real loop and compare weights: LoRA may only move adapters and the head."""
    from harness.cell.loop import train
    from harness.tasks.builtin import load_task
    from harness.tasks.classifier import encode, train_batches
    from tests.conftest import cells as mk

    cfg = mk()[0]
    m, model, loaded = _prepared("lora", {"r": 4})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = load_task(cfg.task)
    enc = encode(task.train, loaded.tokenizer, 32)
    train(model, m, train_batches(enc, 8, 0, 0), cfg.train, 0, torch.device("cpu"))
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        if p.requires_grad and "lora_B" in n:
            assert moved, n
        if not p.requires_grad:
            assert not moved, n


def test_lora_export_adapter_and_merged_match(tmp_path):
    rec = _train(tmp_path, "lora", {"r": 4}, steps=6)
    adapter = next(e for e in rec.exports if e.kind == "adapter")
    merged = next(e for e in rec.exports if e.kind == "merged")
    weights = load_file(f"{adapter.path}/adapter_model.safetensors")
    assert any("lora_A" in k for k in weights) and adapter.bytes_on_disk < merged.bytes_on_disk
    assert json.loads(open(f"{adapter.path}/adapter_config.json").read())["r"] == 4
    assert merged.max_abs_logit_diff < 1e-4
    assert merged.eval.accuracy == rec.eval_after.accuracy


def test_full_export_is_safetensors(tmp_path):
    rec = _train(tmp_path, "full", {}, steps=2)
    (exp,) = rec.exports
    assert exp.kind == "full" and exp.bytes_on_disk > 4 * rec.total_params
    assert load_file(f"{exp.path}/model.safetensors")


def test_tiny_llama_lora(tmp_path):
    cfg = cells(models=["tiny-llama"], methods=[{"method": "lora", "config": {"r": 4}}])[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.model_info["model_type"] == "llama"


def test_methods_that_start_as_the_base_model_share_one_untrained_score(tmp_path):
    """Full fine-tuning and LoRA (B = 0) start as the base model computes (Method.starts_as_base): in one suite
    the untrained model is evaluated once, and the second record says whose score it shares. That score is the
    one LoRA measures alone, example by example and to the last bit of the loss; QLoRA (quantized from the
    start) measures its own."""
    full_cfg, lora_cfg, qlora_cfg = cells(
        methods=[{"method": "full"}, {"method": "lora", "config": {"r": 4}}, {"method": "qlora", "config": {"r": 4}}],
        train={**tiny_suite()["train"], "dtype": "auto"},  # resolved in the cell; a record's id is the suite's
    )
    full, lora, qlora = (run_cell(c, tmp_path / "suite") for c in (full_cfg, lora_cfg, qlora_cfg))
    assert [r.status for r in (full, lora, qlora)] == ["ok"] * 3, (full.error, lora.error, qlora.error)
    assert full.eval_before_from is None and lora.eval_before_from == full.cell_id
    assert qlora.eval_before_from is None and qlora.eval_before.correct
    assert (full.starts_as_base, lora.starts_as_base, qlora.starts_as_base) == (True, True, False)  # for the reports
    alone = run_cell(lora_cfg, tmp_path / "alone")
    assert alone.eval_before_from is None and alone.eval_before == lora.eval_before
    assert alone.eval_before.correct and lora.eval_after != lora.eval_before  # a real score, and training moved it


@pytest.mark.parametrize(
    "method,config,same",
    [
        ("lora", {"use_rslora": True, "init_lora_weights": "gaussian"}, True),
        ("lora", {"use_dora": True}, False),  # magnitudes: ‖W‖ recomputed, equal only up to rounding
        ("lora", {"init_lora_weights": "pissa"}, False),  # rewrites the base weights
        ("full", {"freeze_embeddings": True}, True),
        ("qlora", {}, False),
        ("qalora", {}, False),
    ],
)
def test_which_configurations_start_as_the_base_model(method, config, same):
    cls = get_method(method)
    assert cls(cls.Config.model_validate(config)).starts_as_base() is same


@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_every_method_trains_the_whole_head_of_an_encoder_whose_head_is_not_one_linear(arch):
    """DistilBERT's head is a new `pre_classifier` and `classifier`; RoBERTa's `classifier` holds two Linears of
    its own. QLoRA quantized them and PEFT then failed to train them ("only Tensors of floating point dtype can
    require gradients"); QA-LoRA and QAT-LoRA quantized DistilBERT's new `pre_classifier` and left it random.
    Each method now trains every head parameter in full, as PEFT does for LoRA."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from harness.cell.models import head_module_names

    sizes = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}
    if arch == "distilbert":
        sizes = {"dim": 64, "n_layers": 1, "n_heads": 2, "hidden_dim": 128}
    config = AutoConfig.for_model(arch, vocab_size=100, num_labels=2, **sizes)
    heads = head_module_names(AutoModelForSequenceClassification.from_config(config))
    assert heads == (["classifier", "pre_classifier"] if arch == "distilbert" else ["classifier"])
    targets = ["q_lin", "v_lin"] if arch == "distilbert" else ["query", "value"]
    for name, extra in (("lora", {}), ("qlora", {}), ("qalora", {"group_size": 32}), ("qat_lora", {"group_size": 32})):
        cls = get_method(name)
        method = cls(cls.Config(r=4, target_modules=targets, **extra))
        model = AutoModelForSequenceClassification.from_config(config)
        model = method.prepare(model, ModelContext("seq_cls", 2, arch, heads))
        model(input_ids=torch.randint(0, 100, (2, 8)), labels=torch.tensor([0, 1])).loss.backward()
        head = {  # PEFT keeps a frozen copy of a trained head beside it (original_module)
            n: p for n, p in model.named_parameters() if set(n.split(".")) & set(heads) and "original_module" not in n
        }
        assert len(head) >= 4 and all(p.requires_grad and p.is_floating_point() for p in head.values()), name
        assert all(p.grad is not None for p in head.values()), name


def test_a_model_of_conv1d_layers_is_refused_by_the_quantizing_methods_at_validation_saying_why():
    """GPT-2's layers are transformers' Conv1D, not nn.Linear. QLoRA failed after loading the weights ("no Linear
    layer left to quantize (check skip_modules)": there was nothing to skip); now every quantizing method refuses
    it at validation and names Conv1D. LoRA fits it, without PEFT's fan_in_fan_out warning among ftbench's lines."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # as validation sees it: the skeleton
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=2))
    ctx = ModelContext("causal_lm", 0, "gpt2", output_names=["lm_head"])
    for name, extra in (("qlora", {}), ("qalora", {"group_size": 32}), ("qat_lora", {"group_size": 32})):
        cls = get_method(name)
        with pytest.raises(ValueError, match=f"^{name}: no Linear .*; this model's 4 layers are transformers' Conv1D"):
            cls(cls.Config(r=4, **extra)).check_model(model, ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_method("lora")(get_method("lora").Config(r=4)).check_model(model, ctx)


def test_a_head_the_checkpoint_lacks_trains_in_full_in_every_method(tmp_path):
    """DeBERTa-v3's checkpoint has no pooler: loading a classifier initializes `pooler.dense` at random beside the
    classifier. PEFT trains only `classifier` (peft#2171), and QLoRA, QA-LoRA and QAT-LoRA quantized the random
    pooler and froze it, so every adapter method read its inputs through random weights while full fine-tuning
    trained them. The modules the checkpoint lacked now train in full in every method, and the adapter's export
    carries them: its card's code gives back the run's predictions."""
    from transformers import AutoConfig, AutoModel

    from harness.cell.models import load_tokenizer
    from reports.caveats import training_warnings
    from tests.test_card import served_predictions

    tok, folder = load_tokenizer("tiny-bert"), tmp_path / "deberta"
    torch.manual_seed(0)
    sizes = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}
    config = AutoConfig.for_model("deberta-v2", vocab_size=len(tok), pad_token_id=tok.pad_token_id, **sizes)
    AutoModel.from_config(config).save_pretrained(folder)  # the encoder alone, as a pretrained checkpoint is
    tok.save_pretrained(folder)
    assert load_model(str(folder), 2, 0).info["new_modules"] == ["classifier", "pooler.dense"]
    methods = [{"method": "lora", "config": {"r": 4}}, {"method": "qlora", "config": {"r": 4}}]
    methods += [{"method": m, "config": {"r": 4, "group_size": 32}} for m in ("qalora", "qat_lora")]
    pooler, records = 64 * 64 + 64, []
    for cfg in cells(models=[str(folder)], methods=methods):
        records.append(rec := run_cell(cfg, tmp_path / "r"))
        assert rec.status == "ok", rec.error
        assert rec.trainable_params > pooler + 130, (cfg.method, rec.trainable_params)  # the pooler and classifier
        if cfg.method == "lora":
            texts = [x.text for x in load_task(cfg.task).test]
            predicted, _ = served_predictions(Path(rec.exports[0].path) / "README.md", texts)
            assert predicted == label_ids(rec.eval_after.predicted)
    said = f"{folder}: the checkpoint has no weights for pooler.dense: initialized at random and trained in full"
    assert [w for w in training_warnings(records) if "no weights" in w] == [said + " by every method"]


def test_a_checkpoints_head_of_another_size_is_replaced_by_a_new_one_that_trains(tmp_path):
    """A fine-tuned 2-label classifier on a 5-label task failed its run ("You set `ignore_mismatched_sizes` to
    `False` ... look at the above report", a report only the cell's log had): its head is now a new one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from harness.cell.models import load_tokenizer

    tok = load_tokenizer("tiny-bert")
    sizes = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}
    config = AutoConfig.for_model("bert", vocab_size=len(tok), num_labels=2, **sizes)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "sst2")
    tok.save_pretrained(tmp_path / "sst2")
    loaded = load_model(str(tmp_path / "sst2"), 5, 0)
    assert loaded.info["new_modules"] == ["classifier"] and loaded.model.classifier.out_features == 5
    assert load_model(str(tmp_path / "sst2"), 2, 0).info["new_modules"] == []  # the same size: kept as trained


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_classifiers_quantize_and_export(tmp_path, arch):
    """T5's feed-forward casts its input to `wo`'s weight dtype: quantized to 4 bits, uint8 ("result type Float
    can't be cast to ... Byte"), or gone in QA-LoRA's layer. `wo` now stays float, as transformers keeps it
    (`_keep_in_fp32_modules`). BART's and T5's heads read the last <eos> token: QA-LoRA's check of its merged
    export and the deployment timer fed random ids without one ("Each example must contain at least one <eos>
    token")."""
    from transformers import AutoConfig, AutoModel

    from harness.cell.models import load_tokenizer

    tok, folder = load_tokenizer("tiny-bert"), tmp_path / arch
    sizes = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_layers": 1, "num_heads": 2}
    if arch == "bart":
        sizes = {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 128}
        sizes |= {"decoder_ffn_dim": 128, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.sep_token_id, "bos_token_id": tok.cls_token_id}
    config = AutoConfig.for_model(arch, vocab_size=len(tok), decoder_start_token_id=tok.pad_token_id, **ids, **sizes)
    AutoModel.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    methods = [{"method": "qlora", "config": {"r": 4}}, {"method": "qalora", "config": {"r": 4, "group_size": 32}}]
    for cfg in cells(models=[str(folder)], methods=methods, deploy={"repeats": 1}):  # timed as deployed too
        rec = run_cell(cfg, tmp_path / "r")
        assert rec.status == "ok", rec.error
        forms = [d for e in rec.exports for d in e.deployments]
        assert forms and [e.error for e in rec.exports if e.error] + [d.error for d in forms if d.error] == []
