import pytest

from harness.schema import ConfigError, TaskSpec
from harness.tasks.builtin import load_task


def test_rotten_tomatoes_counts_labels_and_group_split():
    data = load_task(TaskSpec(name="rotten_tomatoes"))
    info = data.info()
    sizes = info["split_sizes"]
    assert sum(sizes.values()) == 12_808  # the labelled rows; the 1,097 `plot` rows are excluded
    assert data.labels == ["rotten", "fresh"]
    assert {x.label for x in data.train} == {0, 1}
    assert 0.75 < sizes["train"] / 12_808 < 0.85 and sizes["test"] > 1000
    # split by movie: no movie's snippets straddle train and test
    assert not {x.group for x in data.train} & {x.group for x in data.test}


def test_splits_are_deterministic_and_seeded():
    a = load_task(TaskSpec(name="rotten_tomatoes")).info()["examples_sha256"]
    b = load_task(TaskSpec(name="rotten_tomatoes")).info()["examples_sha256"]
    c = load_task(TaskSpec(name="rotten_tomatoes", split_seed=1)).info()["examples_sha256"]
    assert a == b and a != c


def test_subsampling_takes_prefix():
    full = load_task(TaskSpec(name="rotten_tomatoes"))
    small = load_task(TaskSpec(name="rotten_tomatoes", train_examples=100, eval_examples=50))
    assert small.train == full.train[:100] and small.test == full.test[:50]


def test_bbc_news_counts_and_labels():
    data = load_task(TaskSpec(name="bbc_news"))
    sizes = data.info()["split_sizes"]
    assert sum(sizes.values()) == 2225
    assert data.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert {x.label for x in data.train} == set(range(5))


def test_boolq_pairs():
    data = load_task(TaskSpec(name="boolq"))
    assert sum(data.info()["split_sizes"].values()) == 12_697
    assert data.labels == ["false", "true"] and all(x.text_pair for x in data.train[:50])
    assert not {x.group for x in data.train} & {x.group for x in data.test}  # a passage stays in one split


@pytest.mark.parametrize(
    "name,rows,choices",
    [("piqa", 1500, {2}), ("openbookqa", 500, {4}), ("commonsense_qa", 1221, {3, 5})],
)
def test_multiple_choice_counts_and_answers(name, rows, choices):
    data = load_task(TaskSpec(name=name))
    xs = data.train + data.validation + data.test
    assert data.kind == "multiple_choice" and len(xs) == rows
    assert {len(x.choices) for x in xs} == choices
    assert all(0 <= x.label < len(x.choices) and all(c and c[:3] not in ("A. ", "B. ") for c in x.choices) for x in xs)
    assert {x.label for x in xs} == set(range(max(choices)))  # every position holds right answers


def test_openbookqa_answer_letter_picks_the_right_choice():
    x = next(
        x
        for x in load_task(TaskSpec(name="openbookqa")).train + load_task(TaskSpec(name="openbookqa")).test
        if x.text.startswith("There is most likely going to be fog around")
    )
    assert x.choices[x.label] == "a marsh"


def test_asdiv_counts_and_answers():
    data = load_task(TaskSpec(name="asdiv"))
    xs = data.train + data.validation + data.test
    assert data.kind == "generation" and len(xs) == 2305
    assert all(x.answer and x.text_pair for x in xs)
    numeric = sum(x.answer.split(" ")[0].replace(",", "").replace(".", "", 1).isdigit() for x in xs)
    assert numeric > 2150  # "9 apples"; the rest are names, ratios, yes/no


def test_prompt_and_label_words_can_be_overridden():
    data = load_task(TaskSpec(name="rotten_tomatoes", prompt="{text} Overall:", label_words=[" bad", " good"]))
    assert data.prompt == "{text} Overall:" and data.label_words == [" bad", " good"]
    with pytest.raises(ConfigError, match="one word per label"):
        load_task(TaskSpec(name="rotten_tomatoes", label_words=[" bad"]))


def test_pairs_are_encoded_as_sentence_pairs():
    from harness.cell.models import load_model
    from harness.tasks.classifier import encode

    tok = load_model("tiny-bert", 2, 0).tokenizer
    data = load_task(TaskSpec(name="boolq", train_examples=4))
    enc = encode(data.train, tok, 64)
    sep = tok.sep_token_id
    assert all(e["input_ids"].count(sep) == 2 and len(e["input_ids"]) <= 64 for e in enc)
    # segment ids reach the model: 0 up to the first [SEP], 1 after it (BERT was pretrained so), 0 on padding
    from harness.tasks.classifier import collate
    from harness.tasks.data import Example

    for e in enc:
        first = e["input_ids"].index(sep) + 1
        assert e["token_type_ids"] == [0] * first + [1] * (len(e["input_ids"]) - first)
    batch = collate(enc, tok.pad_token_id)
    for i, e in enumerate(enc):
        n = len(e["input_ids"])
        assert batch["token_type_ids"][i, :n].tolist() == e["token_type_ids"]
        assert not batch["token_type_ids"][i, n:].any()
    single = encode([Example("a single text", 0)], tok, 64)
    assert "token_type_ids" not in single[0] and "token_type_ids" not in collate(single, tok.pad_token_id)


def test_local_csv_and_jsonl_with_column_mapping(tmp_path):
    import csv as csvmod
    import json

    rows = [{"review": f"text {i}", "stars": "good" if i % 3 else "bad", "shop": f"s{i % 7}"} for i in range(200)]
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        w = csvmod.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cols = {"text": "review", "label": "stars", "group": "shop"}
    a = load_task(TaskSpec(name="csv", path=str(tmp_path / "d.csv"), columns=cols))
    b = load_task(TaskSpec(name="jsonl", path=str(tmp_path / "d.jsonl"), columns=cols))
    assert a.labels == b.labels == ["bad", "good"]
    assert a.info()["examples_sha256"] == b.info()["examples_sha256"]
    assert sum(a.info()["split_sizes"].values()) == 200
    assert not {x.group for x in a.train} & {x.group for x in a.test}


def test_unknown_column_is_a_clear_error(tmp_path):
    import pytest

    from harness.schema import ConfigError

    (tmp_path / "d.jsonl").write_text('{"t": "x", "y": 1}\n')
    with pytest.raises(ConfigError, match="no column 'text'; columns are t, y"):
        load_task(TaskSpec(name="jsonl", path=str(tmp_path / "d.jsonl"), columns={"text": "text", "label": "y"}))


def test_bbc_news_trains_a_five_way_head(tmp_path):
    from harness.cell.run import run_cell
    from tests.conftest import cells

    cfg = cells(tasks=[{"name": "bbc_news", "train_examples": 64, "eval_examples": 32}])[0]
    rec = run_cell(cfg.model_copy(update={"export": False}), tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.task_info["labels"][0] == "business" and rec.eval_after.examples == 32


@pytest.mark.parametrize("name", sorted(__import__("harness.tasks.builtin", fromlist=["TASKS"]).TASKS))
def test_no_test_or_validation_input_is_also_a_training_input(name):
    """Copies (BBC News has verbatim duplicate articles under other file names) share a split with their
    original: no test or validation input equals a training input, whitespace and case aside."""
    from harness.tasks.data import content_key

    data = load_task(TaskSpec(name=name))
    train = {content_key(x) for x in data.train}
    assert not [x for x in data.test + data.validation if content_key(x) in train]
    if name in ("rotten_tomatoes", "boolq"):  # and groups (movie, passage) still never straddle splits
        assert not {x.group for x in data.train} & {x.group for x in data.test}


def test_group_split_joins_groups_that_share_content():
    from harness.tasks.data import Example, group_split

    rows = [Example(f"text {i}", 0, f"g{i}") for i in range(200)] + [Example("TEXT  7", 1, "copy")]
    for seed in range(5):
        splits = group_split(rows, seed)
        where = {x.group: i for i, s in enumerate(splits) for x in s}
        assert where["copy"] == where["g7"]


# --- the parsed-task store (harness/tasks/parsed.py) ---------------------------------------------------------------


def _counting_loader(path, calls):
    """A task loader over one CSV-ish file of ``text,label`` lines, counting how often it really parses."""
    from harness.tasks.data import TaskData, group_split

    def loader(seed: int) -> TaskData:
        calls.append(seed)
        rows = [(t, int(lbl), t) for t, lbl in (line.split(",") for line in path.read_text().splitlines())]
        train, val, test = group_split(rows, seed)
        return TaskData("counted", ["a", "b"], train, val, test, source=str(path), label_words=[" a", " b"])

    return loader


def test_a_stored_task_is_the_parsed_one_and_is_parsed_again_when_its_source_changes(tmp_path, monkeypatch):
    import os

    from harness.tasks.parsed import load_parsed

    monkeypatch.setenv("FTBENCH_CACHE_DIR", str(tmp_path / "cache"))
    src, calls = tmp_path / "data.csv", []
    src.write_text("\n".join(f"text {i},{i % 2}" for i in range(40)))
    loader = _counting_loader(src, calls)
    first = load_parsed("counted", 3, loader)
    again = load_parsed("counted", 3, loader)
    assert calls == [3] and again == first  # every field and example, from the stored copy
    assert load_parsed("counted", 4, loader).info()["examples_sha256"] != first.info()["examples_sha256"]
    assert calls == [3, 4]  # another split seed is another stored task

    src.write_text("\n".join(f"text {i},{(i + 1) % 2}" for i in range(40)))  # same size, new labels
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    changed = load_parsed("counted", 3, loader)
    assert calls == [3, 4, 3] and changed != first and {x.label for x in changed.train} == {0, 1}

    for stored in (tmp_path / "cache" / "tasks").glob("counted-3-*.json"):
        stored.write_text('{"signature": [')  # a torn or foreign file: parsed afresh, not an error
    assert load_parsed("counted", 3, loader) == changed and calls == [3, 4, 3, 3]


def test_a_task_whose_source_is_no_file_is_never_stored(tmp_path, monkeypatch):
    from harness.tasks.parsed import load_parsed
    from harness.tasks.synthetic import synthetic

    monkeypatch.setenv("FTBENCH_CACHE_DIR", str(tmp_path / "cache"))
    a, b = load_parsed("synthetic", 0, synthetic), load_parsed("synthetic", 0, synthetic)
    assert a.info() == b.info() and not (tmp_path / "cache" / "tasks").exists()


def test_rotten_tomatoes_from_the_store_equals_a_fresh_parse(tmp_path, monkeypatch):
    from harness.tasks.builtin import rotten_tomatoes

    monkeypatch.setenv("FTBENCH_CACHE_DIR", str(tmp_path / "cache"))
    fresh = rotten_tomatoes(0)
    load_task(TaskSpec(name="rotten_tomatoes"))  # parses and stores
    stored = load_task(TaskSpec(name="rotten_tomatoes"))
    assert len(list((tmp_path / "cache" / "tasks").glob("rotten_tomatoes-0-*.json"))) == 1
    assert stored == fresh and stored.info() == fresh.info()


def test_evaluation_batches_by_length_waste_little_padding():
    """Every example once, shortest first, at most batch_size to a batch; a batch closes early where padding to
    the next length would make over a fifth of it padding (once it holds 512 tokens), as with 64 prompts of 5 to
    57 tokens that one batch of 64 would pad to nearly twice their length."""
    from harness.tasks.classifier import EVAL_MIN_BATCH_TOKENS, EVAL_PAD_SHARE, eval_batches

    lengths = [5 + (i * 37) % 53 for i in range(64)]  # 5 to 57, shuffled
    batches = eval_batches(lengths, 64)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(64)) and [lengths[i] for i in flat] == sorted(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert 64 * max(lengths) > 1.8 * sum(lengths)  # one batch of 64: nearly half padding
    assert len(batches) > 1 and padded < 1.3 * sum(lengths)
    for b in batches[:-1]:  # each closed early: padding the next example in would have wasted too much
        nxt = lengths[flat[flat.index(b[-1]) + 1]]
        with_next = (len(b) + 1) * nxt
        assert len(b) * lengths[b[-1]] >= EVAL_MIN_BATCH_TOKENS
        assert with_next - sum(lengths[i] for i in b) - nxt > EVAL_PAD_SHARE * with_next
    assert [len(b) for b in eval_batches([10] * 100, 32)] == [32, 32, 32, 4]  # equal lengths: full batches
    assert eval_batches([], 8) == []


def test_a_tokenized_split_is_stored_once_and_read_back_equal(tmp_path, monkeypatch):
    """The cells of a suite tokenize a large split once (harness/tasks/encoded.py): the stored ids equal a fresh
    encoding, pairs' segment ids included; another length limit, tokenizer or example is another file."""
    from harness.cell.models import load_model
    from harness.tasks.classifier import encode
    from harness.tasks.encoded import MIN_EXAMPLES, cached_encode

    monkeypatch.setenv("FTBENCH_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def counted(examples, tokenizer, max_len):
        calls.append(max_len)
        return encode(examples, tokenizer, max_len)

    tok = load_model("tiny-bert", 2, 0).tokenizer
    rt = load_task(TaskSpec(name="rotten_tomatoes", train_examples=MIN_EXAMPLES)).train
    pairs = load_task(TaskSpec(name="boolq", train_examples=MIN_EXAMPLES)).train
    for examples in (rt, pairs):
        first = cached_encode(counted, examples, tok, 32)
        assert first == encode(examples, tok, 32) and cached_encode(counted, examples, tok, 32) == first
    assert calls == [32, 32] and "token_type_ids" in first[0]  # each split tokenized once, read back once
    assert len(list((tmp_path / "cache" / "encoded").glob("*.json"))) == 2

    assert cached_encode(counted, rt, tok, 24) == encode(rt, tok, 24) and calls[-1] == 24  # another limit
    edited = [rt[0].__class__(rt[0].text + " not", rt[0].label), *rt[1:]]
    assert cached_encode(counted, edited, tok, 32)[0] == encode(edited[:1], tok, 32)[0] and len(calls) == 4
    other = load_model("smollm2-135m", 2, 0, mode="prompt").tokenizer  # another tokenizer: its own ids
    assert cached_encode(counted, rt, other, 32) == encode(rt, other, 32) and len(calls) == 5
    assert cached_encode(counted, rt[:10], tok, 32) == encode(rt[:10], tok, 32) and len(calls) == 6  # small: not stored
    assert len(list((tmp_path / "cache" / "encoded").glob("*.json"))) == 5


def test_inputs_cut_to_max_seq_len_are_counted_per_example_and_per_split():
    """BBC News at MiniLM's 128 tokens: every test article was read to a third of its median length, and nothing
    said so. Each encoded row counts the tokens truncation removed (pairs too); the split sums them."""
    from harness.cell.models import load_model
    from harness.tasks.classifier import ClassifierIO, encode
    from harness.tasks.data import cut_note

    tok = load_model("tiny-bert", 2, 0).tokenizer
    bbc = load_task(TaskSpec(name="bbc_news", train_examples=8, eval_examples=8))
    whole = [len(ids) for ids in tok([x.text for x in bbc.test])["input_ids"]]
    rows = encode(bbc.test, tok, 64)
    assert [len(r["input_ids"]) + r["cut"] for r in rows] == whole and all(r["cut"] > 0 for r in rows)
    rt = load_task(TaskSpec(name="rotten_tomatoes", train_examples=8, eval_examples=8)).test
    assert [r["cut"] for r in encode(rt, tok, 64)] == [0] * 8  # snippets fit
    pairs = load_task(TaskSpec(name="boolq", train_examples=8, eval_examples=8)).test
    rows = encode(pairs, tok, 64)
    uncut = [len(ids) for ids in tok([x.text for x in pairs], [x.text_pair for x in pairs])["input_ids"]]
    assert [len(r["input_ids"]) + r["cut"] for r in rows] == uncut and any(r["cut"] for r in rows)

    lengths = ClassifierIO(bbc, tok, 64).input_lengths()
    ordered = sorted(whole)
    assert lengths["test"] == {
        "examples": 8,
        "cut": 8,
        "tokens_median_uncut": (ordered[3] + ordered[4]) / 2,
        "tokens_max_uncut": ordered[-1],
    }
    note = cut_note(lengths, 64)
    assert note.startswith("inputs longer than max_seq_len 64 tokens, cut to it: 8 of 8 test (median length ")
    assert ", 8 of 8 train" in note
    few = {"test": {"examples": 200, "cut": 1, "tokens_median_uncut": 20, "tokens_max_uncut": 70}}
    assert cut_note(few, 64) is None and "2 of 200 test" in cut_note({"test": {**few["test"], "cut": 2}}, 64)
