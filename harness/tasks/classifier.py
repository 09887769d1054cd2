"""Tokenisation, batching and evaluation of a classification task.

Batches are padded to the longest example in the batch (not to ``max_seq_len``), so a step's cost follows
the data; tokens/s counts real (non-pad) tokens only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch

from harness.contract import Batch
from harness.tasks.data import Example, TaskData, input_lengths
from harness.tasks.encoded import cached_encode


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The fraction of predictions equal to the labels."""
    return float(np.mean(y_true == y_pred))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over labels of F1 = 2·TP / (2·TP + FP + FN), over every label in either array, a label
    never predicted scoring 0: scikit-learn's ``f1_score(average="macro")``, without importing scikit-learn
    (a second of every cell process's start)."""
    labels = np.union1d(y_true, y_pred)
    scores = []
    for c in labels:
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        wrong = int(np.sum((y_pred == c) != (y_true == c)))  # FP + FN
        scores.append(2 * tp / (2 * tp + wrong) if tp or wrong else 0.0)
    return float(np.mean(scores))


def encode(examples: list[Example], tokenizer, max_len: int) -> list[dict]:
    """Token ids per example; pairs (e.g. question, passage) are encoded as the tokenizer's sentence pair,
    truncating the longer member first, with its segment ids where it has them (BERT's token_type_ids: 0 for
    the first member, 1 for the second, as the model was pretrained). ``cut``: the tokens truncation removed
    (only rows that fill ``max_len`` are tokenized again, whole, to count them)."""
    firsts = [x.text for x in examples]
    pairs = [x.text_pair or "" for x in examples] if any(x.text_pair for x in examples) else None
    args = (firsts, pairs) if pairs is not None else (firsts,)
    enc = tokenizer(*args, truncation="longest_first" if pairs is not None else True, max_length=max_len)
    out = [{"input_ids": ids, "label": x.label, "cut": 0} for ids, x in zip(enc["input_ids"], examples, strict=True)]
    if pairs is not None:
        for e, types in zip(out, enc.get("token_type_ids") or [], strict=False):
            e["token_type_ids"] = types
    full = [i for i, e in enumerate(out) if len(e["input_ids"]) >= max_len]
    if full:  # verbose=False: transformers' "longer than the model's maximum" warning is about the uncut ids
        whole = tokenizer(*([a[i] for i in full] for a in args), verbose=False)["input_ids"]
        for i, ids in zip(full, whole, strict=True):
            out[i]["cut"] = len(ids) - len(out[i]["input_ids"])
    return out


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples into one batch of tensors."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
        mask[i, : len(it["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([it["label"] for it in items])}
    if "token_type_ids" in items[0]:  # sentence pairs: each token's segment, padding in segment 0
        types = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            types[i, : len(it["token_type_ids"])] = torch.tensor(it["token_type_ids"])
        batch["token_type_ids"] = types
    return batch


# Evaluation batches: examples sorted by length, and a batch closed early where padding the next example's length
# would make more than a fifth of it padding (once it holds 512 tokens: smaller batches lose matmul efficiency).
# With 64 prompts of 5 to 57 tokens in one batch of 64, half of SmolLM2's work was padding: 6.5 s → 3.5 s.
EVAL_PAD_SHARE = 0.2
EVAL_MIN_BATCH_TOKENS = 512


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``batch_size``, shortest first, each padded little: a batch
    ends early where the next example would make over ``EVAL_PAD_SHARE`` of its padded tokens padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        padded = (len(cur) + 1) * n  # ascending lengths: the newest example sets the batch's width
        full = len(cur) == batch_size
        big_enough = bool(cur) and len(cur) * lengths[cur[-1]] >= EVAL_MIN_BATCH_TOKENS
        wasteful = big_enough and padded - real - n > EVAL_PAD_SHARE * padded
        if full or wasteful:
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    return batches + [cur] if cur else batches


GROUP_BY_LENGTH_WINDOW = 50  # batches per window sorted by length (transformers' LengthGroupedSampler: 50 too)


def train_batches(
    encoded: list,
    batch_size: int,
    seed: int,
    pad_id: int,
    collate_fn: Callable[[list, int], dict] | None = None,
    length: Callable[[object], int] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of shuffled batches; each epoch reshuffles with a seed derived from ``seed``.
    ``collate_fn`` turns a list of encoded examples into a batch (default: :func:`collate`; prompts pass
    :func:`harness.tasks.prompting.collate_prompts`). With ``length`` (an example's token count), batches are grouped
    by length: each window of 50 batches' worth of shuffled examples is sorted by length and cut into batches,
    and the batches are shuffled again, so a batch pads to a width near its examples' own and fewer pad tokens
    are computed; which examples train together is still random from window to window."""
    collate_fn = collate_fn or collate
    if len(encoded) < batch_size:
        raise ValueError(f"train split has {len(encoded)} examples, fewer than batch_size {batch_size}")
    rng = random.Random(seed)
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        order = order[: len(order) - len(order) % batch_size]  # drop the ragged tail: equal-size steps
        if length is not None:  # windows of 50 batches, each sorted by length (the order within a batch is moot)
            window = batch_size * GROUP_BY_LENGTH_WINDOW
            order = [
                j
                for w in range(0, len(order), window)
                for j in sorted(order[w : w + window], key=lambda j: length(encoded[j]))
            ]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if length is not None:
            rng.shuffle(batches)
        for idx in batches:
            yield collate_fn([encoded[j] for j in idx], pad_id)


def calibration_batches(encoded: list, n: int, pad_id: int, collate_fn: Callable) -> list[dict[str, torch.Tensor]]:
    """Model inputs (no labels) of the first ``n`` encoded training examples, 16 to a batch."""
    n = min(n, len(encoded))
    batches = [collate_fn(encoded[i : min(i + 16, n)], pad_id) for i in range(0, n, 16)]
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, encoded: list[dict], batch_size: int, pad_id: int, dtype: torch.dtype, device: torch.device
) -> tuple[dict, torch.Tensor]:
    """Accuracy, macro-F1 (scikit-learn) and mean loss on ``encoded``; also returns the logits (for fidelity
    checks between a trained model and its exports). Batched by length to waste little padding (eval_batches)."""
    was_training = model.training
    model.eval()
    logits = [None] * len(encoded)
    loss_sum = 0.0
    for idx in eval_batches([len(e["input_ids"]) for e in encoded], batch_size):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(**batch)
        # the loss from the logits, the same for every method: a model's own may add its method's regulariser
        # (AdaLoRA's orthogonality term) or, loaded for inference, fail (peft's AdaLoRA without a trainable adapter)
        loss_sum += float(torch.nn.functional.cross_entropy(out.logits.float(), labels)) * len(idx)
        for j, i in enumerate(idx):
            logits[i] = out.logits[j].float().cpu()
    model.train(was_training)
    stacked = torch.stack(logits)
    y_true = np.array([e["label"] for e in encoded])
    y_pred = stacked.argmax(-1).numpy()
    metrics = {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "loss": loss_sum / len(encoded),
        "examples": len(encoded),
        "correct": "".join("1" if t == p else "0" for t, p in zip(y_true, y_pred, strict=True)),
        "predicted": ",".join(str(p) for p in y_pred.tolist()),
    }
    return metrics, stacked


class ClassifierIO:
    """A task read by a classification head (:class:`harness.contract.TaskIO`): the model's own
    cross-entropy on the label; the head is an ordinary layer (FLOPs counted with the rest)."""

    task_type = "seq_cls"

    def __init__(self, task: TaskData, tokenizer, max_seq_len: int, max_new_tokens: int = 0) -> None:
        self.pad_id = tokenizer.pad_token_id
        self.train = cached_encode(encode, task.train, tokenizer, max_seq_len)  # tokenized once per suite, not per cell
        self.test = cached_encode(encode, task.test, tokenizer, max_seq_len)
        self._validation = lambda: cached_encode(encode, task.validation, tokenizer, max_seq_len)  # when asked for
        self.validation: list[dict] | None = None

    def output_names(self, model: torch.nn.Module) -> list[str]:
        return []

    def batches(self, batch_size: int, seed: int, group_by_length: bool = False) -> Iterator[Batch]:
        length = (lambda it: len(it["input_ids"])) if group_by_length else None
        return train_batches(
            self.train, batch_size, seed, self.pad_id, lambda items, pad: Batch(collate(items, pad)), length
        )

    def objective(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).loss

    def evaluate(
        self, model: torch.nn.Module, batch_size: int, dtype: torch.dtype, device: torch.device, split: str = "test"
    ) -> tuple[dict, torch.Tensor]:
        if split == "validation" and self.validation is None:
            self.validation = self._validation()
        return evaluate(
            model, {"test": self.test, "validation": self.validation}[split], batch_size, self.pad_id, dtype, device
        )

    def calibration(self, n: int) -> list[dict[str, torch.Tensor]]:
        return calibration_batches(self.train, n, self.pad_id, collate)

    def input_lengths(self) -> dict[str, dict]:
        return {
            split: input_lengths([len(e["input_ids"]) for e in rows], [e.get("cut", 0) for e in rows])
            for split, rows in (("train", self.train), ("test", self.test))
        }
