"""Analytic peak-memory estimate for fine-tuning models this machine cannot hold (``ftbench estimate``).

Weights (by format), adapter parameters, gradients, optimizer state and activations of a Llama-style decoder
(or a GPT-style one for the LoRA paper's GPT-3 check), from the architecture alone — no weights needed.

  weights      full / lora: every parameter in ``weight_dtype`` (bf16 by default); qlora: linear weights in
               NF4 at 4 + 8/64 + 32/(64·256) ≈ 4.127 bits (4.5 without double quantization), the rest in the
               weight dtype; qalora: linear weights at bits + 2·16/group_size, the rest in the weight dtype.
  adapters     r·(d_in + d_out) per targeted linear (qalora: r·(d_in/g + d_out)), fp32.
  gradients    one per trainable parameter, in the trainable parameters' dtype.
  optimizer    AdamW: 8 bytes per trainable parameter (32-bit moments), 2 for 8-bit; paged optimizers keep the
               state in host memory (counted apart, as ``host``).
  activations  per layer and token, a Llama block counted tensor by tensor: (6·h + 2·kv_dim + 4·f) values
               (GPT blocks: Korthikanti et al. 2022's 10·h + 4·f), 2 bytes each in 16-bit, 4 in fp32; where the
               scores are materialized, a·s per token more: eager attention's softmax output (and dropout's mask
               and output), SDPA's math fallback (a CPU with attention dropout) 12 bytes each; the loss's b·s·V logits
               three times in fp32 (logits, log-softmax, gradient). Gradient checkpointing keeps only each
               layer's input (2·h bytes per token) plus one layer's activations during recompute. Autocast over
               fp32 weights keeps the norms' inputs in fp32 and one 16-bit cast of a norm's output per linear that
               keeps its input, adds the 16-bit weight copies autograd keeps (:func:`cast_weight_copies`), and
               keeps quantized linears' outputs in fp32 (their MLP's 3·f).
  peak         weights (adapters included) + optimizer state + max(activations + the output head's gradients
               where it trains, gradients + optimizer temporaries). torch's fused Adam/AdamW (the default)
               has none; an optimizer that loops over tensors holds two scratch buffers (sqrt(v) + eps, and
               the update) the size of the largest trainable tensor — measured so by harness/measure/memory.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from harness.cell.optim import FUSED_BY_DEFAULT
from harness.schema import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Arch:
    """A decoder's sizes, enough to count its parameters and activations."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    mlp_matrices: int = 3  # SwiGLU (gate, up, down); GPT-style MLPs have 2
    tied_embeddings: bool = False
    lm_head: bool = True  # False for a classifier (no vocabulary-sized output, no logits over it)

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, d_in, d_out) of the linear layers of one block."""
        h, f, kvd = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        attn = [("q_proj", h, h), ("k_proj", h, kvd), ("v_proj", h, kvd), ("o_proj", h, h)]
        mlp = [("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)][-self.mlp_matrices :]
        return attn + mlp

    def params(self) -> dict[str, int]:
        lin = self.layers * sum(i * o for _, i, o in self.linear_shapes())
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings or not self.lm_head else 2)
        return {"linear": lin, "other": embed + (2 * self.layers + 1) * self.hidden}


ARCHS = {
    "llama-7b": Arch(4096, 11008, 32, 32, 32, 32000),
    "llama-13b": Arch(5120, 13824, 40, 40, 40, 32000),
    "llama-33b": Arch(6656, 17920, 60, 52, 52, 32000),
    "llama-65b": Arch(8192, 22016, 80, 64, 64, 32000),
    "llama-70b": Arch(8192, 28672, 80, 64, 8, 32000),
    "gpt3-175b": Arch(12288, 49152, 96, 96, 96, 50257, mlp_matrices=2, tied_embeddings=True),
}


def arch_from_config(config, lm_head: bool = True) -> Arch:
    """A transformers config (Llama-style field names) as an Arch."""
    return Arch(
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        lm_head=lm_head,
    )


def arch_from_model(model, lm_head: bool = True) -> Arch:
    """A model's (or its meta skeleton's) Arch: its config's sizes, and SwiGLU's third matrix where a linear
    layer is a gate (Llama, Mistral, Qwen, ...)."""
    import torch

    linears = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    gated = any("gate" in n or n == "w1" for n in linears)
    return replace(arch_from_config(model.config, lm_head=lm_head), mlp_matrices=3 if gated else 2)


SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")
SHAPE_HELP = "shape:hidden=H,intermediate=F,layers=L,heads=A,vocab=V[,kv_heads=K][,mlp_matrices=2|3]"


def _shape(text: str) -> Arch:
    """``shape:hidden=4096,intermediate=11008,...``: an architecture given by its sizes (Llama-style blocks)."""
    try:
        kv = dict(part.split("=", 1) for part in text.removeprefix("shape:").split(","))
        values = {k.strip(): int(v) for k, v in kv.items()}
    except ValueError:
        raise ConfigError(f"--model {text!r}: not a shape; write {SHAPE_HELP}") from None
    unknown = sorted(set(values) - {*SHAPE_KEYS, "mlp_matrices"})
    missing = [k for k in SHAPE_KEYS if k not in values and k != "kv_heads"]
    if unknown or missing:
        what = f"unknown key {unknown[0]!r}" if unknown else f"missing {missing[0]!r}"
        raise ConfigError(f"--model {text!r}: {what}; write {SHAPE_HELP}")
    values.setdefault("kv_heads", values["heads"])
    bad = next((k for k, v in values.items() if not 1 <= v <= 10**7), None)
    if bad:
        raise ConfigError(f"--model {text!r}: {bad}={values[bad]}; allowed: 1 … 10^7")
    if values.get("mlp_matrices", 3) not in (2, 3):
        raise ConfigError(f"--model {text!r}: mlp_matrices={values['mlp_matrices']}; allowed: 2 (GPT) or 3 (SwiGLU)")
    if values["hidden"] % values["heads"] or values["heads"] % values["kv_heads"]:
        raise ConfigError(f"--model {text!r}: heads must divide hidden, and kv_heads must divide heads")
    return Arch(**values)


def resolve_arch(name: str) -> Arch:
    """A preset (``llama-7b`` …), a ``shape:…``, or any model ftbench can name (an alias such as ``smollm2-135m``,
    a local model folder or its ``config.json``): read from its config, its blocks from its skeleton."""
    if name in ARCHS:
        return ARCHS[name]
    if name.startswith("shape:"):
        return _shape(name)
    from harness.cell.modelnames import ALIASES

    path = Path(name).expanduser()
    path = path.parent if path.name == "config.json" and path.is_file() else path
    if name not in ALIASES and not (path / "config.json").is_file():
        allowed = ", ".join([*ARCHS, *ALIASES])
        raise ConfigError(
            f"--model {name!r}: unknown; allowed: {allowed}, a local model folder or its config.json, or {SHAPE_HELP}"
        )

    from harness.cell.models import is_decoder_only, skeleton

    key = name if name in ALIASES else str(path)
    config = skeleton(key, mode="classifier").config  # the config as the loader reads it (GGUF included)
    decoder = is_decoder_only(config)
    try:
        return arch_from_model(skeleton(key, mode="prompt" if decoder else "classifier"), lm_head=decoder)
    except AttributeError as err:
        raise ConfigError(f"--model {name!r}: its config lacks a size the estimate needs ({err})") from None


@dataclass(frozen=True)
class Setup:
    """One estimate's method, adapters, batch, sequence length, dtypes and optimizer."""

    method: str = ""  # a registered method that states its memory model (harness/contract.py: MemoryModel)
    r: int = 16
    targets: tuple[str, ...] | None = None  # None: every linear of every block (QLoRA paper's recipe)
    batch: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    weight_dtype_bytes: int = 2  # full/lora weights; 4 for fp32
    activation_bytes: int = 2
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_32bit | paged_adamw_8bit
    optimizer_fused: bool = True  # torch's fused Adam/AdamW, in place; False: a loop over tensors, with scratch
    double_quant: bool = True
    bits: int = 4  # qalora
    group_size: int = 32  # qalora
    attention: str = "sdpa"  # sdpa: a fused kernel, no s² term | eager, or math (SDPA's fallback): scores kept
    attention_dropout: bool = False  # dropout on the attention probabilities: its mask and output kept too


class NotEstimated(ValueError):
    """A method that states no memory model (:meth:`harness.contract.Method.memory_model`)."""


def memory_model(s: Setup):
    """The memory model of ``s.method``, stated by the method itself, built with the setup's knobs its config
    takes (``r``; ``double_quant``; ``bits``, ``group_size``)."""
    from harness.registry import available_methods

    known = available_methods()
    if s.method not in known:
        raise ConfigError(f"--method {s.method}: unknown; allowed: {', '.join(known)}")
    cls = known[s.method]
    knobs = {"r": s.r, "double_quant": s.double_quant, "bits": s.bits, "group_size": s.group_size}
    try:
        model = cls(cls.Config.model_validate({k: v for k, v in knobs.items() if k in cls.Config.model_fields}))
    except ValueError as err:  # its config needs more than these knobs (peft: a peft_type)
        raise NotEstimated(f"{s.method}: not estimated (its config needs more: {str(err).splitlines()[0]})") from None
    mm = model.memory_model()
    if mm is None:
        raise NotEstimated(f"{s.method}: not estimated (the method states no memory model)")
    return mm


def estimate(arch: Arch, s: Setup, mm=None) -> dict[str, float]:
    """Bytes by category and the estimated peak, for one fine-tuning step. ``mm``: the method's memory model
    from its whole config (a suite's cell); None builds it from the setup's knobs (``ftbench estimate``)."""
    p = arch.params()
    blocks = [(n, i, o) for n, i, o in arch.linear_shapes() if s.targets is None or n in s.targets]
    mm = mm if mm is not None else memory_model(s)
    if not blocks and mm.trains != "all":
        raise NotEstimated(f"{s.method}: not estimated (no linear layer of a block is among its targets {s.targets})")
    if mm.trains == "all":
        weights = (p["linear"] + p["other"]) * s.weight_dtype_bytes
        trainable, train_bytes = p["linear"] + p["other"], s.weight_dtype_bytes
        largest = arch.vocab * arch.hidden
    else:
        if mm.linear_bits is not None:  # a quantized base: its other parameters in the weight dtype
            weights = p["linear"] * mm.linear_bits / 8 + p["other"] * s.weight_dtype_bytes
        else:
            weights = (p["linear"] + p["other"]) * s.weight_dtype_bytes
        trainable = arch.layers * sum(mm.rank * (i // mm.adapter_in_divisor + o) for _, i, o in blocks)
        train_bytes = 4
        weights += trainable * train_bytes  # the adapters themselves, in fp32
        largest = max(mm.rank * max(i, o) for _, i, o in blocks)
    grads = trainable * train_bytes
    # bytes of optimizer state per trainable parameter: Adam's two moments (8-bit: 1 byte each), one for
    # Adagrad / RMSprop / Lion, none for plain SGD (momentum is an optimizer_args choice the estimate ignores)
    state_per_param = {"sgd": 0, "adagrad": 4, "rmsprop": 4, "lion_8bit": 1}.get(
        s.optimizer, 2 if s.optimizer.endswith("8bit") else 8
    )
    state = trainable * state_per_param
    host = state if s.optimizer.startswith("paged") else 0.0
    gpu_state = state - host
    b, t, h, f, a = s.batch, s.seq_len, arch.hidden, arch.intermediate, arch.heads
    if arch.mlp_matrices == 3:  # a Llama block, counted: norm in/out ×2, q k v, attention out, SwiGLU's four
        kv_dim, act, keeps = h // a * arch.kv_heads, s.activation_bytes, mm.saves_linear_inputs
        if s.weight_dtype_bytes > act:
            # autocast over fp32 weights (saved-tensor hooks, SmolLM2-135M shape, bf16): the norms' inputs are the
            # fp32 residual stream, and so are their outputs where the norms' weights train; each linear that keeps
            # its input keeps its own 16-bit cast of the norm's output (q, k, v; gate, up; an adapter's linear only
            # where the base is frozen)
            readers = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
            casts = len(readers if mm.trains == "all" else readers & {n for n, _, _ in blocks}) if keeps else 0
            norms = 2 * h * 4 + (2 * h * 4 if mm.trains == "all" else 0) + casts * h * act
            # quantized linears return their input's dtype, the fp32 stream's (bitsandbytes' Linear4bit,
            # QA-LoRA's): gate, up and SiLU's outputs are kept in fp32
            mlp_fp32 = 3 * f * (4 - act) if mm.linear_bits is not None else 0
        else:  # the two norms' inputs and outputs (no output where no linear keeps its input)
            norms, mlp_fp32 = (4 * h if keeps else 2 * h) * act, 0
        # q and the attention's output, k and v, SwiGLU's four (down_proj's input only where it is kept)
        per_layer = b * t * (norms + (2 * h + 2 * kv_dim + (4 if keeps else 3) * f) * act + mlp_fp32)
    else:  # a GPT block: Korthikanti et al. (2022)'s count without dropout masks' separate bytes
        per_layer = b * t * (10 * h + 4 * f) * s.activation_bytes
    if s.attention == "math":  # SDPA's fallback (a CPU with attention dropout) upcasts to fp32 and keeps, per
        # (query, key) score, softmax's output, dropout's float mask and its output: 12 bytes; under 16-bit also
        # fp32 copies of q, k and v (measured with saved-tensor hooks, torch 2.13)
        per_layer += b * a * t * t * 12 + (b * t * 3 * h * 4 if s.activation_bytes < 4 else 0)
    elif s.attention == "eager":  # softmax's output (fp32 where the model upcasts it, as Llama's does), then
        # dropout's mask and output in the probabilities' dtype, or without dropout the 16-bit copy of an fp32
        # softmax the value matmul takes (measured so for Llama- and BERT-style code, fp32 and bf16 autocast)
        act = s.activation_bytes
        softmax = 4 if arch.mlp_matrices == 3 else act
        per_layer += b * a * t * t * (softmax + (2 * act if s.attention_dropout else act if softmax != act else 0))
    # The loss holds three fp32 vocabulary-sized tensors at once in backward (the logits, log-softmax's saved
    # output, and the gradient being formed: measured so by harness/measure/memory.py); the 16-bit logits autocast
    # produced are gone by then (transformers 5: SmolLM2-135M shape, bf16, 1 × 1024 tokens).
    logits = b * t * arch.vocab * 12 if arch.lm_head else 0
    model_level = 3 * b * t * h * s.activation_bytes  # the embedding's output, the final norm's input and output
    if s.grad_checkpointing:
        acts = arch.layers * b * t * h * s.activation_bytes + per_layer + logits + model_level
    else:
        acts = arch.layers * per_layer + logits + model_level
    acts += cast_weight_copies(arch, s, mm, blocks)
    # torch's fused Adam/AdamW (ftbench's default, harness/cell/optim.py) updates in place; a loop over tensors
    # (the other torch optimizers) holds two scratch tensors the size of the largest one
    temporaries = 0 if s.optimizer_fused and s.optimizer in FUSED_BY_DEFAULT else 2 * largest * train_bytes
    # Backward frees each layer's activations as it forms that layer's gradients, so the two never peak
    # together: the backward peak is all activations plus the first gradients formed (the output head's, where
    # it trains), the optimizer step's is all gradients plus AdamW's scratch. A trained embedding tied to the
    # head ends backward with all gradients beside its second contribution and their sum (SmolLM2-135M, fp32
    # weights: 216 MiB, twice the table; an untied embedding's gradient needs no sum).
    head_grads = arch.vocab * arch.hidden * train_bytes if mm.trains == "all" and arch.lm_head else 0
    if arch.tied_embeddings:
        temporaries = max(temporaries, 2 * head_grads)
    peak = weights + gpu_state + max(acts + head_grads, grads + temporaries)
    return {
        "weights": weights,
        "trainable_params": trainable,
        "gradients": grads,
        "optimizer_state": gpu_state,
        "optimizer_state_host": host,
        "activations": acts,
        "peak": peak,
    }


def cast_weight_copies(arch: Arch, s: Setup, mm, adapted: list[tuple[str, int, int]]) -> float:
    """Bytes of the 16-bit weight copies autocast makes over wider weights and autograd keeps for backward.

    F.linear under autocast casts its fp32 weight to the activations' dtype, and that copy is saved wherever the
    layer's input needs a gradient (∂x = ∂y · W): the output head's (its input always does), and every block
    linear computed by a plain matmul (full fine-tuning; LoRA's frozen base). SmolLM2-135M, LoRA, bf16: 211
    copies, 256 MiB, beside 315 MiB of activations (saved-tensor hooks). With gradient checkpointing a frozen
    base's copies live one layer at a time (the recompute); trained weights stay in autocast's cache of
    trainable leaves until the forward ends. Quantized bases dequantize in autograd functions that save no weight
    (bitsandbytes' MatMul4Bit; QA-LoRA's DequantMatmul), as do ``adapted`` linears whose method says
    ``saves_weight_copies=False`` (QAT-LoRA's)."""
    if s.weight_dtype_bytes <= s.activation_bytes:  # no autocast, or weights already in the activations' dtype
        return 0.0
    head = arch.vocab * arch.hidden if arch.lm_head else 0
    skipped = {n for n, _, _ in adapted} if mm.trains != "all" and not mm.saves_weight_copies else set()
    per_layer = 0 if mm.linear_bits is not None else sum(i * o for n, i, o in arch.linear_shapes() if n not in skipped)
    layers = 1 if s.grad_checkpointing and mm.trains != "all" else arch.layers
    return (head + per_layer * layers) * s.activation_bytes


COLUMNS = ("weights GB", "trainable", "grads GB", "optimizer GB", "activations GB", "peak GB")


def estimated_methods() -> list[str]:
    """Every registered method that states a memory model, at its default config."""
    from harness.registry import available_methods

    out = []
    for name, cls in available_methods().items():
        try:
            if cls(cls.Config()).memory_model() is not None:
                out.append(name)
        except ValueError:  # a config with required fields (peft: peft_type) states nothing by default
            continue
    return out


def _gb(n: float) -> str:
    """Bytes as GB, to a precision a small model keeps (MiniLM's weights: 0.045, not 0.0)."""
    v = n / GB
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}" if v else "0"


def table(names: list[str], methods: list[str], base: Setup) -> list[dict[str, str]]:
    """One row per (model, method): the estimate's parts in GB (trainable parameters in millions)."""
    rows = []
    for name in names:
        arch = resolve_arch(name)
        for m in methods:
            try:
                e = estimate(arch, Setup(**{**base.__dict__, "method": m}))
            except NotEstimated as err:
                rows.append({"model": name, "method": m, **dict.fromkeys(COLUMNS, "—"), "peak GB": str(err)})
                continue
            rows.append(
                {
                    "model": name,
                    "method": m,
                    "weights GB": _gb(e["weights"]),
                    "trainable": f"{e['trainable_params'] / 1e6:.1f}M",
                    "grads GB": _gb(e["gradients"]),
                    "optimizer GB": _gb(e["optimizer_state"])
                    + (f" (+{_gb(e['optimizer_state_host'])} host)" if e["optimizer_state_host"] else ""),
                    "activations GB": _gb(e["activations"]),
                    "peak GB": _gb(e["peak"]),
                }
            )
    return rows


def print_table(args) -> None:
    """``ftbench estimate``'s markdown table, for the command line's arguments."""
    names = args.model or list(ARCHS)
    methods = args.method or estimated_methods()
    limits = (("--r", args.r, 65536), ("--batch", args.batch, 2**20), ("--seq-len", args.seq_len, 2**24))
    for flag, value, high in limits:
        if not 1 <= value <= high:
            raise ConfigError(f"{flag}: {value}; allowed: an integer from 1 to {high}")
    base = Setup(
        r=args.r,
        batch=args.batch,
        seq_len=args.seq_len,
        grad_checkpointing=args.grad_checkpointing,
        optimizer=args.optimizer,
        double_quant=not args.no_double_quant,
        bits=args.bits,
        group_size=args.group_size,
        attention=args.attention,
        weight_dtype_bytes=4 if args.weights == "fp32" else 2,
    )
    rows = table(names, methods, base)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(row[c] for c in cols) + " |")
    print(
        f"(estimates in GB = 1e9 bytes; batch {args.batch}, seq {args.seq_len}, r {args.r}, adapters on every "
        f"linear, optimizer {args.optimizer}, gradient checkpointing {'on' if args.grad_checkpointing else 'off'}, "
        + ("weights fp32 under bf16 autocast, their bf16 copies kept for backward)" if args.weights == "fp32" else
           "weights and activations bf16; ftbench's runs: --weights fp32)")
    )  # fmt: skip
