"""Decoders through prompts, on the tiny random Llama: encoding, the answer-only objective, scoring that
only computes the logits it needs (and must equal the full computation), generation and its metric."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.cell.models import load_model, resolve_mode
from harness.cell.run import run_cell
from harness.records import label_ids
from harness.schema import TaskSpec
from harness.tasks.builtin import load_task
from harness.tasks.prompting import (
    PromptIO,
    PromptItem,
    answer_matches,
    collate_prompts,
    continuation_loss,
    encode_prompts,
    evaluate_prompts,
    score_continuations,
)
from tests.conftest import cells
from tests.test_card import decoder_predictions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama", 2, 0, mode="prompt")


def test_decoders_read_prompts_encoders_use_heads():
    assert resolve_mode("tiny-llama") == "prompt" and resolve_mode("tiny-bert") == "classifier"
    assert resolve_mode("tiny-llama", "classifier") == "classifier"


def test_truncation_cuts_the_text_never_the_instruction_or_answer(llama):
    task = load_task(TaskSpec(name="bbc_news", train_examples=8))
    tok = llama.tokenizer
    items = encode_prompts(task, task.train, tok, 40)
    tail = tok("\nTopic:", add_special_tokens=False)["input_ids"]
    whole = encode_prompts(task, task.train, tok, 100_000)
    for it, w in zip(items, whole, strict=True):
        kept = len(it.context) + max(len(c) for c in it.choices)
        assert kept <= 40
        assert it.context[-len(tail) :] == tail  # the instruction survives; the article was cut
        # the cut is counted: kept + cut is the whole prompt's length (a token either way where the article's
        # re-rendered end tokenizes otherwise)
        assert w.cut == 0 and abs(kept + it.cut - len(w.context) - max(len(c) for c in w.choices)) <= 1
    assert PromptIO(task, tok, 40).input_lengths()["train"]["cut"] == 8
    assert len(items[0].choices) == 5 and items[0].label == task.train[0].label


def test_loss_on_kept_logits_equals_full_forward(llama):
    """The objective computes vocabulary logits for the answer positions only; it must equal the textbook
    next-token NLL over the answer tokens of a full forward on the unpadded rows."""
    task = load_task(TaskSpec(name="piqa", train_examples=6))
    items = encode_prompts(task, task.train, llama.tokenizer, 64)
    batch = collate_prompts(items, llama.tokenizer.pad_token_id)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends at the last column
    model = llama.model.eval()
    got = continuation_loss(model, batch)
    nll, n = 0.0, 0
    for it in items:
        ids = torch.tensor([it.context + it.choices[it.label]])
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        ans = it.choices[it.label]
        start = len(it.context)
        nll -= sum(float(logp[start - 1 + j, t]) for j, t in enumerate(ans))
        n += len(ans)
    assert float(got) == pytest.approx(nll / n, rel=1e-4)


def test_scores_do_not_depend_on_padding_or_batching(llama):
    """Left padding with position ids: an item scores the same alone and batched with longer items, on both
    the one-token fast path (label words) and the per-choice path (multiple choice)."""
    tok, model = llama.tokenizer, llama.model.eval()
    for name in ("rotten_tomatoes", "piqa"):
        task = load_task(TaskSpec(name=name, eval_examples=12))
        items = encode_prompts(task, task.test, tok, 64)
        together, _ = score_continuations(model, items, 12, tok.pad_token_id, CPU)
        for i in (0, 5, 11):
            alone, _ = score_continuations(model, [items[i]], 1, tok.pad_token_id, CPU)
            assert alone[0] == pytest.approx(together[i], abs=1e-4)


def test_label_word_scores_are_log_probabilities(llama):
    tok, model = llama.tokenizer, llama.model.eval()
    words = [
        tok(" negative", add_special_tokens=False)["input_ids"],
        tok(" positive", add_special_tokens=False)["input_ids"],
    ]
    item = PromptItem(tok("Review: fine\nSentiment:", add_special_tokens=False)["input_ids"], words, 1)
    (scores,), _ = score_continuations(model, [item], 1, tok.pad_token_id, CPU)
    logp = F.log_softmax(model(input_ids=torch.tensor([item.context])).logits[0, -1], -1)
    assert scores == pytest.approx([float(logp[w[0]]) for w in words], abs=1e-5)


@pytest.mark.parametrize(
    "generated,reference,ok",
    [
        ("41", "41 students", True),
        ("There were 41 students.", "41 students", True),
        ("1,200 meters", "1200 meters", True),
        ("14", "41 students", False),
        ("3 + 38 = 41", "41 students", True),  # the question restated, then the answer: read at the answer
        ("41 - 3 = 38", "41 students", False),
        ("41 students, 3 teachers", "41 students", False),  # the last number is what the model ended on
        ("", "9 apples", False),
        ("Sara has more", "Sara", True),
        ("3:2", "3:2", True),
        ("3 apples", "3:2", False),
    ],
)
def test_answer_matching(generated, reference, ok):
    assert answer_matches(generated, reference) is ok


def test_the_normalised_pick_divides_by_characters_as_lm_eval_acc_norm(llama):
    """Choice 0: 2 characters in 4 tokens, log-likelihood -4; choice 1: 10 characters in 2 tokens, -10. Per
    character (lm-eval) choice 1 wins (-1 vs -2); per token choice 0 would (-1 vs -5)."""
    from harness.tasks.prompting import PromptItem, normalised_pick

    item = PromptItem([1], [[5, 6, 7, 8], [9, 10]], 1, chars=[2, 10])
    assert normalised_pick([-4.0, -10.0], [4, 2], item) == 1
    assert normalised_pick([-4.0, -10.0], [4, 2], PromptItem([1], [[5], [6]], 0)) == 0  # no characters: per token
    task = load_task(TaskSpec(name="piqa", eval_examples=4))
    items = encode_prompts(task, task.test, llama.tokenizer, 128)
    assert [it.chars for it in items] == [[len(c) for c in x.choices] for x in task.test]


def test_a_generation_that_runs_into_max_new_tokens_is_counted_as_cut(llama):
    """Two answers: one ends with the end-of-text token, one runs into max_new_tokens (4) before a newline or
    the end of text: only that one is cut short (the report and the summary then warn)."""
    import copy

    from harness.tasks.prompting import PromptItem, generate_answers

    tok = copy.deepcopy(llama.tokenizer)
    tok.eos_token = tok.sep_token  # the tiny model's BERT vocabulary has no end-of-text token of its own
    digits = tok("12 34", add_special_tokens=False)["input_ids"]
    rows = [digits[:1] + [tok.eos_token_id] * 3, (digits * 4)[:4]]

    class Scripted:  # generate's output: the contexts, then the scripted continuations
        def generate(self, input_ids, **kw):
            assert kw["max_new_tokens"] == 4
            return torch.cat([input_ids, torch.tensor(rows)[: len(input_ids)]], dim=1)

    items = [PromptItem([5, 6, 7], [[8]], 0, "12") for _ in rows]
    texts, cut = generate_answers(Scripted(), items, tok, 8, 4, CPU)
    assert cut == [False, True] and texts[0] == tok.decode(digits[:1]).strip()


def test_generation_task_generates_and_scores(llama):
    task = load_task(TaskSpec(name="asdiv", eval_examples=4))
    items = encode_prompts(task, task.test, llama.tokenizer, 64)
    assert [it.answer for it in items] == [x.answer for x in task.test]
    metrics, scores = evaluate_prompts(llama.model, task, items, llama.tokenizer, 4, torch.float32, CPU, 5)
    assert metrics["accuracy"] == 0.0 and metrics["examples"] == 4 and scores.shape == (4, 1)
    assert metrics["generations_cut"] == 4  # random weights: never a newline or the end of text in 5 tokens
    sample = metrics["generated_samples"][0]
    assert sample["answer"] == task.test[0].answer and isinstance(sample["generated"], str)
    assert len(llama.tokenizer(sample["generated"], add_special_tokens=False)["input_ids"]) <= 5 + 2


def test_prompt_training_learns_the_label_words_and_records_forgetting(tmp_path):
    """A decoder learns a task through its prompt (no head): the loss of the right label word falls, the
    record says the model read prompts, and the forgetting measure is taken before and after."""
    cfg = cells(
        models=["tiny-llama"],
        tasks=[{"name": "rotten_tomatoes", "train_examples": 256, "eval_examples": 64}],
        train={"steps": 50, "batch_size": 16, "lr": 1e-2, "max_seq_len": 48, "timing_warmup_steps": 1},
        methods=[{"method": "full"}],
        forgetting={"task": "bbc_news", "examples": 4, "max_seq_len": 32},
    )[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.model_info["mode"] == "prompt" and rec.model_info["architecture"] == "LlamaForCausalLM"
    assert rec.eval_before.loss > 9 and rec.eval_after.loss < 1.5  # from ~ln(30522) ≈ 10.3 to a two-word choice
    assert rec.eval_before.macro_f1 is not None and rec.task_info["label_words"] == [" negative", " positive"]
    truth, predicted = label_ids(rec.task_info["test_label_ids"]), label_ids(rec.eval_after.predicted)
    assert [int(c) for c in rec.eval_after.correct] == [int(p == t) for p, t in zip(predicted, truth, strict=True)]
    f = rec.forgetting
    assert f["task"] == "bbc_news" and f["before"]["texts"] == 4 and f["after"]["tokens"] == f["before"]["tokens"]
    assert f["after"]["lm_loss"] != f["before"]["lm_loss"]


@pytest.mark.parametrize(
    "method,config",
    [
        ("lora", {"r": 4}),
        ("qlora", {"r": 4}),
        ("qalora", {"r": 4, "group_size": 16}),
        ("peft", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}),
    ],
)
def test_methods_on_a_multiple_choice_task(tmp_path, method, config):
    """Every method runs on a decoder through prompts; mergeable ones export a model that scores the same."""
    cfg = cells(
        models=["tiny-llama"],
        tasks=[{"name": "openbookqa", "train_examples": 32, "eval_examples": 16}],
        train={"steps": 3, "batch_size": 8, "lr": 1e-3, "max_seq_len": 48, "timing_warmup_steps": 1},
        methods=[{"method": method, "config": config}],
    )[0]
    rec = run_cell(cfg, tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.eval_after.accuracy_norm is not None and rec.eval_after.macro_f1 is None
    assert rec.total_params > rec.trainable_params > 0
    # each example's pick kept beside the right choice: right exactly where the paired tests say so
    truth, predicted = label_ids(rec.task_info["test_label_ids"]), label_ids(rec.eval_after.predicted)
    assert [int(c) for c in rec.eval_after.correct] == [int(p == t) for p, t in zip(predicted, truth, strict=True)]
    for e in rec.exports:
        if e.eval is not None and e.kind in ("merged", "merged_fp32", "merged_int"):
            assert e.max_abs_logit_diff < 1e-2, e
    if method == "lora":  # the merged model's card picks each example's choice as the run did
        merged = next(e for e in rec.exports if e.kind == "merged")
        assert decoder_predictions(Path(merged.path) / "README.md", load_task(cfg.task).test) == predicted


def _lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``_encode_pair``, written out here as the reference."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx) :]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from harness.cell.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())  # a byte-level BPE: spaces are part of the word tokens


@pytest.mark.parametrize("name", ["rotten_tomatoes", "piqa", "asdiv"])
@pytest.mark.parametrize("which", ["tiny-llama", "smollm2"])
def test_prompts_tokenise_as_one_string_like_lm_eval(llama, smollm2_tokenizer, name, which):
    """The rendered prompt is tokenised whole (tokenised piece by piece, SmolLM2's BPE left a lone " " token
    after "Review:"), and each continuation's tokens are lm-eval's: those of context + continuation after the
    context's own."""
    tok = llama.tokenizer if which == "tiny-llama" else smollm2_tokenizer
    task = load_task(TaskSpec(name=name, eval_examples=20))
    items = encode_prompts(task, task.test, tok, 512)
    bos = [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id else []
    for it, x in zip(items, task.test, strict=True):
        context = "".join(
            lit + {"text": x.text, "text_pair": x.text_pair or ""}.get(f or "", "")
            for lit, f, _, _ in __import__("string").Formatter().parse(task.prompt)
        )
        texts = task.label_words if name == "rotten_tomatoes" else [" " + c for c in (x.choices or [x.answer])]
        for got, text in zip(it.choices, texts, strict=True):
            ctx, cont = _lm_eval_pair(tok, context, text)
            assert it.context == bos + ctx
            assert got[: len(cont)] == cont  # (+ EOS for generation)


def test_forgetting_loss_ignores_tokens_predicted_from_padding(llama):
    """Left-padded batch NLL equals the unpadded per-row NLL: no row's first token is scored from a pad."""
    from harness.tasks.prompting import lm_loss

    tok, model = llama.tokenizer, llama.model.eval()
    texts = ["a short one", "a much longer text than the first, so that the short one gets padded on the left"]
    got = lm_loss(model, texts, tok, 64, torch.float32, CPU)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum").detach())
        n += ids.shape[1] - 1
    assert got["tokens"] == n and got["lm_loss"] == pytest.approx(nll / n, rel=1e-4)


def test_prompts_are_encoded_once_per_suite_and_read_back_equal(tmp_path, monkeypatch, llama):
    """Encoding BoolQ's 10,122 training prompts for SmolLM2 took 12.5 s in every cell: a split's prompts are
    stored like a classifier's ids, named by all a prompt reads (template, label words, choices, answers)."""
    import harness.tasks.prompting as prompting
    from harness.tasks.encoded import MIN_EXAMPLES
    from harness.tasks.prompting import PromptIO

    monkeypatch.setenv("FTBENCH_CACHE_DIR", str(tmp_path))
    calls = []
    real = prompting.encode_prompts
    monkeypatch.setattr(prompting, "encode_prompts", lambda *a: calls.append(len(a[1])) or real(*a))
    task = load_task(TaskSpec(name="rotten_tomatoes", train_examples=MIN_EXAMPLES, eval_examples=20))
    first = PromptIO(task, llama.tokenizer, 48)
    again = PromptIO(task, llama.tokenizer, 48)
    assert calls == [MIN_EXAMPLES, 20, 20]  # the large train split once; a small test split is not worth a file
    assert again.train == first.train == real(task, task.train, llama.tokenizer, 48)
    assert again.input_lengths() == first.input_lengths()
    task.prompt = "Review: {text}\nVerdict:"  # another template: other prompts, another file
    other = PromptIO(task, llama.tokenizer, 48)
    assert calls[-2] == MIN_EXAMPLES and other.train != first.train
    assert len(list((tmp_path / "encoded").glob("*.json"))) == 2


def test_prompt_tuning_scores_a_padded_row_as_it_would_alone(llama):
    """PEFT's prompt tuning puts its virtual tokens before the left padding and drops position_ids: padded, a
    row's scores depended on its batch. The built-in method numbers positions from the attention mask
    (methods/peft_generic.py::positions_from_mask): every score in a padded batch is the one it has alone."""
    import copy

    from peft import PromptTuningConfig, TaskType, get_peft_model

    from harness.contract import ModelContext
    from harness.registry import build_method
    from harness.tasks.prompting import PromptIO

    task = load_task(TaskSpec(name="openbookqa", train_examples=8, eval_examples=16))  # multi-token choices
    io = PromptIO(task, llama.tokenizer, 48)

    def moved(model) -> float:  # how far a padded batch moves the scores from each row's own
        return float(
            (io.evaluate(model, 16, torch.float32, CPU)[1] - io.evaluate(model, 1, torch.float32, CPU)[1]).abs().max()
        )

    ctx = ModelContext(task_type="causal_lm", num_labels=2, model_type="llama")
    ours = build_method("peft", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}).prepare(
        copy.deepcopy(llama.model), ctx
    )
    peft = get_peft_model(
        copy.deepcopy(llama.model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    peft.load_state_dict(ours.state_dict())  # the same virtual tokens, run as peft runs them
    assert moved(peft) > 1e-4 and moved(ours) < moved(peft) / 10, (moved(peft), moved(ours))


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_learning_generates_what_its_forward_predicts(llama, tmp_path, peft_type):
    """peft 0.21's generate() under transformers 5 re-injected prompt tuning's virtual tokens at every cached step
    and never read prefix tuning's prefix. The built-in method turns the cache off, and ftbench then decodes by
    whole forwards: every answer, padded in a batch or alone, is the greedy continuation its forward predicts."""
    import copy

    from harness.contract import ModelContext
    from harness.registry import build_method
    from harness.tasks.prompting import PromptIO, generate_answers
    from tests.test_user_tasks import GEN, write_generation

    ctx = ModelContext(task_type="causal_lm", num_labels=1, model_type="llama")
    method = build_method("peft", {"peft_type": peft_type, "num_virtual_tokens": 4})
    model = method.prepare(copy.deepcopy(llama.model), ctx).eval()
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(3)  # virtual tokens that change the answers
    task = load_task(TaskSpec(name="jsonl", path=str(write_generation(tmp_path / "g.jsonl")), **GEN))
    items, tok = PromptIO(task, llama.tokenizer, 48).test, llama.tokenizer

    def alone(context: list[int]) -> str:  # greedy by whole forwards, one row, no padding, no cache
        seq = list(context)
        with torch.no_grad():
            for _ in range(4):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == tok.eos_token_id:
                    break
        return tok.decode(seq[len(context) :], skip_special_tokens=True).strip().split("\n")[0]

    truth = [alone(it.context) for it in items]
    assert generate_answers(model, items, tok, 8, 4, CPU)[0] == truth
    assert truth != generate_answers(llama.model, items, tok, 8, 4, CPU)[0]  # the virtual tokens change them
