"""Built-in fine-tuning methods: one file per method, one registered class each.

Importing this package registers them. To add a method, add a file here that defines one class decorated
with :func:`harness.registry.register_method` and import it below (third parties use the entry-point group
``ftbench.methods`` instead; see docs/methods.md).
"""

from methods import full, lora, peft_generic, qalora, qat_lora, qlora  # noqa: F401
