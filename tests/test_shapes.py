"""Real architectures with random weights (harness/cell/shapes.py) and the synthetic task: sizes as published,
a random-weights run measured and never scored."""

from __future__ import annotations

import json

import pytest

from harness.cell.modelnames import ALIASES
from harness.cell.shapes import SHAPES
from harness.records import read_current
from harness.schema import ConfigError
from tests.conftest import run_cli, tiny_suite

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 30522,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def test_the_shapes_run_from_half_a_billion_to_eight_billion_parameters():
    sizes = sorted(s.params for name, s in SHAPES.items() if name in ALIASES)
    ladder = [n for n in sizes if 0.49e9 <= n <= 8.1e9]  # the 0.5B to 8B; 135M and 70B besides
    assert len(ladder) >= 5 and ladder[0] < 0.6e9 and ladder[-1] > 7.9e9
    out = run_cli("models")
    assert out.returncode == 0
    for name in SHAPES:
        assert name in out.stdout


@pytest.mark.parametrize("name", ["llama-3.2-1b-shape", "qwen2.5-0.5b-shape", "smollm2-135m-shape"])
def test_a_shape_built_on_the_meta_device_has_the_published_parameter_count(name):
    from harness.cell.models import skeleton

    model = skeleton(name, mode="prompt")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - SHAPES[name].params) / SHAPES[name].params < 0.01
    assert next(model.parameters()).device.type == "meta"


def test_random_weights_are_built_seeded_on_the_target_device_in_float32(tmp_path):
    import torch

    from harness.cell.models import load_model

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    a = load_model(str(tmp_path), 2, 3, mode="prompt", init="random", device=torch.device("cpu"))
    b = load_model(str(tmp_path), 2, 3, mode="prompt", init="random", device=torch.device("cpu"))
    c = load_model(str(tmp_path), 2, 4, mode="prompt", init="random", device=torch.device("cpu"))
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert wa.dtype == torch.float32 and float(wa.std()) > 0
    assert a.info["weights"] == "random" and a.info["pretrained"] is False


def test_a_folder_with_only_a_config_needs_init_random(tmp_path):
    from harness.cell.modelnames import check_model_name

    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    with pytest.raises(ConfigError, match="init: random"):
        check_model_name(str(tmp_path), "models[0].name")
    check_model_name(str(tmp_path), "models[0].name", init="random")


def test_a_tiny_shape_on_the_synthetic_task_records_random_weights_and_no_accuracy(tmp_path, write_suite):
    folder = tmp_path / "tiny-shape"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    suite = tiny_suite(
        models=[{"name": str(folder), "init": "random"}],
        tasks=[{"name": "synthetic"}, {"name": "rotten_tomatoes", "train_examples": 64, "eval_examples": 32}],
        methods=[{"method": "lora", "config": {"r": 4}}],
    )
    out = run_cli("run", str(write_suite(suite)), "--results", str(tmp_path / "res"))
    assert out.returncode == 0, out.stdout + out.stderr
    records = read_current(tmp_path / "res")[0]
    assert [r.status for r in records] == ["ok", "ok"]
    for r in records:
        assert r.model_info["weights"] == "random"
        assert r.measured_only == "random weights: memory and speed only"
        assert r.eval_after is None and r.eval_before is None and not r.exports
        assert r.training.peak_live_tensor_bytes and r.training.step_time_stats and len(r.training.losses) == 4
    synthetic = next(r for r in records if r.config["task"]["name"] == "synthetic")
    assert synthetic.training.tokens_per_s and synthetic.task_info["kind"] == "language_modeling"
    summary = run_cli("summary", str(tmp_path / "res"))
    assert "memory and speed only" in summary.stdout


def test_the_synthetic_task_on_real_weights_is_not_scored_either(tmp_path, write_suite):
    suite = tiny_suite(models=["tiny-llama"], tasks=[{"name": "synthetic"}], methods=[{"method": "full"}])
    out = run_cli("run", str(write_suite(suite)), "--results", str(tmp_path / "res"))
    assert out.returncode == 0, out.stdout + out.stderr
    (r,) = read_current(tmp_path / "res")[0]
    assert r.status == "ok" and r.eval_after is None
    assert r.measured_only == "task synthetic: nothing to score: memory and speed only"
    # every row is max_seq_len real tokens: 4 steps × 8 rows × 32 tokens, none of it padding
    assert r.training.losses[0] > 9.0  # ln(30522) ≈ 10.3: random ids are unpredictable


def test_the_synthetic_task_needs_a_decoder(write_suite):
    from harness.driver.suite import load_suite

    with pytest.raises(ConfigError, match="synthetic"):
        load_suite(write_suite(tiny_suite(tasks=[{"name": "synthetic"}])))
