"""Each artifact a method exports, as served: written, reloaded where the method gives a model, scored on the
test split against the trained model ("trained = served"), then deployed (harness/cell/deploy.py).

An export failing, for whatever reason (a merge the base cannot take, a quantizer's error, a form that will not
load), fails that export only: its entry records the error and the run stays ``ok``, since the training and its
evaluation stand. A method that fails before returning any artifact leaves one entry, kind ``export``, with
the error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from harness.contract import Method, error_text
from harness.measure.runstats import parameter_counts
from harness.records import EvalMetrics, ExportRecord

Evaluate = Callable[[torch.nn.Module], tuple[dict, torch.Tensor]]


def prediction_flips(trained: torch.Tensor, served: torch.Tensor) -> float | None:
    """Share of test examples whose prediction (the highest-scoring label or choice) differs between the model
    as trained and as served; None where the scores rank nothing (one column: generation, judged on its text)."""
    if trained.dim() != 2 or trained.shape[-1] < 2 or trained.shape != served.shape:
        return None
    return float((trained.argmax(-1) != served.argmax(-1)).float().mean())


def with_tokenizer(path: Path, tokenizer) -> None:
    """A model folder (``config.json``) gets the run's tokenizer files beside its weights, so that it loads and
    serves on its own (``AutoTokenizer.from_pretrained(path)``, a pipeline); an adapter folder is left as PEFT
    writes it. The export's ``bytes_on_disk`` stays the method's own (the weights): every method's artifact
    carries the same tokenizer."""
    if tokenizer is not None and Path(path).is_dir() and (Path(path) / "config.json").exists():
        tokenizer.save_pretrained(path)


def evaluate_exports(
    method: Method,
    model,
    out_dir: Path,
    evaluate: Evaluate,
    scores,
    progress,
    device,
    deployments,
    known,
    tokenizer=None,
) -> dict:
    """Each artifact the method writes, evaluated where it comes with a model: its accuracy as served, its bits
    per weight on disk, how far its scores are from the trained model's (largest logit difference, share of
    predictions that differ); then, with ``deployments``, what each of its deployable forms costs. A model
    folder gets ``tokenizer``'s files."""
    progress.say("exporting")
    try:
        exports = method.export(model, out_dir)
    except Exception as err:  # noqa: BLE001 - the run's training and evaluation stand; only the export failed
        entry = ExportRecord(kind="export", path=str(out_dir), bytes_on_disk=0, error=error_text(err))
        return {"exports": [entry], "export_bytes": 0}
    out = []
    for e in exports:
        if not e.error:
            with_tokenizer(e.path, tokenizer)
        er = ExportRecord(
            kind=e.kind,
            path=str(e.path),
            bytes_on_disk=e.bytes_on_disk,
            notes=e.notes,
            unsupported=e.unsupported or None,
            error=e.error or None,
            format=e.format,
        )
        try:
            if e.model is not None:
                progress.say(f"evaluating export {e.kind}")
                m, escores = evaluate(e.model.to(device))
                er.eval = EvalMetrics(**m)
                er.max_abs_logit_diff = float((escores - scores).abs().max())
                er.predictions_differing = prediction_flips(scores, escores)
                er.bits_per_weight_on_disk = 8 * e.bytes_on_disk / max(parameter_counts(e.model)["total_params"], 1)
                if known is not None:
                    known[id(e.model)] = (e.model, m)
            if deployments is not None and e.deploy:
                er.deployments = deployments(e)
        except Exception as err:  # noqa: BLE001 - this artifact failed as served; the others stand
            er.error = error_text(err)
        out.append(er)
    return {"exports": out, "export_bytes": sum(e.bytes_on_disk for e in exports)}
