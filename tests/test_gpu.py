"""CUDA paths, checked on a real GPU (issue 16). Every test here is marked `gpu` and skipped without CUDA: none
of them has run yet (no GPU was lent to the sessions that wrote them). `gpu/check.sh` runs them on an offline
GPU machine from the bundle (stage 2), `make gpu-check` on one with a network. What each one asserts is what
the design promises on CUDA."""

import pytest
import torch

from harness.cell.run import run_cell
from tests.conftest import cells

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make gpu-check on a GPU machine)"),
]


def _run(tmp_path, method: str, config: dict, memory: bool = False, **train):
    """A cell on CUDA from what the offline GPU bundle carries (gpu/bundle.py): tiny-llama on Rotten Tomatoes to
    exercise training, evaluation and export; SmolLM2-135M's architecture with random weights on the synthetic
    task (256 tokens a row, no padding) where the figures are memory, large enough to dwarf allocator rounding."""
    base = {"steps": 6, "batch_size": 8, "lr": 1e-3, "max_seq_len": 64, "timing_warmup_steps": 2}
    if memory:
        model, task, base = "smollm2-135m-shape", {"name": "synthetic"}, {**base, "max_seq_len": 256}
    else:
        model, task = "tiny-llama", {"name": "rotten_tomatoes", "train_examples": 128, "eval_examples": 32}
    cfg = cells(models=[model], tasks=[task], train={**base, **train}, methods=[{"method": method, "config": config}])[
        0
    ]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    return rec


@pytest.mark.parametrize(
    "method,config",
    [
        ("full", {}),
        ("lora", {"r": 8}),
        ("qlora", {"r": 8, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}),
        ("qalora", {"r": 8, "group_size": 32, "compute_dtype": "bfloat16"}),
    ],
)
def test_every_method_trains_evaluates_and_exports_on_cuda(tmp_path, method, config):
    rec = _run(tmp_path, method, config, dtype="bfloat16")
    assert (
        rec.environment["gpu"]
        and rec.training.cuda_max_allocated_bytes > 0
        and rec.training.cuda_max_reserved_bytes > 0
    )
    assert rec.training.cuda_max_reserved_bytes >= rec.training.cuda_max_allocated_bytes
    for e in rec.exports:  # merged models reload and score on CUDA (the qalora export included)
        if e.eval is not None:
            assert e.eval.examples == rec.eval_after.examples


def test_live_tensor_peak_agrees_with_the_allocator(tmp_path):
    """The tracker counts tensor storages; the allocator's max_memory_allocated counts blocks (rounded up to
    512 B): within 5% of each other on a training step."""
    rec = _run(tmp_path, "lora", {"r": 8}, memory=True)
    live, alloc = rec.training.peak_live_tensor_bytes, rec.training.cuda_max_allocated_bytes
    assert abs(live - alloc) <= 0.05 * alloc, (live, alloc)


def test_nvml_sees_the_allocator_plus_the_cuda_context(tmp_path):
    """NVML's per-process figure = reserved memory + the CUDA context (a few hundred MiB), never less."""
    pytest.importorskip("pynvml", reason="NVML needs nvidia-ml-py")
    rec = _run(tmp_path, "lora", {"r": 8}, memory=True)
    assert rec.training.nvml_process_bytes is not None
    context = rec.training.nvml_process_bytes - rec.training.cuda_max_reserved_bytes
    assert 0 <= context <= 1.5 * 2**30, context


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit"])
def test_paged_optimizers_really_page_on_cuda(tmp_path, optimizer):
    rec = _run(tmp_path, "qlora", {"r": 8}, memory=True, optimizer=optimizer)
    assert rec.training.paging_effective is True and "not paged" not in (rec.training.optimizer or "")
