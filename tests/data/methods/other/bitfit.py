"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning"): only the bias terms and the
new head train. A method kept in a file beside a suite (``method: bitfit.py:BitFit``), never packaged."""

from harness.contract import MethodBase


class BitFit(MethodBase):
    """Train the biases and the head only."""

    name = "bitfit"

    def prepare(self, model, ctx):
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name.split(".")[0] in ctx.head_names)
        return model

    def trainable_parameters(self, model):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
