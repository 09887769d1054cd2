"""The ``synthetic`` task: random token ids at a fixed length and a next-token loss, for memory and speed.

It needs no data and no real tokenizer, so it runs on any decoder, the ``*-shape`` aliases included. Every
batch is exactly ``batch_size × max_seq_len`` real tokens (no padding), the worst case a real task of that
length reaches, so a measured peak is the peak at that shape. There is nothing to score: the cell records
memory and speed, and no accuracy (``SyntheticIO.scored`` is false).
"""

from __future__ import annotations

from collections.abc import Iterator

from harness.contract import Batch
from harness.lazy import lazy_module
from harness.tasks.data import Example, TaskData

torch = lazy_module("torch")  # the suite's cheap checks list this task without importing torch

# Placeholder examples: the split sizes a suite's checks read (batch ≤ train). The token ids themselves are
# drawn per batch from the seed, so any batch size up to this many rows is a valid suite.
TRAIN_ROWS, EVAL_ROWS = 4096, 64


def synthetic(seed: int) -> TaskData:
    """Random token ids at train.max_seq_len, a next-token loss: memory and speed only, no accuracy (any
    decoder, no data, no tokenizer needed)."""
    rows = lambda n, split: [Example(f"{split} {i}", 0) for i in range(n)]  # noqa: E731
    return TaskData(
        "synthetic",
        ["token"],
        rows(TRAIN_ROWS, "train"),
        rows(EVAL_ROWS, "validation"),
        rows(EVAL_ROWS, "test"),
        source="random token ids (harness/tasks/synthetic.py)",
        kind="language_modeling",
        io="harness.tasks.synthetic:SyntheticIO",
    )


class SyntheticIO:
    """A :class:`harness.contract.TaskIO` over random ids: uniform over the tokenizer's vocabulary, every
    position a target, the LM head run on every position (FLOPs count it there)."""

    task_type = "causal_lm"
    scored = False  # random tokens have no right answer: memory and speed only

    def __init__(self, task: TaskData, tokenizer, max_seq_len: int, max_new_tokens: int = 16) -> None:
        self.task, self.seq_len, self.vocab = task, max_seq_len, len(tokenizer)

    def output_names(self, model) -> list[str]:
        from harness.cell.models import output_module_names

        return output_module_names(model)

    def _batch(self, ids) -> Batch:
        batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        batch.head_positions = ids.numel()
        return batch

    def batches(self, batch_size: int, seed: int, group_by_length: bool = False) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed % 2**63)
        while True:  # all rows are the same length: grouping by length changes nothing
            yield self._batch(torch.randint(0, self.vocab, (batch_size, self.seq_len), generator=g))

    def objective(self, model, batch: dict) -> torch.Tensor:
        # transformers' causal-LM loss: logits upcast to fp32, targets shifted by one inside the model
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def evaluate(self, model, batch_size: int, dtype, device, split: str = "test") -> tuple[dict, torch.Tensor]:
        """The mean next-token loss on ``EVAL_ROWS`` rows of fixed ids (a validation curve shows the loss
        only); per-row losses as the scores."""
        g = torch.Generator().manual_seed({"test": 1, "validation": 2}[split])
        ids = torch.randint(0, self.vocab, (EVAL_ROWS, self.seq_len), generator=g)
        was_training, losses = model.training, []
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for i in range(0, len(ids), batch_size):
                chunk = ids[i : i + batch_size].to(device)
                logits = model(input_ids=chunk).logits.float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="none"
                )
                losses.append(nll.view(len(chunk), -1).mean(1).cpu())
        model.train(was_training)
        scores = torch.cat(losses)
        return {"loss": float(scores.mean()), "examples": len(scores)}, scores

    def calibration(self, n: int) -> list[dict]:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, self.vocab, (min(n, EVAL_ROWS), self.seq_len), generator=g)
        chunks = [ids[i : i + 16] for i in range(0, len(ids), 16)]
        return [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in chunks]
