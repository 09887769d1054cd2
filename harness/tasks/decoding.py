"""Greedy decoding on a KV cache without ``generate()``, for a model whose ``generate()`` cannot keep one.

PEFT 0.21 looks for the cache under ``past_key_values``; transformers 5.2x passes it as ``cache``. In
``generate()`` prompt tuning then re-injected its virtual tokens at every cached step (the cache grew 12, 17, 22
tokens) and prefix tuning's prefix was never read (its answers were the base model's). Such a model's method
says so by turning its generation cache off (``generation_config.use_cache = False``: methods/peft_generic.py),
and ftbench decodes it here instead, as it scores it.
"""

from __future__ import annotations

import torch


def decodes_on_own_cache(model: torch.nn.Module) -> bool:
    """Whether ``model``'s method turned its generation cache off (``generation_config.use_cache`` false): then
    ftbench decodes it on the cache its own forward fills, a token at a time through its base model."""
    return getattr(getattr(model, "generation_config", None), "use_cache", True) is False


@torch.no_grad()
def greedy_on_own_cache(model: torch.nn.Module, batch: dict, max_new_tokens: int, pad_id: int, eos_id) -> torch.Tensor:
    """Greedy decoding for a model whose generate() keeps no cache (``generation_config.use_cache`` false: PEFT's
    prompt learning, methods/peft_generic.py): the prompt through the model's own forward (which puts the virtual
    tokens or prefix in, positions from the mask, as scored), then a token at a time through its base model on
    the cache that forward filled, as generate() would. Finished rows continue with padding."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    kw = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # transformers 5.2x: `cache`
    full = torch.cat([mask.new_ones(mask.shape[0], getattr(out, kw).get_seq_length() - ids.shape[1]), mask], 1)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done, new = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device), []
    for _ in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), out.logits[:, -1].argmax(-1))
        new.append(nxt)
        done |= (nxt == eos_id) if eos_id is not None else done
        if bool(done.all()) or len(new) == max_new_tokens:
            break
        full = torch.cat([full, full.new_ones(full.shape[0], 1)], 1)
        at = full.sum(-1, keepdim=True) - 1  # the new token's position: the row's own tokens and the virtual ones
        out = base(
            input_ids=nxt[:, None], attention_mask=full, position_ids=at, use_cache=True, **{kw: getattr(out, kw)}
        )
    return torch.cat([ids, torch.stack(new, 1)], 1)
