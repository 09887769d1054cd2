"""Uncertainty for every published figure: intervals over test examples and seeds, and paired tests.

- A run's accuracy gets a 95% Wilson score interval over its test examples (Wilson, 1927; better behaved than
  the normal interval near 0 and 1 and for small test sets).
- A configuration run with several seeds gets mean ± sample std over seeds, and a 95% interval over test
  examples: Wilson's, at the effective number of examples (Kish, 1965) that the seeds' per-example agreement
  gives (:func:`wilson_over_seeds`). Unlike a percentile bootstrap it does not collapse to a point where every
  seed got every example right.
- "A is more accurate than B" is decided on the *same* test examples: McNemar's exact test (McNemar, 1947) for
  one seed each, a paired bootstrap over examples otherwise; Holm's correction over the pairs compared in one
  (model, task). With two or more seeds each, the seed-to-seed difference must also exceed twice its standard
  error. Either test failing (or the per-example answers missing) means "within noise": never shown as a win.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.stats import t as student_t
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from harness.records import RunRecord, measured_step_times_s

ALPHA = 0.05
BOOTSTRAP = 2000  # resamples; a fixed generator seed makes every report reproducible


def wilson(accuracy: float, n: int) -> tuple[float, float]:
    """95% Wilson interval of an accuracy over ``n`` test examples."""
    lo, hi = proportion_confint(round(accuracy * n), n, alpha=ALPHA, method="wilson")
    return float(lo), float(hi)


def wilson_over_seeds(per_example: np.ndarray, seeds: int) -> tuple[float, float]:
    """95% interval of a mean accuracy over test examples, each example's correctness averaged over ``seeds``
    seeds. Its sampling variance over examples is var(per-example means) / n, at most a single seed's p(1 − p) / n
    (seeds that agree on each example are one seed). The design effect d = var / (p(1 − p)), kept within
    [1/seeds, 1], gives the effective number of examples n / d, and Wilson's score interval is taken there. In the
    interior it matches a bootstrap over examples within a few thousandths; at p = 0 or 1 (d undefined, taken as
    1) it is Wilson's over the n examples rather than a point."""
    n, p = len(per_example), float(per_example.mean())
    binary = p * (1 - p)
    design = 1.0 if binary == 0 else min(1.0, max(float(per_example.var()) / binary, 1 / seeds))
    n_eff, z = n / design, NormalDist().inv_cdf(1 - ALPHA / 2)
    centre = (p + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * math.sqrt(binary / n_eff + z * z / (4 * n_eff * n_eff))
    return max(0.0, centre - half), min(1.0, centre + half)


def answer_bits(correct: str | None) -> np.ndarray | None:
    """An evaluation's ``correct`` string ("0110…", one character per test example) as 0/1 integers."""
    return None if not correct else np.frombuffer(correct.encode(), dtype=np.uint8) - ord("0")


def _correct(r: RunRecord, which: str = "eval_after") -> np.ndarray | None:
    ev = getattr(r, which)
    return answer_bits(ev.correct if ev else None)


def _per_example(runs: list[RunRecord], which: str = "eval_after") -> np.ndarray | None:
    """Each test example's correctness averaged over seeds; None unless every run kept its answers on the same
    test examples (same count; the test split is a function of the task config, equal within a group)."""
    rows = [_correct(r, which) for r in runs]
    if not rows or any(x is None for x in rows) or len({len(x) for x in rows}) != 1:
        return None
    return np.mean(rows, axis=0)


@dataclass
class Summary:
    """One configuration (model, task, method, variant) over its seeds."""

    runs: list[RunRecord]
    mean: float
    std: float  # sample std over seeds; 0 with one seed
    seeds: int
    examples: int
    ci: tuple[float, float]  # 95% over test examples

    @property
    def label(self) -> str:
        spread = f" ± {self.std:.3f} ({self.seeds} seeds)" if self.seeds > 1 else " (1 seed)"
        return f"{self.mean:.3f}{spread} [{self.ci[0]:.3f}, {self.ci[1]:.3f}]"


def bootstrap_means(v: np.ndarray) -> np.ndarray:
    """BOOTSTRAP means of ``v`` resampled over its entries (a fixed seed: the same figures every time)."""
    rng = np.random.default_rng(0)
    return v[rng.integers(0, len(v), size=(BOOTSTRAP, len(v)))].mean(axis=1)


def boot_means(mats: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """BOOTSTRAP × len(mats) bootstrap means of each seeds × examples matrix (the same test examples in all). One
    resample of the examples is shared by every matrix (paired), and so is the resample of the seeds among
    matrices with the same number of seeds (seed s: the same batches, the same head initialisation)."""
    rng = np.random.default_rng(seed)
    n = mats[0].shape[1]
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    seeds = {k: rng.integers(0, k, size=(BOOTSTRAP, k)) for k in sorted({m.shape[0] for m in mats})}
    return np.array([[m[seeds[m.shape[0]][i]].mean(0)[idx[i]].mean() for m in mats] for i in range(BOOTSTRAP)])


def summarize(runs: list[RunRecord]) -> Summary:
    """A configuration's accuracy over its seeds, with a 95% interval over test examples."""
    acc = [r.eval_after.accuracy for r in runs]
    n = runs[0].eval_after.examples
    mean = statistics.fmean(acc)
    per = _per_example(runs) if len(runs) > 1 else None
    if per is not None:
        ci = wilson_over_seeds(per, len(runs))
    else:
        ci = wilson(mean, n)
    return Summary(runs, mean, statistics.stdev(acc) if len(acc) > 1 else 0.0, len(runs), n, ci)


@dataclass
class Paired:
    """A against B on the same test examples."""

    diff: float  # mean accuracy of A minus B
    p: float | None  # example-level p-value (Holm-adjusted when part of a family); None when not testable
    test: str
    seed_se: float | None  # std error of the difference over seeds; None below two seeds each
    significant: bool
    why: str  # one sentence: the evidence, or what is missing

    @property
    def verdict(self) -> str:
        return "beyond noise" if self.significant else self.noise

    @property
    def noise(self) -> str:
        """Which noise a difference that is not a win lies within: "within seed noise" where the test over the
        examples passed (p below ALPHA) but the seeds disagree (the difference is under twice its standard error
        over seeds), so that a small p beside "within noise" does not read as a contradiction."""
        seeds_only = self.p is not None and self.p < ALPHA and self.diff != 0 and self.seed_se is not None
        return "within seed noise" if seeds_only and not self.significant else "within noise"


def paired(a: Summary, b: Summary) -> Paired:
    """The example-level test (unadjusted) and the seed-level check of A vs B."""
    diff = a.mean - b.mean
    pa, pb = _per_example(a.runs), _per_example(b.runs)
    if pa is None or pb is None or len(pa) != len(pb):
        return Paired(diff, None, "none", None, False, "no per-example answers on a shared test set to pair")
    p, test = example_test(pa, pb, a.seeds == 1 and b.seeds == 1)
    seed_se = None
    if a.seeds > 1 and b.seeds > 1:
        seed_se = (a.std**2 / a.seeds + b.std**2 / b.seeds) ** 0.5
    return _decide(Paired(diff, p, test, seed_se, False, ""))


def example_test(pa: np.ndarray, pb: np.ndarray, one_seed_each: bool) -> tuple[float, str]:
    """Two-sided p that two answer vectors on the same test examples differ, and the test's name: McNemar exact
    for one seed each (0/1 per example), else a paired bootstrap over the examples of the per-seed means."""
    if one_seed_each:
        only_a, only_b = int(((pa == 1) & (pb == 0)).sum()), int(((pa == 0) & (pb == 1)).sum())
        p = float(mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue) if only_a + only_b else 1.0
        return p, f"McNemar exact ({only_a} vs {only_b} discordant of {len(pa)})"
    d = pa - pb
    boot = bootstrap_means(d)
    # a Monte Carlo p-value counts the observed sample among the resamples (Davison & Hinkley, 1997, eq. 4.11):
    # never 0 from a finite bootstrap; at least 2 / (BOOTSTRAP + 1) two-sided
    tail = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    p = float(min(1.0, 2 * (1 + tail) / (BOOTSTRAP + 1)))
    return p, f"paired bootstrap over {len(d)} examples"


@dataclass
class AnswersVs:
    """One model's answers against a reference's (a deployed form against the trained model; a method's untrained
    start against the base model's): right answers lost and gained (summed over seeds), the paired test's p, and
    over how many examples (``n``: "400", or "3 × 400" for seeds)."""

    lost: int
    gained: int
    p: float
    n: str

    @property
    def loses_beyond_noise(self) -> bool:
        return self.lost > self.gained and self.p < 0.05

    def __str__(self) -> str:
        if not self.lost and not self.gained:
            return "the same answers"
        verdict = "beyond" if self.p < 0.05 else "within"
        return f"{self.lost} lost, {self.gained} gained of {self.n} (p = {self.p:.2g}, {verdict} noise)"


def answers_versus(trained: list[str | None], served: list[str | None]) -> AnswersVs | None:
    """``served``'s answers against ``trained``'s on the same test examples (a deployed form against the trained
    model as scored after training, in the run's dtype; or any reference), one pair of ``correct`` strings per
    seed, tested as two configurations are (:func:`example_test`). None where a seed lacks either."""
    pairs = [(t, c) for t, c in zip(trained, served, strict=True) if t and c]
    if not pairs or len(pairs) != len(served) or len({len(x) for pair in pairs for x in pair}) != 1:
        return None
    lost = sum(int(((answer_bits(t) == 1) & (answer_bits(c) == 0)).sum()) for t, c in pairs)
    gained = sum(int(((answer_bits(t) == 0) & (answer_bits(c) == 1)).sum()) for t, c in pairs)
    n = f"{len(pairs)} × {len(pairs[0][0])}" if len(pairs) > 1 else str(len(pairs[0][0]))
    if not lost and not gained:
        return AnswersVs(0, 0, 1.0, n)
    before, after = (np.mean([answer_bits(pair[i]) for pair in pairs], axis=0) for i in (0, 1))
    return AnswersVs(lost, gained, example_test(before, after, len(pairs) == 1)[0], n)


def answers_vs(trained: list[str | None], served: list[str | None]) -> str:
    """:func:`answers_versus` as the tables print it ("—" where a seed lacks either)."""
    return str(versus) if (versus := answers_versus(trained, served)) else "—"


def form_vs_trained(r: RunRecord, d) -> AnswersVs | None:
    """One run's deployed form (a ``DeploymentRecord``) against that run's trained model."""
    return answers_versus([r.eval_after.correct if r.eval_after else None], [d.eval.correct if d.eval else None])


def gain(runs: list[RunRecord]) -> Paired:
    """After training against before, on the same test examples: is training's gain beyond noise? With two or
    more seeds, the per-seed gains must also exceed twice their standard error."""
    after, before = _per_example(runs), _per_example(runs, "eval_before")
    diffs = [r.eval_after.accuracy - r.eval_before.accuracy for r in runs if r.eval_before and r.eval_after]
    diff = statistics.fmean(diffs) if diffs else 0.0
    if after is None or before is None or len(after) != len(before):
        return Paired(diff, None, "none", None, False, "no per-example answers before and after to pair")
    p, test = example_test(after, before, len(runs) == 1)
    seed_se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return _decide(Paired(diff, p, test, seed_se, False, ""))


def _decide(c: Paired) -> Paired:
    if c.p is None:
        return c
    seeds_ok = c.seed_se is None or abs(c.diff) > 2 * c.seed_se
    c.significant = c.p < ALPHA and seeds_ok and c.diff != 0
    seed_part = (
        "seed noise not measured (1 seed)"
        if c.seed_se is None
        else f"2 × seed standard error {2 * c.seed_se:.3f}" + ("" if seeds_ok else " not exceeded")
    )
    c.why = f"{c.test}: p = {c.p:.3g}; {seed_part}"
    return c


def holm(pvals: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm, 1979), in the order given: the i-th smallest of m p-values is
    multiplied by m − i + 1, then made monotone from the smallest up and capped at 1. (statsmodels'
    ``multipletests(method="holm")`` gives the same, but runs a full garbage collection at each call: 0.2 s with
    torch loaded, four times in every summary.)"""
    m = len(pvals)
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvals[i])):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        out[i] = running
    return out


def family(pairs: dict[tuple[str, str], Paired]) -> dict[tuple[str, str], Paired]:
    """Holm's correction over the pairs compared within one (model, task), then the verdicts again."""
    tested = [k for k, c in pairs.items() if c.p is not None]
    if len(tested) > 1:
        adjusted = holm([pairs[k].p for k in tested])
        for k, p in zip(tested, adjusted, strict=True):
            pairs[k].p = float(p)
            pairs[k].test += ", Holm-adjusted"
            _decide(pairs[k])
    return pairs


def compare_all(summaries: dict[str, Summary]) -> dict[tuple[str, str], Paired]:
    """Every pair of configurations of one (model, task), named by their labels, Holm-adjusted together."""
    names = list(summaries)
    return family({(x, y): paired(summaries[x], summaries[y]) for i, x in enumerate(names) for y in names[i + 1 :]})


# Step time. Steps within one run are not independent samples of a configuration's speed: two runs of the same
# cell on a shared machine differ by 5-35% (measured here) while a test over their steps calls p < 1e-9. The
# unit is the run: each run's median step time, compared on a log scale against the run-to-run spread that
# the set itself shows (runs of one configuration with different seeds), pooled over configurations.
def under_load(r: RunRecord) -> bool:
    """Other processes took more than half a core while this run trained, or other cells ran beside it
    (``--jobs``): harness/measure/runstats.py::Contention."""
    return bool((r.contention or {}).get("loaded"))


def hardware_of(r: RunRecord) -> str:
    """One record's hardware identity as one short string (older records may lack the newer fields)."""
    from harness.environment import cpu_name, outside_settings

    e = r.environment
    bf16 = {True: "native bf16", False: "bf16 not native"}.get(e.get("native_bf16"), "bf16 unknown")
    gpu = f"{e['gpu']} · " if e.get("gpu") else ""
    caps = "".join(f" · {x}" for x in outside_settings(e))
    isa = e.get("cpu_isa") or "ISA unknown"
    return f"{gpu}{cpu_name(e)} · {isa}{caps} · {bf16} · {e.get('torch_threads')} threads"


def load_note(r: RunRecord) -> str:
    """Why a run's timings are flagged, in a few words ('' when they are not)."""
    c = r.contention or {}
    if not c.get("loaded"):
        return ""
    if c.get("concurrent_cells", 1) > 1:
        return f"⚠ under load ({c['concurrent_cells']} cells side by side, --jobs)"
    return f"⚠ under load ({c.get('other_processes_cores', 0):.1f} other cores)"


def run_median_s(r: RunRecord) -> float | None:
    """A run's median measured step time, in seconds."""
    xs = measured_step_times_s(r)
    return statistics.median(xs) if xs else None


def run_to_run_sigma(groups: list[list[RunRecord]]) -> tuple[float | None, int]:
    """Pooled std of log(run median step time) within groups of repeated runs, and its degrees of freedom."""
    ss, dof = 0.0, 0
    for runs in groups:
        runs = [r for r in runs if not under_load(r)]
        logs = [np.log(m) for m in map(run_median_s, runs) if m]
        if len(logs) > 1:
            ss += float(np.var(logs, ddof=1)) * (len(logs) - 1)
            dof += len(logs) - 1
    return ((ss / dof) ** 0.5, dof) if dof else (None, 0)


@dataclass(frozen=True)
class StepTimeVerdict:
    """Whether two sets of runs differ in step time beyond run-to-run noise, the evidence in words, and — when
    the question could not be asked — why not, as a code that callers branch on (never the words)."""

    significant: bool
    why: str
    unjudged: str | None = None  # "no steps" | "under load" | "machines" | "no noise"; None: judged


def step_time_verdict(a: list[RunRecord], b: list[RunRecord], sigma: float | None, dof: int) -> StepTimeVerdict:
    """Is A's step time different from B's beyond run-to-run noise?"""
    la = [np.log(m) for m in map(run_median_s, a) if m]
    lb = [np.log(m) for m in map(run_median_s, b) if m]
    if not la or not lb:
        return StepTimeVerdict(False, "no measured steps", "no steps")
    if any(map(under_load, a + b)):
        why = "measured under load (other processes took CPU while it trained): not judged"
        return StepTimeVerdict(False, why, "under load")
    if len({hardware_of(r) for r in a + b}) > 1:  # a results dir resumed on another machine
        why = "measured on different machines: not judged"
        return StepTimeVerdict(False, why, "machines")
    if sigma is None:
        why = "run-to-run noise not measured (one run per configuration): add seeds to judge step time"
        return StepTimeVerdict(False, why, "no noise")
    diff = float(np.mean(la) - np.mean(lb))
    se = sigma * (1 / len(la) + 1 / len(lb)) ** 0.5
    # Student's t at the pooled degrees of freedom: sigma comes from a few repeats, and 2 standard errors
    # (the normal's 1.96) called 2 of 16 same-code comparisons on this 2-core VM a change, at 4 degrees of freedom
    t = float(student_t.ppf(1 - ALPHA / 2, dof))
    ratio = float(np.exp(diff))
    return StepTimeVerdict(
        abs(diff) > t * se,
        f"×{ratio:.2f} vs a run-to-run spread of ±{(np.exp(t * se) - 1) * 100:.0f}% ({t:.2f} standard errors, "
        f"Student's t over {dof} repeat(s))",
    )
