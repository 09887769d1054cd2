"""A method whose name is a built-in's (tests/bad_suites/method_file_name_taken.yaml)."""

from harness.contract import MethodBase


class NotLora(MethodBase):
    name = "lora"

    def prepare(self, model, ctx):
        return model

    def trainable_parameters(self, model):
        return []
