"""QA-LoRA's layer (methods/qalora.py is the method): a frozen group-wise INT-N ``QuantLinear`` plus a LoRA adapter
on the group-pooled input, and its exact merge into the zero points. A module of its own because it defines torch
modules, while the method's config must validate without torch."""

from __future__ import annotations

import copy
import hashlib
import math

import torch

from methods.intquant import QuantLinear


class QALoraLinear(torch.nn.Module):
    """A frozen QuantLinear plus a LoRA adapter on the group-pooled input."""

    def __init__(self, base: QuantLinear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.groups = base.in_features // base.group_size
        self.lora_A = torch.nn.Linear(self.groups, r, bias=False)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as LoRA: random A, zero B
        torch.nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / r
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.groups, self.base.group_size).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.pool(self.dropout(x)).to(self.lora_A.weight.dtype)))
        return self.base(x) + (update * self.scaling).to(x.dtype)

    def merged(self) -> QuantLinear:
        """The base with the adapter folded into its zero points; integers and scales untouched."""
        out = copy.deepcopy(self.base)
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())  # d_out × groups
        out.zeros = (out.zeros.float() + delta).to(out.zeros.dtype)
        return out


def digest(q: QuantLinear) -> str:
    """SHA-256 of a layer's packed integers and scales (its zero points are what the merge changes)."""
    h = hashlib.sha256()
    for t in (q.qweight, q.scales):
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
