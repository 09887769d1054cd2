from harness.config import TaskSpec
from harness.tasks import load_task


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
