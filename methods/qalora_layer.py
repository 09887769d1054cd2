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

    def __init__(
        self,
        base: QuantLinear,
        r: int,
        alpha: float,
        dropout: float,
        pooling: str = "sum",
        a_init: str = "kaiming",
        dropout_after_pooling: bool = False,
    ) -> None:
        super().__init__()
        self.base = base
        self.groups = base.in_features // base.group_size
        self.lora_A = torch.nn.Linear(self.groups, r, bias=False)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False)
        if a_init == "xavier":  # the authors' code (yuhuixu1993/qa-lora, peft_utils.py)
            torch.nn.init.xavier_uniform_(self.lora_A.weight)
        else:  # as LoRA (Hu et al. 2021; peft's default): kaiming over A's fan-in, d_in / g
            torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)  # random A, zero B: the adapted model starts as the base
        self.scaling = alpha / r
        # sum: the paper's Algorithm 1; mean: the authors' AvgPool1d. The same function class, but not the same
        # optimisation under Adam: a sum is a mean with A's initial scale and its effective step both × g.
        self.pool_scale = 1.0 if pooling == "sum" else 1.0 / base.group_size
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.dropout_after_pooling = dropout_after_pooling

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.reshape(*x.shape[:-1], self.groups, self.base.group_size).sum(-1)
        return pooled if self.pool_scale == 1.0 else pooled * self.pool_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout_after_pooling:  # the authors' order; the paper's pools the dropped-out input
            pooled = self.dropout(self.pool(x))
        else:
            pooled = self.pool(self.dropout(x))
        update = self.lora_B(self.lora_A(pooled.to(self.lora_A.weight.dtype)))
        return self.base(x) + (update * self.scaling).to(x.dtype)

    def merged(self) -> QuantLinear:
        """The base with the adapter folded into its zero points; integers and scales untouched. The update to
        weight k of group j is scaling · (B A)_ij · pool_scale (1 for the sum, 1/g for the mean)."""
        out = copy.deepcopy(self.base)
        delta = (self.scaling * self.pool_scale) * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        out.zeros = (out.zeros.float() + delta).to(out.zeros.dtype)
        return out


def digest(q: QuantLinear) -> str:
    """SHA-256 of a layer's packed integers and scales (its zero points are what the merge changes)."""
    h = hashlib.sha256()
    for t in (q.qweight, q.scales):
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
