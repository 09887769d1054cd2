"""Another file whose method is also named ``bitfit`` (tests/bad_suites/method_files_share_a_name.yaml)."""

from harness.contract import MethodBase


class BitFit(MethodBase):
    name = "bitfit"

    def prepare(self, model, ctx):
        return model

    def trainable_parameters(self, model):
        return []
