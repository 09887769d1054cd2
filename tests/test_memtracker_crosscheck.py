"""Our live-tensor tracker against torch's MemTracker on the same step: the peaks agree."""

import pytest
import torch

from harness.cell.models import load_model
from harness.contract import ModelContext
from harness.measure.memory import MemoryTracker, memtracker_peak_bytes, step_roots
from harness.registry import get_method
from harness.tasks.builtin import TaskSpec, load_task
from harness.tasks.classifier import encode, train_batches


@pytest.mark.parametrize("method,config", [("full", {}), ("lora", {"r": 4})])
def test_peaks_agree_with_torch_memtracker(method, config):
    lm = load_model("tiny-bert", 2, 0)
    cls = get_method(method)
    m = cls(cls.Config.model_validate(config))
    model = m.prepare(lm.model, ModelContext("seq_cls", 2, "bert", ["classifier"]))
    model.eval()  # no dropout: both trackers see the very same tensors
    task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=16))
    batch = next(train_batches(encode(task.train, lm.tokenizer, 32), 8, 0, 0))
    params = [p for _, p in m.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state exists, as in every measured step
    theirs = memtracker_peak_bytes(model, opt, step)["Total"]
    ours = MemoryTracker(step_roots(model, opt, [batch]))
    with ours:
        with ours.forward():
            loss = model(**batch).loss
        loss.backward()
        ours.gradients_ready(params)
        opt.step()
        ours.optimizer_done(opt)
        opt.zero_grad(set_to_none=True)
    print(method, ours.result()["peak_bytes"], theirs)
    assert ours.result()["peak_bytes"] == pytest.approx(theirs, rel=0.05)
