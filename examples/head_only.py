"""A complete third-party method: train only the classification head ("linear probing").

Register it from your own package's pyproject.toml, and use it in a suite as ``- method: head_only``:

    [project.entry-points."ftbench.methods"]
    head_only = "head_only:HeadOnly"

MethodBase gives every other hook of the contract its neutral default (no options, the suite's optimizer, no
loss term, the trained parameters exported as safetensors); override any of them as your method needs.
"""

from harness.contract import MethodBase


class HeadOnly(MethodBase):
    """Linear probe: the pretrained body stays frozen, only the head trains."""

    name = "head_only"

    def prepare(self, model, ctx):
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in ctx.head_names)
        return model

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
