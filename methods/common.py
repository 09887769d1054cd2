"""Helpers shared by the PEFT-based methods (no registered class here)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from harness.contract import Deployable, Export, ModelContext, attempt, error_text, within
from harness.lazy import lazy_module
from harness.schema import Strict

torch = lazy_module("torch")  # imported at first use: configs validate without it (harness/lazy.py)

# PEFT config fields ftbench sets itself; a suite must not.
PEFT_RESERVED = frozenset(
    {"task_type", "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "peft_version"}
)
# What a saved adapter_config.json says about where it came from, not how to train: accepted so that a saved file
# pastes into a suite, and ignored (the harness sets the task type and the base model); the record keeps them
# under the config's ``ignored`` field. peft_type is the method's own choice and is checked, not ignored.
BOOKKEEPING = PEFT_RESERVED - {"peft_type"}


LOW_RANK_TYPES = frozenset({"LORA", "LOHA", "LOKR"})


class FieldError(ValueError):
    """A method config that cannot apply to a model: the field at fault, and why (names or dimensions)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def split_bookkeeping(data: Any) -> Any:
    """For a pydantic ``mode="before"`` validator: move a saved adapter_config.json's bookkeeping keys into
    ``ignored`` (null values dropped)."""
    if not isinstance(data, dict):
        return data
    ignored = {k: data[k] for k in BOOKKEEPING if k in data and data[k] is not None}
    rest = {k: v for k, v in data.items() if k not in BOOKKEEPING}
    return {**rest, "ignored": {**rest.get("ignored", {}), **ignored}} if ignored else rest


class PeftOptions(Strict):
    """Options that become a PEFT config: other keys pass through by name; a saved adapter_config.json's
    bookkeeping keys are moved to ``ignored`` (accepted, not used, kept in the record)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    ignored: dict[str, Any] = Field(
        default_factory=dict,
        description="a saved adapter_config.json's bookkeeping keys (base_model_name_or_path, revision, "
        "task_type, inference_mode, peft_version, auto_mapping): accepted, not used, kept in the record",
    )

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        return split_bookkeeping(data)


def _adaptable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) or type(m).__name__ == "Conv1D"}


def conv1d_note(model: torch.nn.Module) -> str:
    """Where ``model``'s layers are transformers' ``Conv1D`` (GPT-2's), a note saying so: the INT-N and 4-bit
    quantizers take ``nn.Linear`` only; '' otherwise."""
    n = sum(type(m).__name__ == "Conv1D" for m in model.modules())
    return f"; this model's {n} layers are transformers' Conv1D (GPT-2's), which it does not quantize" if n else ""


def kept_float(model: torch.nn.Module) -> set[str]:
    """The modules transformers keeps in float when it loads a model quantized (``_keep_in_fp32_modules``): T5's
    ``wo``, whose forward casts its input to that weight's dtype (a 4-bit one: uint8). No quantizer here takes
    them either."""
    kept = getattr(model, "_keep_in_fp32_modules", None) or []
    return {*kept, *(getattr(model, "_keep_in_fp32_modules_strict", None) or [])}


def need_linears(model: torch.nn.Module, skip: set[str], method: str) -> None:
    """Raise ``ValueError`` where ``model`` has no ``nn.Linear`` outside ``skip`` (a layer's last name, its path
    or a module it is in) for ``method`` to quantize: at validation, not after loading the weights."""
    skip = skip | kept_float(model)
    if not any(isinstance(m, torch.nn.Linear) and not within(n, skip) for n, m in model.named_modules()):
        why = conv1d_note(model) or " (check skip_modules)"
        raise ValueError(f"{method}: no Linear layer left to quantize{why}")


def with_heads(config: Any, ctx: ModelContext) -> Any:
    """``config`` (a PEFT config) training the whole head in full: PEFT adds a classifier's ``classifier`` and
    ``score`` to ``modules_to_save`` itself; any other head module (``ModelContext.head_names``: DeBERTa's new
    ``pooler.dense``, which PEFT leaves random and frozen, peft#2171) joins them, beside the user's own."""
    import dataclasses

    named = [h for h in ctx.head_names if h.endswith(("classifier", "score"))]  # what PEFT wraps itself
    extra = [h for h in ctx.head_names if not within(h, named)]
    if ctx.task_type != "seq_cls" or not extra or "modules_to_save" not in {f.name for f in dataclasses.fields(config)}:
        return config
    config.modules_to_save = sorted({*(config.modules_to_save or []), *extra})
    return config


PROMPT_SIZES = (("token_dim", "hidden_size"), ("num_layers", "num_hidden_layers"), ("num_attention_heads",) * 2)


def check_peft_fits(model: torch.nn.Module, config: Any) -> None:
    """Raise :class:`FieldError` where a PEFT config cannot apply to ``model`` (on the meta device: no weights):
    target modules it does not have, a layer index beyond its depth, a rank above a targeted layer's dimensions,
    then whatever PEFT itself rejects when it injects the config into the skeleton (dimension constraints such
    as VB-LoRA's vector_length or FourierFT's n_frequency). Other errors of the meta injection are left to the
    run, which would report them with the real weights."""
    from peft import get_peft_model

    layers = _adaptable(model)
    target = getattr(config, "target_modules", None)
    if isinstance(target, (list, set, tuple)) and target:
        every = [n for n, _ in model.named_modules()]  # PEFT may target any module by name, not only layers
        found = {t for t in target for n in every if n == t or n.endswith("." + t)}
        missing = sorted(set(target) - found)
        if missing:
            names = sorted({n.split(".")[-1] for n in layers})
            raise FieldError(
                "target_modules", f"no module named {', '.join(map(repr, missing))}; this model has: {', '.join(names)}"
            )
    if getattr(config, "is_prompt_learning", False):  # sizes a saved config recorded for the model it came from
        for field, attr in PROMPT_SIZES:
            saved, actual = getattr(config, field, None), getattr(getattr(model, "config", None), attr, None)
            if saved is not None and actual is not None and saved != actual:
                raise FieldError(
                    field,
                    f"{saved} does not match this model's {attr} ({actual}); the value was saved for another model: "
                    f"remove {field} and PEFT reads it from the model",
                )
    wanted = getattr(config, "layers_to_transform", None)
    if wanted is not None:
        depth = 1 + max((int(m.group(1)) for n in layers if (m := re.search(r"\.(\d+)\.", n))), default=-1)
        bad = sorted(i for i in ([wanted] if isinstance(wanted, int) else wanted) if not 0 <= i < depth)
        if bad:
            raise FieldError("layers_to_transform", f"layer {bad[0]} is out of range: this model has {depth} layers")
    try:
        # PEFT's warnings about a config it adjusts (fan_in_fan_out on GPT-2's Conv1D) belong to the run's log,
        # where it injects the config again: here they would land among ftbench's own lines
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            injected = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    except ValueError as err:
        why = str(err).splitlines()[0]
        if not target and "target_modules" in why:  # PEFT knows no default targets for this architecture
            norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}  # what LN tuning targets
            names = ", ".join(sorted({n.split(".")[-1] for n in {*layers, *norms} if n}))
            raise FieldError("target_modules", f"PEFT has no default for this model; it has: {names}") from None
        raise FieldError("", f"PEFT rejects it for this model: {why}") from None
    except Exception:  # noqa: BLE001 - a meta-device limitation, not a verdict on the config
        return
    r = getattr(config, "r", None)
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    # a rank above min(d_in, d_out) is meaningless for the low-rank types (VeRA's r is a shared projection's size,
    # 256 by default, and may exceed a layer's dimensions); checked on the layers PEFT adapted, defaults included
    if isinstance(r, int) and kind in LOW_RANK_TYPES:
        for name, m in injected.named_modules():
            base = getattr(m, "base_layer", None)
            if isinstance(base, torch.nn.Linear) and r > min(base.in_features, base.out_features):
                d_in, d_out = base.in_features, base.out_features
                short = name.removeprefix("base_model.model.")
                raise FieldError("r", f"r={r} exceeds {short} ({d_in} → {d_out}): at most {min(d_in, d_out)}")


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_state_dict(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict to safetensors, each storage once: tied weights (a decoder's LM head and its input
    embeddings) are written under their first name only, and the metadata says which names were tied."""
    from safetensors.torch import save_file

    seen: dict[tuple, str] = {}
    tensors, tied = {}, {}
    for k, v in model.state_dict().items():
        if not torch.is_tensor(v):
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if key in seen:
            tied[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous()
    save_file(tensors, path, metadata={**(metadata or {}), "tied": json.dumps(tied)})


def load_state_dict(model: torch.nn.Module, path: Path) -> None:
    """Inverse of :func:`save_state_dict`: strict, except for names the file records as tied."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as fh:
        tied = json.loads((fh.metadata() or {}).get("tied", "{}"))
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if unexpected or set(missing) - set(tied):
        raise ValueError(f"{path}: state dict mismatch: missing {sorted(set(missing) - set(tied))}, extra {unexpected}")


def requires_grad_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs that require gradients."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def export_peft(model: torch.nn.Module, out_dir: Path, mergeable: bool, load_base=None) -> list[Export]:
    """Adapter in PEFT format (adapter_model.safetensors + adapter_config.json); where the tuner can merge,
    also the merged full model, returned in memory so the runner can measure merge fidelity. A tuner that cannot
    merge by design (``NotImplementedError``, e.g. Lily) makes the merge *unsupported*; a merge that fails on
    this model (BEFT on a base without biases: ``ValueError``) is that export's *error*. Either way the adapter
    and the run stand. With ``load_base`` (:attr:`ModelContext.load_base`), a mergeable adapter is also deployed
    unmerged on its base, from disk: what serving several adapters on one base costs per call."""
    out = [Export("adapter", out_dir / "adapter", 0, notes="the trained adapter: on its base, the model as trained")]
    model.save_pretrained(out[0].path, safe_serialization=True)
    out[0].bytes_on_disk = dir_bytes(out[0].path)
    if mergeable and load_base is not None:  # prompt learning is left out: its adapters change the inputs
        note = "unmerged: the adapter's layers beside the base's, as multi-adapter serving runs them"
        out[0].deploy = [adapter_on_base("adapter on the base (unmerged)", out[0].path, load_base, note)]
    if mergeable:
        path = out_dir / "merged"
        try:
            merged = copy.deepcopy(model).merge_and_unload()
        except NotImplementedError as err:
            shutil.rmtree(path, ignore_errors=True)
            kind = getattr(model.peft_config.get("default"), "peft_type", "this method")
            out.append(Export("merged", path, 0, unsupported=f"unsupported by {getattr(kind, 'value', kind)}: {err}"))
            return out
        except Exception as err:  # noqa: BLE001 - this model cannot take the merge: recorded, the adapter stands
            out.append(Export("merged", path, 0, error=error_text(err)))
            return out

        def save() -> Export:
            merged.save_pretrained(path, safe_serialization=True)
            return Export("merged", path, dir_bytes(path), model=merged, deploy=pretrained_forms(path, type(merged)))

        out.append(attempt("merged", path, save))
    return out


def adapter_on_base(name: str, path: Path, load_base, note: str = "", then=None) -> Deployable:
    """A PEFT adapter folder put back on its base, loaded again from the base's folder, as the adapter's model
    card loads it (float32): ``load_base`` is :attr:`ModelContext.load_base`; ``then``, what the method did to
    the model it trained beyond PEFT's own loading (part of the load). Skipped, saying why, where the base had
    random weights."""
    if load_base is None:
        return Deployable(name, skipped="the base was built with random weights: there is no folder to load it from")

    def load() -> torch.nn.Module:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(), path)
        return then(model) if then is not None else model

    return Deployable(name, "float32", load=load, note=note)


def pretrained_forms(path: Path, cls: type) -> list[Deployable]:
    """A transformers model folder deployed as saved (fp32) and loaded in bfloat16 (half the memory; fast only
    where the hardware has bf16 matmuls)."""
    return [
        Deployable("fp32", "float32", load=lambda: cls.from_pretrained(path, dtype=torch.float32)),
        Deployable("bf16", "bfloat16", load=lambda: cls.from_pretrained(path, dtype=torch.bfloat16)),
    ]
