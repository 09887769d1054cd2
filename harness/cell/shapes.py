"""Real architectures with random weights: the ``*-shape`` model aliases.

Memory and speed do not depend on the weights' values: a model built from a real config with random weights
has exactly the parameters, the memory and the FLOPs of the real one; only its accuracy is meaningless, so
a run on one records ``weights: random`` and is never scored. The configs below are the published
``config.json`` fields that set a model's size (nothing else changes memory or FLOPs: RoPE scaling, for one,
is left out). ``params`` is the published parameter count, checked by a test on the meta device.

No torch here: the driver lists and validates these names without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    """One real architecture: what it is, its published parameter count and its size-setting config fields."""

    about: str
    params: int
    config: dict = field(default_factory=dict)


def _llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool, pos: int) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "max_position_embeddings": pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "head_dim": hidden // heads,
    }


def _qwen2(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> dict:
    # Qwen2 has biases on q, k and v (in the model code, not the config)
    base = _llama(hidden, inter, layers, heads, kv, vocab, tied, 32768)
    return {**base, "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}


SHAPES: dict[str, Shape] = {
    "smollm2-135m-shape": Shape(
        "SmolLM2-135M architecture",
        134_515_008,
        {**_llama(576, 1536, 30, 9, 3, 49152, True, 8192), "rope_theta": 100000.0},
    ),
    "qwen2.5-0.5b-shape": Shape("Qwen2.5-0.5B architecture", 494_032_768, _qwen2(896, 4864, 24, 14, 2, 151936, True)),
    "llama-3.2-1b-shape": Shape(
        "Llama-3.2-1B architecture", 1_235_814_400, _llama(2048, 8192, 16, 32, 8, 128256, True, 131072)
    ),
    "llama-3.2-3b-shape": Shape(
        "Llama-3.2-3B architecture", 3_212_749_824, _llama(3072, 8192, 28, 24, 8, 128256, True, 131072)
    ),
    "mistral-7b-shape": Shape(
        "Mistral-7B-v0.1 architecture",
        7_241_732_096,
        {**_llama(4096, 14336, 32, 32, 8, 32000, False, 32768), "model_type": "mistral", "rope_theta": 10000.0},
    ),
    "qwen2.5-7b-shape": Shape("Qwen2.5-7B architecture", 7_615_616_512, _qwen2(3584, 18944, 28, 28, 4, 152064, False)),
    "llama-3.1-8b-shape": Shape(
        "Llama-3.1-8B architecture", 8_030_261_248, _llama(4096, 14336, 32, 32, 8, 128256, False, 131072)
    ),
    "llama-3.1-70b-shape": Shape(
        "Llama-3.1-70B architecture", 70_553_706_496, _llama(8192, 28672, 80, 64, 8, 128256, False, 131072)
    ),
}
LLAMA3_LADDER = ("llama-3.2-1b-shape", "llama-3.2-3b-shape", "llama-3.1-8b-shape", "llama-3.1-70b-shape")

RANDOM_NOTE = "random weights: memory and speed only"


def describe(name: str) -> str:
    """The alias's one-line description for ``ftbench models``."""
    s = SHAPES[name]
    return f"{s.about}, {s.params / 1e9:.2f}B params, random weights (memory and speed only; no download)"
