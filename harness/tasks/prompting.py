"""Decoders do every task through prompts: a task becomes (context, continuations, right continuation).

- classification: the continuations are the task's label words (" negative", " positive"); the prediction is
  the label whose words are most likely after the prompt (no classification head, nothing new to train).
- multiple choice: the continuations are the choices, scored by their summed log-likelihood ("acc" in
  lm-evaluation-harness; ``accuracy_norm`` divides by the choice's length in characters, as its ``acc_norm``).
- generation: the continuation is the reference answer (+ EOS); evaluation generates greedily and compares
  the last number of the output's first line with the answer's (lm-evaluation-harness's flexible-extract), or the
  normalised text where the answer is not a number.

Training minimises the negative log-likelihood of the right continuation's tokens only (prompt tokens are
context, not targets). Sequences are left-padded, so every continuation ends at the last column: the model
computes vocabulary logits for the last K+1 positions only (``logits_to_keep``), not the whole sequence —
for a 49k-token vocabulary that is most of the logits' memory and a fifth of the FLOPs of a short example.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from harness.contract import Batch
from harness.tasks.classifier import accuracy, calibration_batches, eval_batches, macro_f1, train_batches
from harness.tasks.data import Example, TaskData, input_lengths
from harness.tasks.decoding import decodes_on_own_cache, greedy_on_own_cache
from harness.tasks.encoded import cached_encode


@dataclass
class PromptItem:
    """One example rendered as a prompt with its candidate continuations."""

    context: list[int]
    choices: list[list[int]]  # token ids of each continuation
    label: int  # index of the right continuation
    answer: str | None = None  # generation: the reference text
    chars: list[int] | None = None  # multiple choice: each choice's length in characters (accuracy_norm)
    cut: int = 0  # tokens cut from the longest field text to fit max_seq_len


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _render(template: str, values: dict[str, str]) -> str:
    return "".join(
        literal + (values[field] if field else "") for literal, field, _, _ in string.Formatter().parse(template)
    )


def _encode_pair(tokenizer, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """lm-evaluation-harness's convention: the context's trailing whitespace moves to the continuation; the
    continuation's tokens are those of context + continuation after the context's own tokens. The rendered
    prompt is tokenised as one string (no token boundary where a template field begins)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuations = context[:-n], [context[-n:] + c for c in continuations]
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer([context + c for c in continuations], add_special_tokens=False)["input_ids"]
    return ids, [w[len(ids) :] for w in whole]


def _continuations(task: TaskData, x: Example) -> tuple[list[str], int]:
    if task.kind == "classification":
        if not task.label_words:
            raise ValueError(f"task {task.name}: classification through prompts needs label_words")
        return task.label_words, x.label
    if task.kind == "multiple_choice":
        return [" " + c for c in x.choices], x.label
    return [" " + (x.answer or "")], 0


def encode_prompts(task: TaskData, examples: list[Example], tokenizer, max_len: int) -> list[PromptItem]:
    """Token ids per example. Where a prompt does not fit ``max_len``, the longest field text is cut (by its
    own tokens, then re-rendered), never the instruction or a continuation."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id else []
    eos = [tokenizer.eos_token_id] if task.kind == "generation" and tokenizer.eos_token_id is not None else []
    names = _fields(task.prompt)
    items = []
    for x in examples:
        texts, label = _continuations(task, x)
        values = {"text": x.text, "text_pair": x.text_pair or ""}
        field_ids: dict[str, list[int]] | None = None
        cut = 0
        while True:
            context, choices = _encode_pair(tokenizer, _render(task.prompt, values), texts)
            choices = [c + eos for c in choices]
            over = len(bos) + len(context) + max(len(c) for c in choices) - max_len
            if over <= 0:
                break
            cut += over
            if field_ids is None:
                field_ids = {n: tokenizer(values[n], add_special_tokens=False)["input_ids"] for n in names}
            longest = max(names, key=lambda n: len(field_ids[n]), default=None)
            if longest is None or not field_ids[longest]:
                raise ValueError(f"task {task.name}: max_seq_len {max_len} leaves no room for the text of the prompt")
            field_ids[longest] = field_ids[longest][: max(0, len(field_ids[longest]) - over)]
            values[longest] = tokenizer.decode(field_ids[longest])
        if task.kind == "classification" and len({tuple(c) for c in choices}) < len(choices):
            raise ValueError(f"task {task.name}: label words tokenise identically: {texts}")
        chars = [len(c) for c in x.choices] if task.kind == "multiple_choice" else None
        items.append(PromptItem(bos + context, choices, label, x.answer, chars, cut))
    return items


def _prompt_rows(task: TaskData, examples: list[Example], tokenizer, max_len: int) -> list[dict]:
    """:func:`encode_prompts` as rows of plain values, as :func:`harness.tasks.encoded.cached_encode` stores them."""
    return [dataclasses.asdict(it) for it in encode_prompts(task, examples, tokenizer, max_len)]


def _left_pad(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
        pos[i, width - len(s) :] = torch.arange(len(s))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos}


def collate_prompts(items: list[PromptItem], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded context + right continuation; ``labels`` holds only the continuations' tokens, [B, K]."""
    targets = [it.choices[it.label] for it in items]
    batch = _left_pad([it.context + t for it, t in zip(items, targets, strict=True)], pad_id)
    k = max(len(t) for t in targets)
    labels = torch.full((len(items), k), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        labels[i, k - len(t) :] = torch.tensor(t)
    return {**batch, "labels": labels}


def continuation_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """Logits [B, k, V] of the positions that predict the last ``k`` tokens of each (left-padded) row."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=k + 1,
    )
    return out.logits[:, -(k + 1) : -1]


def continuation_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training objective for prompts: mean NLL of the right continuations' tokens."""
    labels = batch["labels"]
    logits = continuation_logits(model, batch, labels.shape[1])
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module, items: list[PromptItem], batch_size: int, pad_id: int, device: torch.device
) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-likelihood of every continuation of every item (and its token count). Where every
    continuation is one token (most label words), one forward of the context scores them all."""
    single = all(len(c) == 1 for it in items for c in it.choices)
    # requests: (item, choice or -1 for "all single-token choices at once", sequence)
    reqs = (
        [(i, -1, it.context) for i, it in enumerate(items)]
        if single
        else [(i, c, it.context + ch) for i, it in enumerate(items) for c, ch in enumerate(it.choices)]
    )
    scores = [[0.0] * len(it.choices) for it in items]
    for batch_idx in eval_batches([len(r[2]) for r in reqs], batch_size):  # by length: little padding
        chunk = [reqs[r] for r in batch_idx]
        batch = {k: v.to(device) for k, v in _left_pad([r[2] for r in chunk], pad_id).items()}
        if single:
            out = model(**batch, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
            for j, (i, _, _) in enumerate(chunk):
                scores[i] = [float(out[j, ch[0]]) for ch in items[i].choices]
            continue
        k = max(len(items[i].choices[c]) for i, c, _ in chunk)
        logp = continuation_logits(model, batch, k).float().log_softmax(-1)
        for j, (i, c, _) in enumerate(chunk):
            ch = items[i].choices[c]
            rows = logp[j, k - len(ch) :]
            scores[i][c] = float(rows.gather(-1, torch.tensor(ch, device=rows.device)[:, None]).sum())
    lengths = [[len(c) for c in it.choices] for it in items]
    return scores, lengths


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def answer_matches(generated: str, reference: str) -> bool:
    """Numeric answers ("9 apples"): the last number of the generated line equals it, as lm-evaluation-harness's
    "flexible-extract" reads GSM8K (``group_select: -1``): a model that restates the question before answering
    ("3 + 4 = 7") is read at its answer, not at the question's first operand. Others ("3:2", "Sara"): the
    normalised generation starts with the normalised reference."""
    head = reference.strip().split(" ")[0]
    if _NUMBER.fullmatch(head):
        numbers = _NUMBER.findall(generated)
        return bool(numbers) and float(numbers[-1].replace(",", "")) == float(head.replace(",", ""))
    ref = _norm(reference)
    return bool(ref) and _norm(generated).startswith(ref)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, items: list[PromptItem], tokenizer, batch_size: int, max_new_tokens: int, device
) -> tuple[list[str], list[bool]]:
    """Greedy continuations of every context, cut at the first newline, and whether each ran into
    ``max_new_tokens`` before a newline or the end of text (its answer may be cut short)."""
    out, cut = [""] * len(items), [False] * len(items)
    for idx in eval_batches([len(it.context) for it in items], batch_size):
        batch = {k: v.to(device) for k, v in _left_pad([items[i].context for i in idx], tokenizer.pad_token_id).items()}
        if decodes_on_own_cache(model):
            gen = greedy_on_own_cache(model, batch, max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id)
        else:
            gen = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        width = batch["input_ids"].shape[1]
        for j, i in enumerate(idx):
            new = gen[j, width:]
            text = tokenizer.decode(new, skip_special_tokens=True)
            ended = tokenizer.eos_token_id is not None and bool((new == tokenizer.eos_token_id).any())
            cut[i] = len(new) >= max_new_tokens and not ended and "\n" not in text.strip()
            out[i] = text.strip().split("\n")[0]
    return out, cut


def evaluate_prompts(
    model: torch.nn.Module,
    task: TaskData,
    items: list[PromptItem],
    tokenizer,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    max_new_tokens: int = 16,
) -> tuple[dict, torch.Tensor]:
    """Metrics on ``items`` and the per-continuation scores [N, max choices] (for fidelity checks between a
    trained model and its exports: the same numbers, computed from each)."""
    was_training = model.training
    model.eval()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        scores, lengths = score_continuations(model, items, batch_size, tokenizer.pad_token_id, device)
        generated = (
            generate_answers(model, items, tokenizer, batch_size, max_new_tokens, device)
            if task.kind == "generation"
            else None
        )
    model.train(was_training)
    width = max(len(s) for s in scores)
    table = torch.full((len(items), width), float("-inf"))
    for i, s in enumerate(scores):
        table[i, : len(s)] = torch.tensor(s)
    y_true = np.array([it.label for it in items])
    right = [scores[i][it.label] / lengths[i][it.label] for i, it in enumerate(items)]
    metrics: dict = {"loss": -float(np.mean(right)), "examples": len(items)}  # mean NLL per right-answer token
    if generated is not None:
        generated, cut = generated
        pairs = list(zip(generated, items, strict=True))
        hits = [answer_matches(g, it.answer or "") for g, it in pairs]
        metrics["accuracy"] = float(np.mean(hits))
        metrics["correct"] = "".join("1" if h else "0" for h in hits)
        metrics["generated_samples"] = [{"answer": it.answer, "generated": g} for g, it in pairs[:5]]
        metrics["generations_cut"] = sum(cut)
        return metrics, table
    y_pred = table.argmax(-1).numpy()
    metrics["accuracy"] = accuracy(y_true, y_pred)
    metrics["correct"] = "".join("1" if t == p else "0" for t, p in zip(y_true, y_pred, strict=True))
    metrics["predicted"] = ",".join(str(p) for p in y_pred.tolist())
    if task.kind == "classification":
        metrics["macro_f1"] = macro_f1(y_true, y_pred)
    else:
        picks = [normalised_pick(sc, ln, it) for sc, ln, it in zip(scores, lengths, items, strict=True)]
        hits = [p == it.label for p, it in zip(picks, items, strict=True)]
        metrics["accuracy_norm"] = float(np.mean(hits))
    return metrics, table


def normalised_pick(scores: list[float], tokens: list[int], item: PromptItem) -> int:
    """The choice with the highest log-likelihood per character (lm-evaluation-harness's acc_norm: tokenizer-
    independent); per token where the item has no character lengths."""
    per = item.chars or tokens
    return int(np.argmax([sc / max(n, 1) for sc, n in zip(scores, per, strict=True)]))


@torch.no_grad()
def lm_loss(model: torch.nn.Module, texts: list[str], tokenizer, max_len: int, dtype, device) -> dict:
    """Mean next-token NLL over held-out texts (the forgetting measure): all positions, one text per row."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for s in range(0, len(texts), 8):
        enc = tokenizer(texts[s : s + 8], truncation=True, max_length=max_len, add_special_tokens=False)
        batch = {k: v.to(device) for k, v in _left_pad(enc["input_ids"], tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            width = batch["input_ids"].shape[1]  # the last `width` logits: prompt-learning methods prepend tokens
            logits = model(**batch, logits_to_keep=width).logits[:, -width:-1].float()
        # A target counts only where it and the position predicting it are real tokens: with left padding, a
        # row's first token would otherwise be scored as predicted from a pad.
        mask = batch["attention_mask"]
        target = batch["input_ids"][:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
        nll += float(F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    model.train(was_training)
    return {"lm_loss": nll / count, "tokens": count, "texts": len(texts)}


class PromptIO:
    """A task read by a decoder through prompts (:class:`harness.contract.TaskIO`): NLL of the right
    continuation; the LM head computes logits on the continuation's positions only (``head_positions``)."""

    task_type = "causal_lm"

    def __init__(self, task: TaskData, tokenizer, max_seq_len: int, max_new_tokens: int = 16) -> None:
        self.task, self.tokenizer, self.max_new_tokens = task, tokenizer, max_new_tokens
        self.pad_id = tokenizer.pad_token_id
        # all else a prompt reads: the task's template and words, the BOS and EOS it adds (tokenizer attributes)
        ends = [getattr(tokenizer, "add_bos_token", None), tokenizer.bos_token_id, tokenizer.eos_token_id]
        context = json.dumps([task.name, task.kind, task.prompt, task.label_words, ends])

        def encoded(examples: list[Example]) -> list[PromptItem]:  # tokenized once per suite, not per cell
            rows = cached_encode(partial(_prompt_rows, task), examples, tokenizer, max_seq_len, context)
            return [PromptItem(**r) for r in rows]

        self.train, self.test = encoded(task.train), encoded(task.test)
        self._validation = lambda: encoded(task.validation)  # when asked for
        self.validation: list[PromptItem] | None = None

    def output_names(self, model: torch.nn.Module) -> list[str]:
        from harness.cell.models import output_module_names

        return output_module_names(model)

    def batches(self, batch_size: int, seed: int, group_by_length: bool = False) -> Iterator[Batch]:
        def collate(items: list[PromptItem], pad_id: int) -> Batch:
            batch = Batch(collate_prompts(items, pad_id))
            labels = batch["labels"]
            batch.head_positions = labels.shape[0] * (labels.shape[1] + 1)  # logits_to_keep = K + 1 per row
            return batch

        length = (lambda it: len(it.context) + len(it.choices[it.label])) if group_by_length else None
        return train_batches(self.train, batch_size, seed, self.pad_id, collate, length)

    def objective(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return continuation_loss(model, batch)

    def evaluate(
        self, model: torch.nn.Module, batch_size: int, dtype: torch.dtype, device: torch.device, split: str = "test"
    ) -> tuple[dict, torch.Tensor]:
        if split == "validation" and self.validation is None:
            self.validation = self._validation()
        items = {"test": self.test, "validation": self.validation}[split]
        return evaluate_prompts(model, self.task, items, self.tokenizer, batch_size, dtype, device, self.max_new_tokens)

    def calibration(self, n: int) -> list[dict[str, torch.Tensor]]:  # prompt + right answer, as in training
        return calibration_batches(self.train, n, self.pad_id, collate_prompts)

    def input_lengths(self) -> dict[str, dict]:  # a prompt's length: its context and its longest continuation
        return {
            split: input_lengths(
                [len(it.context) + max(map(len, it.choices)) for it in items], [it.cut for it in items]
            )
            for split, items in (("train", self.train), ("test", self.test))
        }
