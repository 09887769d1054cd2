"""A model card (``README.md``) in each folder a run exported: what the artifact is, how it was made, how it
scored on the test split as served, how to load it and how it reads its inputs, from the run's record alone.

A card states figures with their 95% interval over the test examples, of one seed (the record's): a single run
is no comparison, and the card says so. PEFT writes a template card into an adapter folder; this one replaces it.
How a folder loads is read from the files in it (a PEFT adapter, a transformers model, ftbench's INT-N format),
never from the method's name: a method whose artifact needs more says so in its export's ``notes``.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.cell.modelnames import hub_id
from harness.environment import describe
from harness.records import EvalMetrics, ExportRecord, RunRecord
from reports.metrics import fmt_bytes
from reports.stats import form_vs_trained, wilson

CARD = "README.md"
MARK = "Written by ftbench"  # how a card of ftbench's tells itself from another README


def write_cards(record: RunRecord) -> list[Path]:
    """A card in each exported folder of an ``ok`` record that holds files; the paths written."""
    if record.status != "ok":
        return []
    written = []
    for e in _exported(record):
        (Path(e.path) / CARD).write_text(render_card(record, e), encoding="utf-8")
        written.append(Path(e.path) / CARD)
    return written


def _exported(record: RunRecord) -> list[ExportRecord]:
    """The exports that wrote a folder: not failed, not unsupported, there on this machine."""
    return [e for e in record.exports if not e.error and not e.unsupported and Path(e.path).is_dir()]


def write_missing_cards(records: list[RunRecord]) -> int:
    """Cards for the exported folders of ``records`` that have none of ftbench's (a run recorded by an ftbench
    before the cards, whose adapter folder holds PEFT's template) or one that names another record (a record
    ``ftbench run`` kept under a new cell id): it calls this on every record it keeps, resumed ones too. Returns
    how many records got cards."""
    written = 0
    for r in records:
        if any(not _names(_text(Path(e.path) / CARD), r) for e in _exported(r)):
            written += bool(write_cards(r))
    return written


def _names(card: str, record: RunRecord) -> bool:
    """Whether ``card`` is ftbench's card of ``record``."""
    return MARK in card and f"`records/{record.cell_id}.json`" in card


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _score(m: EvalMetrics | None) -> str:
    if m is None:
        return "—"
    lo, hi = wilson(m.accuracy, m.examples)
    return f"{m.accuracy:.3f} [{lo:.3f}, {hi:.3f}]"


def _front_matter(record: RunRecord, folder: Path) -> str:
    peft = "peft_type" in _json(folder / "adapter_config.json")
    tags = ["ftbench", record.method, record.task]
    lines = ["---", f"library_name: {'peft' if peft else 'transformers'}", "tags:", *[f"- {t}" for t in tags]]
    if base := hub_id(record.model):  # the hub links a published card to its base model
        lines.append(f"base_model: {base}")
    return "\n".join([*lines, "---", ""])


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _loading(record: RunRecord, e: ExportRecord) -> list[str]:
    """How this folder loads, from the files in it."""
    folder, mode = Path(e.path), record.model_info.get("mode", "classifier")
    auto = "AutoModelForCausalLM" if mode == "prompt" else "AutoModelForSequenceClassification"
    where = f"folder = {json.dumps(str(folder))}  # this folder, where ftbench wrote it (published: its repo id)"
    tok_line = ["tokenizer = AutoTokenizer.from_pretrained(folder)"] if any(folder.glob("tokenizer*")) else []
    tok_import = ["from transformers import AutoTokenizer"] if tok_line else []
    adapter = _json(folder / "adapter_config.json")
    if (folder / "ftbench_quant.json").is_file():
        bits = _json(folder / "ftbench_quant.json").get("bits", "?")
        head = f"ftbench's group-wise INT{bits} format (`ftbench_quant.json`), read by ftbench's loader:"
        code = [*tok_import, "from methods.intquant import load_merged  # installed with ftbench", "", where]
        code += ["model = load_merged(folder)", *tok_line]
    elif adapter.get("peft_type"):
        base = adapter.get("base_model_name_or_path") or ""
        if not base or (not Path(base).expanduser().exists() and not record.model_info.get("pretrained", True)):
            return [
                f"A PEFT adapter ({adapter['peft_type']}) on a base that was built with random weights "
                f"(seed {record.seed}): there is no folder to load that base from."
            ]
        names = record.task_info.get("labels") or []
        labels = f", id2label={dict(enumerate(names))!r}" if mode != "prompt" and names else ""
        head = f"A PEFT adapter ({adapter['peft_type']}) on the base model ftbench loaded (`{record.model}`)"
        head += f" ({note}):" if (note := record.model_info.get("weights_note")) else ":"
        code = ["from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "", where]
        code += [
            f"base = {json.dumps(base)}  # the base model's folder, as ftbench loaded it (the head: the adapter's)",
            *_hub_base(record),
            f"model = PeftModel.from_pretrained({auto}.from_pretrained(base{labels}), folder)",
            "tokenizer = AutoTokenizer.from_pretrained(base)",
        ]
    elif (folder / "config.json").is_file():
        arch = (_json(folder / "config.json").get("architectures") or [auto])[0]
        head = "A transformers model folder:"
        code = [f"from transformers import {arch}, AutoTokenizer", "", where]
        code += [f"model = {arch}.from_pretrained(folder)", *tok_line]
    else:
        return ["No loader: ftbench writes this folder but has no reader for its format."]
    return [head, "", "```python", *code, "```"]


def _hub_base(record: RunRecord) -> list[str]:
    """Where a reader without ftbench's local copy finds the base on the Hub: the same model, or, where ftbench
    converted its weights (SmolLM2 from a 4-bit GGUF file), the original the adapter did not train on."""
    if not (hub := hub_id(record.model)) or not record.model_info.get("pretrained", True):
        return []
    if record.model_info.get("weights_note"):
        return [f"# not the Hub's {json.dumps(hub)} itself: the adapter trained on it as converted (the note above)"]
    return [f"# elsewhere: base = {json.dumps(hub)}, the Hub's model this local copy packages"]


def _notes(e: ExportRecord) -> list[str]:
    """What the method says of its artifact (how it was made, what serving it as trained needs)."""
    return ["", f"The method's note: {e.notes}."] if e.notes else []


def _inputs(record: RunRecord, folder: Path) -> list[str]:
    """How the model reads an example, as this run trained and scored it."""
    info, seq = record.task_info, record.config.get("train", {}).get("max_seq_len")
    if record.model_info.get("mode", "classifier") != "prompt":
        labels = info.get("labels") or []
        named = ", ".join(f"{i} = `{name}`" for i, name in enumerate(labels))
        return [
            f"Each text (with its pair, where the task has one) tokenized with `truncation=True, max_length={seq}`, "
            f"as trained and scored; the prediction is the label with the highest logit: {named} "
            "(the config's `id2label`)."
        ]
    out = [
        f"Prompt template: `{json.dumps(info.get('prompt'))}`; where a prompt exceeded {seq} tokens, its longest "
        "field was cut to fit (`predict` below cuts nothing)."
    ]
    if info.get("kind") == "generation":
        most = record.config.get("task", {}).get("max_new_tokens")
        out += ["", f"Answers are generated greedily (at most {most} new tokens); the first line is the answer."]
        virtual = "num_virtual_tokens" in _json(folder / "adapter_config.json")
        return out + ["", "```python", *_generate_code(info, most, virtual), "```"]
    if info.get("label_words"):
        names = info.get("labels") or []
        words = ", ".join(
            f"{i} = `{json.dumps(w)}`" + (f" ({names[i]})" if i < len(names) else "")
            for i, w in enumerate(info["label_words"])
        )
        out += ["", f"The prediction is the label word with the highest log-likelihood after the prompt: {words}."]
    else:
        out += ["", "The prediction is the choice (after a space) with the highest summed log-likelihood."]
    return out + ["", "```python", *_prompt_code(info), "```"]


def _context_code(info: dict) -> list[str]:
    """The prompt's token ids, as ftbench builds them: the template filled, its trailing whitespace left to the
    continuation, BOS where the tokenizer adds one."""
    return [
        f"    prompt = {info.get('prompt')!r}.replace('{{text}}', text).replace('{{text_pair}}', text_pair or '')",
        "    space = prompt[len(prompt.rstrip()):]",
        "    prompt = prompt.rstrip()  # its trailing whitespace goes with each continuation",
        "    adds_bos = getattr(tokenizer, 'add_bos_token', False) and tokenizer.bos_token_id",
        "    bos = [tokenizer.bos_token_id] if adds_bos else []",
        "    context = tokenizer(prompt, add_special_tokens=False)['input_ids']",
    ]


def _generate_code(info: dict, max_new_tokens: int | None, own_cache: bool) -> list[str]:
    """A decoder's answer to one example, generated as ftbench generates it (``generate_answers``): by
    ``generate()``, or, for a prompt-learning adapter (``num_virtual_tokens``), on the cache its own forward fills
    (``harness/tasks/decoding.py``)."""
    decode = [
        "    with torch.no_grad():",
        "        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,",
        f"                             max_new_tokens={max_new_tokens}, pad_token_id=tokenizer.pad_token_id,",
        "                             eos_token_id=tokenizer.eos_token_id)",
    ]
    if own_cache:  # peft's generate() mishandles its virtual tokens' cache (harness/tasks/decoding.py)
        decode = [
            "    with torch.no_grad():  # the prompt through the adapter, then a token at a time on its cache",
            "        out = model(input_ids=ids, use_cache=True)",
            "        kw = 'cache' if getattr(out, 'cache', None) is not None else 'past_key_values'",
            "        mask, new = torch.ones(1, getattr(out, kw).get_seq_length(), dtype=torch.long), []",
            f"        for _ in range({max_new_tokens}):",
            "            new.append(out.logits[:, -1:].argmax(-1))",
            f"            if new[-1].item() == tokenizer.eos_token_id or len(new) == {max_new_tokens}:",
            "                break",
            "            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)",
            "            at = mask.sum(-1, keepdim=True) - 1  # the new token's position",
            "            out = model.get_base_model()(input_ids=new[-1], attention_mask=mask, position_ids=at,",
            "                                         use_cache=True, **{kw: getattr(out, kw)})",
            "    out = torch.cat([ids, *new], 1)",
        ]
    return [
        "import torch",
        "",
        "def answer(text, text_pair=''):",
        *_context_code(info),
        "    ids = torch.tensor([bos + context])",
        *decode,
        "    new = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)",
        "    return new.strip().split('\\n')[0]  # the first line",
    ]


def _prompt_code(info: dict) -> list[str]:
    """A decoder's prediction for one example, as ftbench scores it (``harness/tasks/prompting.py``: the prompt's
    trailing whitespace moves to each continuation, BOS where the tokenizer adds one, no cutting)."""
    words = info.get("label_words")
    choices = f"choices or {words!r}" if words else "[' ' + c for c in choices]"
    return [
        "import torch",
        "",
        "def predict(text, text_pair='', choices=None):",
        *_context_code(info),
        "    scores = []",
        f"    for word in {choices}:",
        "        ids = bos + tokenizer(prompt + space + word, add_special_tokens=False)['input_ids']",
        "        n = len(ids) - len(bos) - len(context)  # the continuation's tokens",
        "        with torch.no_grad():",
        "            logp = model(torch.tensor([ids])).logits[0, -n - 1 : -1].float().log_softmax(-1)",
        "        scores.append(logp.gather(-1, torch.tensor(ids[-n:])[:, None]).sum())",
        "    return int(torch.stack(scores).argmax())  # the label's (choice's) index",
    ]


def render_card(record: RunRecord, e: ExportRecord) -> str:
    """The card of one export of ``record``, as Markdown."""
    cfg, folder = record.config, Path(e.path)
    env = record.environment
    t = cfg.get("train", {})
    method = record.method + ("" if record.variant == "default" else f" ({record.variant})")
    title = f"# {record.model} · {record.task} · {method} · seed {record.seed} — `{e.kind}`"
    size = fmt_bytes(e.bytes_on_disk)
    bits = f", {e.bits_per_weight_on_disk:.2f} bits per weight" if e.bits_per_weight_on_disk else ""
    fmt = f", {e.format}" if e.format else ""
    budget = f"{t.get('steps')} steps × batch {t.get('batch_size')} × {t.get('grad_accum', 1)} accumulated"
    hw = describe(env)  # the GPU where it ran on one, else the CPU with its family and model
    versions = env.get("versions", {})
    dtype = record.resolved_dtypes.get("train.dtype", {}).get("value") or t.get("dtype")
    lines = [
        _front_matter(record, folder),
        title,
        "",
        f"{MARK} {versions.get('ftbench', '?')} (suite `{record.suite}`, cell `{record.cell_id}`), "
        f"{record.started_at[:10]}, on {hw}, torch {versions.get('torch', '?')}. The run's full record: "
        f"`records/{record.cell_id}.json` in the suite's results folder.",
        "",
        "| | |",
        "|---|---|",
        f"| this folder | `{e.kind}`{fmt}: {size} on disk{bits} |",
        f"| base model | `{record.model}` ({record.model_info.get('architecture', '?')}, "
        f"{record.model_info.get('source', '?')}) |",
        f"| task | `{record.task}` ({record.task_info.get('kind', '?')}) |",
        f"| method | `{record.method}` {_settings(cfg.get('method_config') or {})} |",
        f"| training | {budget}, lr {t.get('lr')}, max_seq_len {t.get('max_seq_len')}, dtype {dtype}, "
        f"seed {record.seed}{_selected(record)} |",
        "",
        f"## Accuracy on the test split ({_examples(record)} examples; 95% Wilson interval)",
        "",
        "| the model | accuracy |",
        "|---|---|",
        f"| untrained | {_score(record.eval_before)} |",
        f"| as trained | {_score(record.eval_after)} |",
        f"| this folder, as served | {_served(e)} |",
        "",
        "One seed: the interval is over test examples, not over training runs. To compare methods, read the "
        "suite's report (`ftbench report`), which tests differences for noise." + _scored_in(dtype),
        "",
        *_deployments(record, e),
        "## Loading it",
        "",
        *_loading(record, e),
        *_notes(e),
        "",
        "## Its inputs",
        "",
        *_inputs(record, folder),
        "",
    ]
    return "\n".join(lines)


def _deployments(record: RunRecord, e: ExportRecord) -> list[str]:
    """Each deployable form as measured on the run's machine: load time, latency (median, quartiles), accuracy."""
    rows = []
    for d in e.deployments:
        if d.skipped or d.error:
            rows.append(f"| {d.name} | {d.dtype} | {d.skipped or d.error} | | | |")
            continue
        load = f"{d.load_time_s:.2f} s" if d.load_time_s is not None else "— (in memory)"
        lat = "; ".join(
            f"{k}: {v['median_s'] * 1e3:.1f} ms [{v['q1_s'] * 1e3:.1f}, {v['q3_s'] * 1e3:.1f}]"
            for k, v in (d.latency or {}).items()
            if isinstance(v, dict) and "median_s" in v
        )
        versus = form_vs_trained(record, d) or "—"
        rows.append(f"| {d.name} | {d.dtype} | {load} | {lat or '—'} | {_score(d.eval)} | {versus} |")
    if not rows:
        return []
    head = ["## Deployed, as measured on the run's machine (median [quartiles] of the timed repeats)", ""]
    head += [
        "Vs as trained: the right answers a form loses and gains against the model as trained (scored in the run's "
        "dtype) on the same test examples, and whether that is beyond noise (McNemar exact).",
        "",
        "| form | dtype | load | latency | accuracy | vs as trained |",
        "|---|---|---|---|---|---|",
    ]
    return [*head, *rows, ""]


def _scored_in(dtype: str | None) -> str:
    """Where the run scored under autocast: the float32 code below may read a near tie the other way."""
    if dtype in (None, "float32"):
        return ""
    return (
        f" These scores ran under {dtype} autocast; the code below runs float32, where a prediction near a tie "
        "may come out the other way."
    )


def _selected(record: RunRecord) -> str:
    """Which weights the folder holds where that is not simply the last step's, and how its settings were chosen."""
    out = ""
    if record.selected_by and record.selected_by != "last" and record.selected_step is not None:
        out += f"; the weights of step {record.selected_step}, best by {record.selected_by} on the validation split"
    if record.config.get("tuning"):
        out += "; its hyperparameters tuned on the validation split (`ftbench tune`)"
    return out


def _settings(config: dict) -> str:
    """The method's settings as the record keeps them, less the empty ones."""
    kept = {k: v for k, v in config.items() if v not in (None, {}, [])}
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in kept.items())


def _examples(record: RunRecord) -> str:
    m = record.eval_after or record.eval_before
    return f"{m.examples:,}" if m else "no"


def _served(e: ExportRecord) -> str:
    if e.eval is None:  # an adapter: scored where a form loaded this folder from disk in float32, as shown below
        d = next((d for d in e.deployments if d.load_time_s is not None and d.dtype == "float32" and d.eval), None)
        return f"{_score(d.eval)} (deployed as `{d.name}`, below)" if d else "not scored by ftbench as served"
    flips = e.predictions_differing
    differ = f"; {flips:.1%} of predictions differ from the trained model's" if flips is not None else ""
    return _score(e.eval) + differ
