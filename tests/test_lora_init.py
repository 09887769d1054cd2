"""QLoRA's adapter initialisations made on the float weights (methods/lora_init.py): QPiSSA and LoftQ leave
Q + s·BA closer to the original weights than LoRA's zero adapter on the same NF4 base."""

import pytest
import torch

from harness.cell.models import load_model
from harness.cell.run import run_cell
from harness.contract import ModelContext
from harness.registry import get_method
from tests.conftest import cells

CTX = ModelContext("seq_cls", 2, "bert", ["classifier"])


def _report(**cfg):
    cls = get_method("qlora")
    m = cls(cls.Config(**{"r": 8, "target_modules": ["query", "key", "value", "dense"], **cfg}))
    model = m.prepare(load_model("tiny-bert", 2, 0).model, CTX)
    return m.report(model), model


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_init_error_below_the_plain_quantization_error(init):
    plain, _ = _report()
    got, model = _report(init_lora_weights=init)
    assert got["init_relative_error"] < plain["quant_relative_error"]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and all(float(p.abs().max()) > 0 for p in b)  # the adapters start non-zero, unlike LoRA's


def test_more_loftq_iterations_fit_closer():
    one, _ = _report(init_lora_weights="loftq", loftq_iter=1)
    five, _ = _report(init_lora_weights="loftq", loftq_iter=5)
    assert five["init_relative_error"] < one["init_relative_error"]


def test_loftq_base_requantizes_to_itself():
    """The base left for quantization is the input of LoftQ's last quantization: quantizing it again gives the
    same Q, so init_relative_error is Q + s·BA's error as trained from."""
    cls = get_method("qlora")
    m = cls(cls.Config(r=4, target_modules=["query"], init_lora_weights="loftq", loftq_iter=2))
    w = torch.randn(64, 32)
    once = m._nf4_roundtrip(w)
    assert torch.equal(m._nf4_roundtrip(once), once)


def test_pissa_cell_trains_and_exports(tmp_path):
    method = {"method": "qlora", "config": {"r": 4, "init_lora_weights": "pissa", "export_int_bits": 4,
                                            "export_int_group_size": 16}}  # fmt: skip
    rec = run_cell(cells(methods=[method])[0], tmp_path)
    assert rec.status == "ok", rec.error
    assert rec.method_metrics["init_lora_weights"] == "pissa" and rec.method_metrics["init_relative_error"] > 0
    assert {e.kind for e in rec.exports if e.eval} == {"merged_4bit", "merged_fp32", "merged_int4"}
