"""The shared training loop: determinism, schedule, accumulation, checkpointing, dtype, optimizers by name."""

import math

import pytest
import torch

from harness.cell.optim import lr_lambda, runs_fused
from harness.cell.run import run_cell
from harness.schema import TrainConfig
from tests.conftest import cells


def _run(tmp_path, **train):
    base = {"steps": 5, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32, "timing_warmup_steps": 1}
    cfg = cells(train={**base, **train}, methods=[{"method": "full"}])[0].model_copy(update={"export": False})
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    return rec


def test_same_seed_same_losses_bitwise(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    assert a.training.losses == b.training.losses and a.eval_after == b.eval_after
    assert len(a.training.losses) == 5 and all(math.isfinite(x) for x in a.training.losses)


def test_different_seed_different_losses(tmp_path):
    a = cells(seeds=[0, 1], methods=[{"method": "full"}])
    ra, rb = (run_cell(c.model_copy(update={"export": False}), tmp_path) for c in a)
    assert ra.training.losses != rb.training.losses


def test_lr_schedule_warmup_then_linear_decay(tmp_path):
    rec = _run(tmp_path, steps=6, warmup_steps=2, schedule="linear")
    assert rec.training.lrs[:2] == pytest.approx([0.5e-3, 1e-3])
    assert rec.training.lrs[2:] == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    f = lr_lambda("cosine", 0, 10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


def test_grad_accum_doubles_samples_per_step(tmp_path):
    from harness.records import measured_step_times_s

    rec = _run(tmp_path, grad_accum=2)
    measured = measured_step_times_s(rec)
    # same micro-batch size, twice the micro-batches: each optimizer step sees 16 examples
    assert rec.training.samples_per_s * sum(measured) == pytest.approx(16 * len(measured))
    assert rec.training.losses != _run(tmp_path / "one").training.losses


def test_gradient_checkpointing_same_losses(tmp_path):
    plain = _run(tmp_path / "p")
    ckpt = _run(tmp_path / "c", grad_checkpointing=True)
    assert ckpt.training.losses == pytest.approx(plain.training.losses, rel=1e-5, abs=1e-6)
    # MFU leaves the recomputed forward out (model FLOPs); HFU counts it: one more forward of the body per token
    f = ckpt.flops_per_token
    assert plain.hfu == plain.mfu and f["output_per_position"] == 0
    assert ckpt.hfu / ckpt.mfu == pytest.approx((f["total"] + f["forward"]) / f["total"])
    from reports.summary import mfu_label

    assert f"(HFU {ckpt.hfu * 100:.1f}%)" in mfu_label(ckpt) and "HFU" not in mfu_label(plain)


def test_bfloat16_autocast_trains(tmp_path):
    rec = _run(tmp_path, dtype="bfloat16", steps=8)
    assert all(math.isfinite(x) for x in rec.training.losses)
    assert rec.training.loss_scales == [] and rec.training.skipped_steps == []  # bf16 needs no loss scaling
    assert rec.training.losses != _run(tmp_path / "f32", steps=8).training.losses


def test_float16_run_records_the_loss_scale_of_every_step(tmp_path):
    rec = _run(tmp_path, dtype="float16", steps=4)
    assert rec.config["train"]["dtype"] == "float16"
    assert all(math.isfinite(x) for x in rec.training.losses)
    assert rec.training.loss_scales == [2.0**16] * 4 and rec.training.skipped_steps == []


def test_a_non_finite_loss_under_fp16_stops_the_run_and_names_fp16s_range(tmp_path):
    train = {"steps": 30, "batch_size": 8, "lr": 1e30, "optimizer": "sgd", "max_grad_norm": None, "dtype": "float16"}
    cfg = cells(train={**train, "max_seq_len": 32}, methods=[{"method": "full"}])[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "failed" and "(fp16 ends at ±65504: bfloat16 or float32 would tell" in rec.error, rec.error


def test_float16_skips_the_step_whose_gradients_overflowed_and_halves_the_scale():
    from harness.cell.loop import train
    from harness.cell.models import load_model
    from harness.contract import ModelContext
    from harness.registry import build_method
    from harness.tasks.builtin import load_task
    from harness.tasks.classifier import ClassifierIO

    loaded = load_model("tiny-bert", num_labels=2, seed=0)
    io = ClassifierIO(load_task(cells()[0].task), loaded.tokenizer, 32)
    method = build_method("full", {})
    model = method.prepare(loaded.model, ModelContext("seq_cls", 2, "bert", ["classifier"], train_steps=4))
    weight, backwards, after = model.classifier.weight, [], []
    # one micro-batch per step, so the second backward is step 1's: its gradient overflows
    weight.register_hook(lambda g: (backwards.append(1), g * math.inf if len(backwards) == 2 else g)[1])
    tc = TrainConfig(steps=4, batch_size=8, lr=1e-3, dtype="float16", timing_warmup_steps=1)
    res = train(
        model,
        method,
        io.batches(8, 0),
        tc,
        0,
        torch.device("cpu"),
        io.objective,
        on_step=lambda *_: after.append(weight.detach().clone()),
    )
    assert res.skipped_steps == [1] and res.loss_scales == [2.0**16, 2.0**16, 2.0**15, 2.0**15]
    assert torch.equal(after[1], after[0]) and not torch.equal(after[2], after[1])  # no update at step 1 only
    assert res.lrs == pytest.approx([1e-3, 0.75e-3, 0.75e-3, 0.5e-3])  # the linear schedule waited a step
    assert all(math.isfinite(x) for x in res.losses)


@pytest.mark.parametrize("opt", ["adamw", "sgd", "adamw_8bit"])
def test_optimizer_by_name(tmp_path, opt):
    rec = _run(tmp_path, optimizer=opt, lr=1e-2)
    assert rec.training.optimizer == opt
    if opt == "adamw":  # two fp32 moments per trainable parameter (+ a step count per tensor)
        assert 8 * rec.trainable_params <= rec.training.optimizer_state_bytes < 8 * rec.trainable_params * 1.01
    elif opt == "sgd":  # plain SGD keeps no state
        assert rec.training.optimizer_state_bytes == 0
    else:  # 8-bit state: well under 2 × 4 bytes per trainable parameter
        assert 0 < rec.training.optimizer_state_bytes < 8 * rec.trainable_params / 2


def test_timing_warmup_and_memory_tracked_steps_excluded(tmp_path):
    from harness.records import measured_step_times_s

    rec = _run(tmp_path, steps=5, timing_warmup_steps=2)
    tracked = rec.training.memory_tracked_steps
    assert tracked[:2] == [0, 1] and len(rec.training.step_times_s) == 5
    timed = measured_step_times_s(rec)
    assert rec.training.step_time_stats["count"] == len(timed) == 5 - len(tracked)
    assert rec.training.step_time_stats["median_s"] == pytest.approx(__import__("statistics").median(timed))
    assert rec.training.peak_live_tensor_bytes > 0


def test_memory_is_tracked_on_the_largest_batches_even_without_warmup():
    """Batches of 8, 32, 16, 64 and 8 tokens with no warm-up: the steps tracked are the first and each new
    largest (0, 1, 3); the peak is the 64-token step's, not the first's; tracked steps are not timed."""
    from harness.cell.loop import train
    from harness.cell.models import load_model
    from harness.registry import build_method

    loaded = load_model("tiny-bert", 2, 0)
    method = build_method("full", {})
    model = method.prepare(loaded.model, None)

    def batch(n: int) -> dict:
        ids = torch.randint(5, 100, (4, n))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}

    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-3, max_seq_len=64, timing_warmup_steps=0)
    res = train(model, method, iter([batch(n) for n in (8, 32, 16, 64, 8)]), cfg, 0, torch.device("cpu"))
    assert res.memory_tracked_steps == [0, 1, 3] and res.timed_steps == [2, 4]
    first = train(model, method, iter([batch(8)] * 5), cfg, 0, torch.device("cpu"))
    assert res.peak_live_tensor_bytes > first.peak_live_tensor_bytes > 0


def test_train_config_defaults_are_valid():
    TrainConfig()
    assert torch.get_num_threads() >= 1


def test_batches_grouped_by_length_pad_less_and_cover_the_same_examples():
    """train.group_by_length: every epoch still trains on the same examples (the ragged tail dropped), batches
    of similar length pad far less, the order is seeded, and without it the stream is the one it always was."""
    import random

    from harness.tasks.classifier import train_batches

    rng = random.Random(0)
    encoded = [{"input_ids": [7] * rng.randint(3, 60), "label": i % 2, "id": i} for i in range(1000)]

    def collate(items, pad):
        return {"ids": [it["id"] for it in items], "width": max(len(it["input_ids"]) for it in items)}

    def epoch(length, seed=0):
        stream = train_batches(encoded, 16, seed, 0, collate, length)
        return [next(stream) for _ in range(len(encoded) // 16)]

    plain, grouped = epoch(None), epoch(lambda it: len(it["input_ids"]))
    assert sorted(i for b in grouped for i in b["ids"]) == sorted(i for b in plain for i in b["ids"])
    real = sum(len(encoded[i]["input_ids"]) for b in plain for i in b["ids"])
    padded = {name: sum(b["width"] * 16 for b in batches) for name, batches in (("plain", plain), ("grouped", grouped))}
    assert padded["grouped"] < 1.1 * real < padded["plain"]
    assert epoch(lambda it: len(it["input_ids"])) == grouped != epoch(lambda it: len(it["input_ids"]), seed=1)
    order = list(range(1000))
    random.Random(0).shuffle(order)
    assert [b["ids"] for b in plain] == [order[i : i + 16] for i in range(0, 992, 16)]  # unchanged without it


def test_adamw_runs_fused_unless_the_suite_says_otherwise_and_the_record_names_it(tmp_path):
    """torch's fused AdamW is the default (harness/cell/optim.py): the same update as torch's loop over tensors,
    to float rounding; `fused: false` in optimizer_args gives the loop back, and each record says which ran."""
    fused = _run(tmp_path / "a", steps=4, lr=1e-2)
    looped = _run(tmp_path / "b", steps=4, lr=1e-2, optimizer_args={"fused": False})
    assert fused.training.optimizer_implementation == "fused"
    assert looped.training.optimizer_implementation == "for-loop"
    assert fused.training.losses == pytest.approx(looped.training.losses, rel=1e-4)
    assert _run(tmp_path / "c", steps=1, optimizer="sgd").training.optimizer_implementation == "for-loop"
    # the rule the memory estimate reads (harness/measure/plan.py) agrees with what ran
    loop = _run(tmp_path / "e", steps=1, optimizer_args={"foreach": False}).training.optimizer_implementation
    assert loop == "for-loop" and not runs_fused("adamw", {"foreach": False}) and runs_fused("adamw", {})


def test_the_estimate_counts_adamw_scratch_only_where_the_update_loops_over_tensors():
    from harness.measure.estimate import ARCHS, Setup, estimate

    llama = ARCHS["llama-7b"]  # batch 1 × 512 tokens: the optimizer step, not backward, sets the peak
    fused, looped = (estimate(llama, Setup(method="full", optimizer_fused=f)) for f in (True, False))
    assert looped["peak"] - fused["peak"] == 2 * (32000 * 4096) * 2  # two scratch embeddings, bf16
    lora = Setup(method="lora", optimizer="adamw_8bit", optimizer_fused=True)  # bitsandbytes: not torch's fused
    assert estimate(llama, lora) == estimate(llama, Setup(**{**lora.__dict__, "optimizer_fused": False}))
